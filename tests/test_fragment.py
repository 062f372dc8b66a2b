"""Fragments: extract -> load round trip, refusals with reasons, generate's fallback, and the CLI chain."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fragcli.errors import FragError
from fragcli.fragment import load_fragment, verify_fragment
from fragcli.models import load_model
from fragcli.techniques.head_prune import heads_per_module
from tests.helpers import assert_one_line_error, run_cli, unet_inputs

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """profile -> extract through the CLI, once for this module."""
    root = tmp_path_factory.mktemp("chain")
    prof, frag = root / "profile", root / "fragment"
    r = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "0,1", "--steps", "3", "--out", prof)
    assert r.exit_code == 0, r.output
    r = run_cli("extract", prof, "--head-retention", "0.7", "--out", frag, "--json")
    assert r.exit_code == 0, r.output
    return prof, frag, json.loads(r.stdout)


@pytest.fixture
def fragment(built, tmp_path):
    """A private copy of the fragment that a test may damage."""
    dst = tmp_path / "frag"
    shutil.copytree(built[1], dst)
    return dst


def test_extract_writes_selection_manifest_and_delta(built):
    _, frag, summary = built
    manifest = json.loads((frag / "manifest.json").read_text())
    selection = json.loads((frag / "selection.json").read_text())
    assert manifest["_type"] == "frag.fragment" and manifest["schema_version"] == 2
    assert list(manifest) == sorted(manifest)  # sorted keys
    [entry] = manifest["techniques"]
    assert entry["name"] == "head_prune" and entry["version"] == 1
    assert entry["config"]["attention_heads_removed"] == {m: r for m, r in selection["removed"].items() if r}
    s = entry["summary"]
    assert s["unit"] == "attention_heads" and s["units_total"] == selection["heads_total"]
    assert s["units_removed"] == selection["heads_removed"] and 0.25 < s["removed_fraction"] <= 0.3
    assert s["params_removed"] == manifest["params"]["removed"] > 0  # the denoiser is all that changed
    assert s["bytes_saved"] == manifest["weight_bytes"]["before"] - manifest["weight_bytes"]["after"] > 0
    assert set(manifest["artifacts"]) == {"fragment.safetensors", "selection.json"}
    assert manifest["quality"] is None and manifest["performance"] is None
    assert "/" not in json.dumps(manifest["profiling"])  # no local path in a shareable manifest
    delta = load_file(frag / "fragment.safetensors")
    assert delta and all(k.startswith("unet.") and "attn" in k for k in delta)
    assert sorted(delta) == manifest["weights"]["changed"] and manifest["weights"]["removed"] == []
    assert all(v.dtype == torch.float32 for v in delta.values())
    assert summary["techniques"][0]["units_removed"] == s["units_removed"]


def test_round_trip_reproduces_the_pruned_model(built):
    prof, frag, _ = built
    from fragcli.profiling.data import read_profile
    from fragcli.techniques import HeadPruneConfig, apply_technique
    from fragcli.techniques.head_selection import SelectionParams, plan, score_heads

    direct = load_model("tiny")
    sel = plan(score_heads(read_profile(prof), "composite"), SelectionParams(head_retention=0.7))
    apply_technique(direct.denoiser, HeadPruneConfig(attention_heads_removed={m: r for m, r in sel["removed"].items() if r}))
    loaded = load_model("tiny")
    load_fragment(loaded, frag)
    assert heads_per_module(loaded.denoiser) == heads_per_module(direct.denoiser)
    a, b = direct.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        x = unet_inputs(loaded.denoiser)
        assert torch.equal(loaded.denoiser(*x).sample, direct.denoiser(*x).sample)
    with pytest.raises(FragError, match="already has a fragment"):
        load_fragment(loaded, frag)


def test_retention_one_is_a_no_op_fragment(built, tmp_path):
    prof = built[0]
    r = run_cli("extract", prof, "--head-retention", "1.0", "--out", tmp_path / "noop", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "noop" / "manifest.json").read_text())
    assert m["techniques"][0]["config"]["attention_heads_removed"] == {} and m["params"]["removed"] == 0
    assert m["weights"] is None and "fragment.safetensors" not in m["artifacts"]  # nothing changed: no delta
    loaded = load_model("tiny")
    ref = load_model("tiny")
    load_fragment(loaded, tmp_path / "noop")
    assert all(torch.equal(v, ref.denoiser.state_dict()[k]) for k, v in loaded.denoiser.state_dict().items())


def _flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder, fn, rehash=True):
    """Edit a manifest; ``rehash`` re-signs it, as a careful forger would, so that the deeper checks are tested."""
    from fragcli.manifest import content_hash

    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    if rehash:
        m["content_sha256"] = content_hash(m)
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda f: _flip_byte(f / "fragment.safetensors"), "does not match its hash"),
        (lambda f: _edit_manifest(f, lambda m: m["artifacts"].update({"../escape.bin": m["artifacts"]["selection.json"]})),
         "escapes"),
        (lambda f: _edit_manifest(f, lambda m: m["artifacts"].update({"/etc/passwd": m["artifacts"]["selection.json"]})),
         "not a relative path"),
        (lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text()[:200]), "malformed"),
        (lambda f: _edit_manifest(f, lambda m: m["base_model"].update({"hash": "0" * 64})), "not this one"),
        (lambda f: _edit_manifest(f, lambda m: m.update({"schema_version": 99})), "schema_version"),
        (lambda f: _edit_manifest(f, lambda m: m.pop("techniques")), "techniques"),
        (lambda f: _edit_manifest(f, lambda m: m["techniques"][0].update({"name": "warp_drive"})), "unknown technique"),
        (lambda f: _edit_manifest(f, lambda m: m["techniques"][0].update({"version": 9})), "newer"),
        (lambda f: _edit_manifest(f, lambda m: m["techniques"][0]["config"].update({"bogus": 1})), "config is invalid"),
        (lambda f: _edit_manifest(f, lambda m: m["techniques"][0]["config"]["attention_heads_removed"].update(
            {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": [0, 1, 2, 3, 4, 5, 6, 7]})), "zero|every head"),
        (lambda f: _edit_manifest(f, lambda m: m["techniques"][0]["config"].update({"attention_heads_removed": {}})),
         "has no place|shape"),
        (lambda f: _edit_manifest(f, lambda m: m["weights"]["changed"].pop()), "do not match the manifest"),
        (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe{}"), "not UTF-8"),
        (lambda f: _edit_manifest(f, lambda m: m.update({"quality": {"clip_delta_mean": 0.5}}), rehash=False),
         "content_sha256"),
        (lambda f: _edit_manifest(f, lambda m: m["techniques"][0]["summary"].update({"units_removed": 0}),
                                  rehash=False), "content_sha256"),
        (lambda f: (f / "fragment.safetensors").unlink(), "missing"),
    ],
)
def test_damaged_fragments_are_refused_with_the_reason(fragment, damage, needle):
    damage(fragment)
    model = load_model("tiny")
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    with pytest.raises(FragError, match=needle) as exc:
        load_fragment(model, fragment)
    assert "\n" not in exc.value.one_line()
    after = model.denoiser.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # untouched


def test_wrong_base_model_is_refused(fragment, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(load_model("tiny").folder, other)
    w = other / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(w)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    from safetensors.torch import save_file

    save_file(tensors, str(w))
    with pytest.raises(FragError, match="not this one"):
        verify_fragment(fragment, load_model(str(other)).hash)


def test_generate_falls_back_or_exits_2_under_strict(fragment, tmp_path):
    _flip_byte(fragment / "fragment.safetensors")
    r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", fragment, "--seeds", "1", "--steps", "2",
                "--out", tmp_path / "g", "--json")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "g" / "run.json").read_text())
    assert run["fragment"] is None and "does not match its hash" in run["fallback_reason"]
    assert "warning" in r.stderr
    r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", fragment, "--seeds", "1", "--steps", "2", "--strict",
                "--out", tmp_path / "g2")
    assert_one_line_error(r, "does not match its hash")
    assert not (tmp_path / "g2").exists()


def test_cli_chain_generate_with_fragment_is_deterministic(built, tmp_path, frag_home):
    _, frag, _ = built
    shutil.copytree(frag, frag_home / "fragments" / "found")
    outs = []
    for i, fragment in enumerate((str(frag), "auto")):
        out = tmp_path / f"g{i}"
        r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", fragment, "--seeds", "0-2", "--steps", "3",
                    "--batch-size", "2", "--out", out)
        assert r.exit_code == 0, r.output
        run = json.loads((out / "run.json").read_text())
        assert run["fragment"] is not None and run["fallback_reason"] is None
        assert run["seeds"] == [0, 1, 2] and run["images_per_min"] > 0
        outs.append(out)
    for seed in (0, 1, 2):
        a = np.asarray(Image.open(outs[0] / f"seed-{seed}.png"))
        b = np.asarray(Image.open(outs[1] / f"seed-{seed}.png"))
        assert np.array_equal(a, b)
    # tiny's random text encoder finds every prompt alike (cosine ~0.97): a strict --min-similarity refuses the match
    r = run_cli("generate", "a green star", "-m", "tiny", "--fragment", "auto", "--min-similarity", "0.999",
                "--seeds", "1", "--steps", "1", "--out", tmp_path / "nomatch")
    assert r.exit_code == 0
    assert json.loads((tmp_path / "nomatch" / "run.json").read_text())["fragment"] is None


def test_extract_refuses_bad_profiles(tmp_path, built):
    assert_one_line_error(run_cli("extract", tmp_path / "nope"), "does not exist")
    bad = tmp_path / "bad"
    shutil.copytree(built[0], bad)
    (bad / "profile.parquet").write_bytes(b"not parquet at all")
    assert_one_line_error(run_cli("extract", bad, "--out", tmp_path / "f"), "not a readable parquet")
    (bad / "context.json").write_text("{broken")
    assert_one_line_error(run_cli("extract", bad, "--out", tmp_path / "f"), "malformed")
    assert_one_line_error(run_cli("extract", built[0], "--head-retention", "0", "--out", tmp_path / "f"),
                          "head-retention")
    assert not (tmp_path / "f").exists()


def test_load_fragment_on_a_plain_diffusers_pipeline(built):
    """A pipeline loaded with diffusers directly is identified by its folder's hash."""
    from diffusers import StableDiffusionPipeline

    folder = load_model("tiny").folder
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    load_fragment(pipe, built[1])
    m = json.loads((built[1] / "manifest.json").read_text())
    removed = m["techniques"][0]["config"]["attention_heads_removed"]
    heads = heads_per_module(pipe.unet)
    assert all(heads[name] == 8 - len(r) for name, r in removed.items()) and removed


