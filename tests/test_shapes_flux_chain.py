"""The whole chain on the shipped ``shapes-flux`` (a trained diffusers FluxPipeline) at small settings:
profile -> extract -> validate -> generate -> bench -> report. The levers are int8 weights and the cached prompt
(they work on transformer denoisers today); both stream types of the transformer are profiled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "fragcli" / "models" / "shapes_flux"
# another trained Flux folder can stand in (e.g. tools/out/shapes_flux/pipeline before it is installed)
MODEL = os.environ.get("FRAG_TEST_SHAPES_FLUX", "shapes-flux")
PROMPT = "a large red circle in the center on a blue background"

pytestmark = pytest.mark.skipif(
    MODEL == "shapes-flux" and not (FOLDER / "model_index.json").is_file(),
    reason="shapes-flux is not installed in fragcli/models/shapes_flux (make train-shapes-flux, then "
           "python tools/train_shapes_flux.py --stage finish --install)")


def _ok(*args):
    r = run_cli(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-chain")
    out = {"root": root}
    out["profile"] = _ok("profile", PROMPT, "-m", MODEL, "--seeds", "0,1", "--steps", "3", "--out", root / "profile")
    out["extract"] = _ok("extract", root / "profile", "--quantize", "int8", "--cache-prompt", "--out",
                         root / "fragment")
    out["validate"] = _ok("validate", root / "fragment", "--seeds", "0,1", "--paraphrase-seeds", "1", "--profile",
                          root / "profile", "--out", root / "validate")
    out["generate"] = _ok("generate", PROMPT, "-m", MODEL, "--fragment", root / "fragment", "--strict", "--seeds",
                          "0,1", "--steps", "3", "--batch-size", "2", "--out", root / "generate")
    out["bench"] = _ok("bench", root / "fragment", "--variants", "2", "--repeats", "1", "--steps", "3",
                       "--no-memory", "--out", root / "bench")
    out["report"] = _ok("report", "--run", root, "--compare", "none", "--out", root / "report")
    return out


def test_profile_covers_dual_and_single_stream_blocks(chain):
    from diffusers import FluxTransformer2DModel

    root = chain["root"]
    ctx = json.loads((root / "profile" / "context.json").read_text())
    assert ctx["model"]["name"] == "shapes-flux" or MODEL != "shapes-flux"
    assert ctx["model"]["denoiser"] == "transformer" and ctx["steps"] == 3
    cfg = FluxTransformer2DModel.load_config(str(FOLDER / "transformer")) if MODEL == "shapes-flux" else None
    heads = pq.read_table(root / "profile" / "profile.parquet").to_pydict()
    modules = set(heads["module"])
    dual = {m for m in modules if m.startswith("transformer_blocks.")}
    single = {m for m in modules if m.startswith("single_transformer_blocks.")}
    assert dual and single, modules
    if cfg:
        assert len(dual) == cfg["num_layers"] and len(single) == cfg["num_single_layers"]
        assert set(heads["heads"]) == {cfg["num_attention_heads"]}
    assert np.isfinite(np.asarray(heads["energy_post"], dtype=float)).all()
    for seed in (0, 1):
        image = np.asarray(Image.open(root / "profile" / "images" / f"seed-{seed}.png"))
        assert image.shape[:2] == (64, 64) and image.std() > 1  # an image, not a flat field


def test_extract_validate_generate_bench_report(chain):
    root = chain["root"]
    manifest = json.loads((root / "fragment" / "manifest.json").read_text())
    names = [t["name"] for t in manifest["techniques"]]
    assert "quantize" in names and "prompt_embeds" in names, names
    rec = json.loads((root / "validate" / "validation.json").read_text())
    assert [p["seed"] for p in rec["per_image"]] == [0, 1]
    assert "clip" not in rec["unavailable"]  # the shapes judge scores shapes-flux's images
    assert all(0 < p["ssim"] <= 1 for p in rec["per_image"])
    assert rec["weight_bytes"]["after"] < rec["weight_bytes"]["before"]
    if MODEL == "shapes-flux":  # its prompts are shapes captions: validate tests the caption's family
        assert rec["paraphrases"] and "paraphrases" not in rec["unavailable"]
    assert chain["generate"]["fallback_reason"] is None  # the fragment was used, not the full model
    assert sorted(p.name for p in (root / "generate").glob("*.png")) == ["seed-0.png", "seed-1.png"]
    bench = json.loads((root / "bench" / "bench.json").read_text())
    assert set(bench["runs"]) >= {"full", "fragment"} and bench["speedup"] > 0 and bench["steps"] == 3
    assert bench["runs"]["fragment"]["components"]["transformer"]["class_name"] == "FluxTransformer2DModel"
    assert "int8" in bench["runs"]["fragment"]["components"]["transformer"]["dtypes"]
    assert 0 < bench["weight_reduction"] < 1
    assert (root / "report" / "metrics_summary.json").is_file() and (root / "report" / "profile.parquet").is_file()
