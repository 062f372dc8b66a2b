"""shapes training survives an interruption: a run killed inside any stage and rerun ends with the same weights as an
uninterrupted run (tools/train_shapes.py, tiny settings: every stage's checkpoint, its RNG states and its optimizer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import train_shapes  # noqa: E402

TINY = ["--stage", "text,vae,unet", "--threads", "1", "--n-images", "24", "--text-steps", "5", "--text-batch", "8",
        "--vae-steps", "5", "--vae-batch", "4", "--unet-steps", "7", "--unet-batch", "4", "--probe-every", "0",
        "--ckpt-every", "2", "--skip-diagnostics"]
OUTPUTS = ["text_clip/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "latents.safetensors"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(work: Path, *extra: str) -> None:
    train_shapes.main([*TINY, "--work", str(work), *extra])


def _weights(work: Path) -> dict[str, torch.Tensor]:
    out = {}
    for rel in OUTPUTS:
        for k, v in load_file(str(work / rel)).items():
            out[f"{rel}:{k}"] = v
    return out


def test_interrupted_in_every_stage_and_resumed_equals_uninterrupted(tmp_path):
    _run(tmp_path / "straight")
    resumed = tmp_path / "resumed"
    for cut in ("text:3", "vae:5", "unet:5"):  # between checkpoints (steps 2, 4, 6), and at a stage's last step
        with pytest.raises(train_shapes.SimulatedKill):
            _run(resumed, "--interrupt-after", cut)
    _run(resumed)
    a, b = _weights(tmp_path / "straight"), _weights(resumed)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    for stage in ("text", "vae", "unet"):
        sa, sb = train_shapes.read_stage_at(tmp_path / "straight", stage), train_shapes.read_stage_at(resumed, stage)
        assert sa["loss_curve"] == pytest.approx(sb["loss_curve"], abs=1e-6)
        assert sb["resumed_at_step"] and not sa["resumed_at_step"]
        assert sb["cpu_seconds"] > sb["resumed_cpu_seconds"] > 0  # CPU time of both attempts is counted


def test_a_finished_stage_is_kept_and_a_checkpoint_from_other_settings_is_refused(tmp_path):
    _run(tmp_path, "--stage", "text")
    before = (tmp_path / "text_clip" / "model.safetensors").stat().st_mtime_ns
    _run(tmp_path, "--stage", "text")  # same settings: kept, not retrained
    assert (tmp_path / "text_clip" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(train_shapes.SimulatedKill):
        _run(tmp_path, "--stage", "vae", "--interrupt-after", "vae:3")
    with pytest.raises(SystemExit, match="other settings"):
        _run(tmp_path, "--stage", "vae", "--vae-lr", "0.002")
    _run(tmp_path, "--stage", "vae", "--vae-lr", "0.002", "--fresh")  # --fresh starts that stage over
    assert train_shapes.read_stage_at(tmp_path, "vae")["resumed_at_step"] is None
