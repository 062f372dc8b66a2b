"""Cached prompt embeddings and evicted text encoders; opening a fragment without loading what it replaces."""

import numpy as np
import pytest

from fragcli import api
from fragcli.errors import FragError
from fragcli.fragment import load_fragment
from fragcli.generation import generate, resolve_settings
from fragcli.loading import open_fragment
from fragcli.memory import weight_bytes
from fragcli.models import load_model
from fragcli.patches import installed
from fragcli.techniques.prompt_embeds import PATCH, remove_cache
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"
OTHER = "a small green square at the top"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pe")
    prof = api.profile(PROMPT, model="tiny", seeds=2, steps=3, out=root / "profile", show_progress=False)
    frag = api.extract(prof.out, {"head_retention": 0.9, "evict_text_encoders": True, "cache_prompt": True},
                       out=root / "fragment", show_progress=False)
    keep = api.extract(prof.out, {"cache_prompt": True}, out=root / "cache-only", show_progress=False)
    return {"profile": prof.out, "fragment": frag.out, "cache_only": keep.out}


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _images(loaded, seeds, prompt=PROMPT, batch=2):
    s = resolve_settings(loaded, PROMPT, 3, None, None, None)
    return generate(loaded.pipe, s, seeds, loaded.device, batch_size=batch, prompt=prompt).images


def test_cached_embeddings_give_bit_identical_images(built):
    loaded = load_model("tiny", "cpu", "fp32")
    load_fragment(loaded, built["cache_only"])
    cached = _images(loaded, [0, 1])
    patch = installed(loaded.pipe)[PATCH]
    assert patch.state["hits"] == 1 and patch.state["misses"] == 0 and loaded.pipe.text_encoder is not None
    remove_cache(loaded.pipe)
    assert PATCH not in installed(loaded.pipe) and "encode_prompt" not in loaded.pipe.__dict__
    encoded = _images(loaded, [0, 1])
    assert _same(cached, encoded)


def test_other_wordings_and_negative_prompts_are_encoded_not_served_from_the_cache(built):
    loaded = load_model("tiny", "cpu", "fp32")
    load_fragment(loaded, built["cache_only"])
    _images(loaded, [0], prompt=OTHER)
    s = resolve_settings(loaded, PROMPT, 3, None, None, None, negative_prompt="blurry")
    generate(loaded.pipe, s, [0], "cpu")
    assert installed(loaded.pipe)[PATCH].state == {"hits": 0, "misses": 2, "evicted": False}


def test_evicted_text_encoders_free_their_bytes_and_reload_for_another_wording(built):
    full = load_model("tiny", "cpu", "fp32")
    te_bytes = weight_bytes(full.pipe.text_encoder)
    reference = {**_images(full, [0, 1]), **{("other", 0): _images(full, [0], prompt=OTHER)[0]}}

    loaded = load_model("tiny", "cpu", "fp32")
    before = weight_bytes(loaded.pipe)
    load_fragment(loaded, built["fragment"])  # evicts by the fragment's default
    assert loaded.pipe.text_encoder is None
    assert before - weight_bytes(loaded.pipe) >= te_bytes
    other = _images(loaded, [0], prompt=OTHER)[0]  # encoders loaded on the CPU for this call, then released
    assert loaded.pipe.text_encoder is None
    plain = load_model("tiny", "cpu", "fp32")
    load_fragment(plain, built["fragment"], evict_text_encoders=False)
    assert plain.pipe.text_encoder is not None
    assert np.array_equal(np.asarray(other), np.asarray(_images(plain, [0], prompt=OTHER)[0]))
    assert not np.array_equal(np.asarray(other), np.asarray(reference[("other", 0)]))  # (heads were pruned)


def test_open_fragment_equals_load_fragment_and_reads_only_what_it_keeps(built, monkeypatch):
    import safetensors

    reads = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.fh = real(*a, **k)

        def __enter__(self):
            self.inner = self.fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            reads.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    opened = open_fragment(built["fragment"], device="cpu", dtype="fp32")
    monkeypatch.undo()
    from fragcli.manifest import read_manifest

    changed = {k.split(".", 1)[1] for k in read_manifest(built["fragment"]).weights.changed}
    assert reads and not changed & set(reads)  # the base tensors the fragment replaces are never read
    assert opened.pipe.text_encoder is None and opened.pipe._frag_fragment
    loaded = load_model("tiny", "cpu", "fp32")
    load_fragment(loaded, built["fragment"])
    assert _same(_images(opened, [0, 1]), _images(loaded, [0, 1]))


def test_evicted_encoders_without_a_known_source_are_a_clear_refusal(built):
    from fragcli.fragment import apply_fragment, check_fragment

    loaded = load_model("tiny", "cpu", "fp32")
    apply_fragment(check_fragment(loaded, built["fragment"]), reload=None)
    with pytest.raises(FragError, match="evicted"):
        _images(loaded, [0], prompt=OTHER)
    _images(loaded, [0])  # the fragment's own prompt still runs


def test_cli_extract_evict_then_generate_uses_less_memory(built, tmp_path):
    out = tmp_path / "frag"
    r = run_cli("extract", built["profile"], "--evict-text-encoders", "--quantize", "none", "--out", out)
    assert r.exit_code == 0, r.output
    from fragcli.manifest import read_manifest

    m = read_manifest(out)
    assert [t.name for t in m.techniques] == ["prompt_embeds"] and m.weights is None
    assert "prompt_embeds.safetensors" in m.artifacts
    full = api.generate(PROMPT, model="tiny", seeds=1, steps=3, out=tmp_path / "g-full", show_progress=False)
    frag = api.generate(PROMPT, fragment=out, seeds=1, steps=3, out=tmp_path / "g-frag", show_progress=False)
    assert frag.run["fragment"] and frag.run["memory"]["weight_bytes"] < full.run["memory"]["weight_bytes"]
    from PIL import Image

    a, b = (np.asarray(Image.open(r.out / "seed-0.png")) for r in (frag, full))
    assert np.array_equal(a, b)  # embeddings only: exact


def test_cli_rejects_an_unknown_quantize_format(built, tmp_path):
    assert_one_line_error(run_cli("extract", built["profile"], "--quantize", "int3", "--out", tmp_path / "x"),
                          "int3")