def _rehash_artifact(folder, rel):
    from fragcli.manifest import Artifact, read_manifest, write_manifest
    from fragcli.models.hashing import sha256_file

    m = read_manifest(folder)
    f = folder / rel
    write_manifest(folder, m.model_copy(update={"artifacts": {
        **m.artifacts, rel: Artifact(sha256=sha256_file(f), bytes=f.stat().st_size)}}))


def test_malformed_safetensors_with_matching_hashes_is_refused_and_generate_falls_back(fragment, tmp_path):
    (fragment / "fragment.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _rehash_artifact(fragment, "fragment.safetensors")
    model = load_model("tiny")
    with pytest.raises(FragError, match="cannot be read|not a readable safetensors"):
        load_fragment(model, fragment)
    assert not getattr(model.pipe, "_frag_fragment", None)
    r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", fragment, "--seeds", "1", "--steps", "1",
                "--out", tmp_path / "g", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "run.json").read_text())["fragment"] is None


def test_auto_skips_staging_folders_and_strict_refuses_no_match(built, tmp_path, frag_home):
    shutil.copytree(built[1], frag_home / "fragments" / ".found.1234.abcd.tmp")  # a killed extract's staging folder
    r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", "auto", "--seeds", "1", "--steps", "1",
                "--out", tmp_path / "g", "--json")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "g" / "run.json").read_text())
    assert run["fragment"] is None and "no fragment" in run["fallback_reason"]
    assert "warning" in r.stderr and "no fragment" in r.stderr
    r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", "auto", "--strict", "--seeds", "1", "--steps", "1",
                "--out", tmp_path / "g2")
    assert_one_line_error(r, "--fragment auto", "no fragment")
    assert not (tmp_path / "g2").exists()


def test_a_broken_manifest_under_fragments_does_not_break_auto(built, tmp_path, frag_home):
    bad = frag_home / "fragments" / "broken"
    shutil.copytree(built[1], bad)
    (bad / "manifest.json").write_bytes(b"\xff\xfe\x00not json")
    shutil.copytree(built[1], frag_home / "fragments" / "good")
    r = run_cli("generate", PROMPT, "-m", "tiny", "--fragment", "auto", "--strict", "--seeds", "1", "--steps", "1",
                "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "g" / "run.json").read_text())["fragment"].endswith("good")


def test_validate_refuses_a_malformed_safetensors_in_one_line(fragment, tmp_path):
    (fragment / "fragment.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _rehash_artifact(fragment, "fragment.safetensors")
    r = run_cli("validate", fragment, "--seeds", "1", "--paraphrase-seeds", "1", "--out", tmp_path / "v")
    assert_one_line_error(r, "fragment.safetensors")
    assert not (tmp_path / "v").exists()
