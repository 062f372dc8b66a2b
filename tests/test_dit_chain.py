"""The chain on every tiny DiT (tiny-sd3, tiny-flux, tiny-pixart, random weights) through the CLI: profile, then
block caching by hand (reused calls when loaded, none at threshold 0 = exact), head + FFN pruning loaded back, and
``--objective speed`` / ``--objective memory`` each build a fragment, leaving out (and naming) the levers the model
cannot use. The CLIP gate is optional here: the tiny models have no CLIP judge."""

import json

import numpy as np
import pytest

from fragcli.fragment import load_fragment
from fragcli.generation import GenSettings, run_batch
from fragcli.models import load_model
from fragcli.patches import installed
from tests.helpers import run_cli

LENIENT = "clip_delta_max: {value: 0.02, direction: max, optional: true}\n"


def _generate(name, fragment=None):
    m = load_model(name, "cpu", "auto")
    if fragment is not None:
        load_fragment(m, fragment)
    s = GenSettings("a red circle", 6, float(m.defaults["default_guidance"]), 64, 64)
    image = np.asarray(run_batch(m.pipe, s, [0], "cpu")[0], dtype=float)
    den = m.pipe.transformer
    return image, {k: p.state for k, p in installed(den).items()}


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_dit_chain(name, frag_home, tmp_path):
    prof = tmp_path / "profile"
    r = run_cli("profile", "a red circle", "-m", name, "--seeds", "0,1", "--steps", "6", "--out", prof)
    assert r.exit_code == 0, r.output
    plain, _ = _generate(name)

    # block caching, planned from the profile: the loaded fragment reuses calls; a random-weight model needs a
    # large budget (its residuals move 20-40% per step)
    r = run_cli("extract", prof, "--block-cache", "0.9", "--out", tmp_path / "bc")
    assert r.exit_code == 0, r.output
    schedule = json.loads((tmp_path / "bc" / "block_schedule.json").read_text())
    assert all(c[0] and c[-1] for c in schedule["computed"].values())
    image, state = _generate(name, tmp_path / "bc")
    assert state["frag.block_cache"]["reused"] >= 1
    assert state["frag.block_cache"]["reused"] == sum(not c for c in schedule["computed"]["0"])

    # structural levers on every attention (Flux: single-stream too) and FFN (Flux: single-stream MLP too)
    r = run_cli("extract", prof, "--head-retention", "0.7", "--ffn-retention", "0.8", "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    removed = next(t for t in manifest["techniques"] if t["name"] == "head_prune")["config"]
    if name == "tiny-flux":
        ffn = next(t for t in manifest["techniques"] if t["name"] == "ffn_prune")["config"]["ffn_channels_removed"]
        assert any(k.startswith("single_transformer_blocks.") for k in ffn)
        assert removed["attention_heads_removed"]
    image, _ = _generate(name, tmp_path / "hf")
    assert np.isfinite(image).all()

    # the objectives: a fragment each, levers the model cannot use named in recipe.json
    (tmp_path / "th.yaml").write_text(LENIENT)
    for objective in ("speed", "memory"):
        out = tmp_path / objective
        r = run_cli("extract", prof, "--objective", objective, "--search-seeds", "1", "--thresholds",
                    tmp_path / "th.yaml", "--out", out)
        assert r.exit_code == 0, r.output
        recipe = json.loads((out / "recipe.json").read_text())
        assert recipe["chosen"] and (out / "manifest.json").is_file()
        if objective == "speed":
            assert "UNet" in recipe["left_out"]["step_cache"]
            assert "block_cache" not in recipe["left_out"]
            if name == "tiny-flux":
                assert "distilled" in recipe["left_out"]["guidance_cut"]
