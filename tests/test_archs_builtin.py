"""The tiny built-in architectures (SDXL, SD3, Flux, PixArt) build offline, reload from their diffusers folder and
run through `frag profile`: the denoiser is called once per step (twice per step with CFG in one batch) and the
images are finite. Every architecture has attention-head rows; SD3's and Flux's are ``joint``."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fragcli.models.builtin import BUILTINS, builtin_folder
from tests.helpers import run_cli

ARCHS = ("tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart")


@pytest.mark.parametrize("name", ARCHS)
def test_arch_builds_once_and_profiles(name, frag_home, tmp_path):
    assert name in BUILTINS
    folder = builtin_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    assert builtin_folder(name) == folder  # built once, reused
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    out = tmp_path / name
    result = run_cli("profile", "a red circle", "-m", name, "--seeds", "0-0", "--steps", "2", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    ctx = json.loads((out / "context.json").read_text())
    assert ctx["steps"] == 2 and ctx["model"]["name"] == name
    image = np.asarray(Image.open(out / "images" / "seed-0.png"))
    assert image.shape[:2] == (64, 64) and np.isfinite(image).all()
    blocks = pq.read_table(out / "blocks.parquet")
    assert set(blocks.column("step").to_pylist()) == {0, 1}
    heads = pq.read_table(out / "profile.parquet")
    if name in ("tiny-sdxl", "tiny-pixart"):  # UNet / DiT attention with separate self and cross layers
        kinds = set(heads.column("kind").to_pylist())
        assert {"self", "cross"} <= kinds, kinds
    else:  # SD3 (MMDiT) and Flux dual-stream blocks: image and context tokens in one attention
        assert set(heads.column("kind").to_pylist()) == {"joint"} and heads.num_rows > 0
    assert index["_class_name"].endswith("Pipeline")
