"""tools/train_shapes_flux.py: the pad compression used in training is exact, and an interrupted, resumed run ends
with the same weights as an uninterrupted one (tiny settings, seconds on CPU)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

if not (ROOT / "fragcli" / "models" / "shapes" / "vae" / "config.json").is_file():
    pytest.skip("shapes-flux reuses the shipped shapes model (fragcli/models/shapes), absent here", allow_module_level=True)

import train_shapes_flux as tsf  # noqa: E402

TINY = ["--n-images", "48", "--pool", "48", "--t5-steps", "2", "--t5-batch", "4", "--t5-dim", "16",
        "--steps", "6", "--batch", "4", "--heads", "2", "--head-dim", "8", "--dual-blocks", "1", "--single-blocks", "1",
        "--ckpt-every", "2", "--probe-every", "0", "--guide-start", "0.5", "--threads", "1", "--hi-steps", "2"]


def _tiny_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], guidance_embeds=True).eval()


def test_pad_compression_equals_the_full_512_token_sequence():
    """Real tokens + one pad weighted log(512 - L) == all 512 tokens, when the pads are identical."""
    model = _tiny_transformer()
    g = torch.Generator().manual_seed(1)
    b, n_img = 2, 16
    n_real = torch.tensor([5, 9])
    states = torch.randn(b, tsf.T5_LEN, 16, generator=g)
    pad = torch.randn(16, generator=g)
    for i, n in enumerate(n_real.tolist()):
        states[i, n:] = pad  # what the pipeline feeds: 512 - n pads (alike)
    x = torch.randn(b, n_img, 16, generator=g)
    pooled = torch.randn(b, 16, generator=g)
    sigma, guidance = torch.tensor([0.3, 0.8]), torch.tensor([1.0, 3.0])
    ids = tsf.image_ids(4)
    with torch.no_grad():
        full = tsf.denoise(model, x, sigma, guidance, pooled, states, None, ids)
        ctx, bias = tsf.compress(states, n_real, n_img)
        small = tsf.denoise(model, x, sigma, guidance, pooled, ctx, bias, ids)
        wrong = tsf.denoise(model, x, sigma, guidance, pooled, ctx, None, ids)  # the pad counted once
    assert ctx.shape[1] == 10
    assert torch.allclose(full, small, atol=1e-5), float((full - small).abs().max())
    assert not torch.allclose(full, wrong, atol=1e-3)


def _weights(folder: Path, name: str = "transformer") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / name / "diffusion_pytorch_model.safetensors"))


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert tsf.main(["--stage", "train", "--out", str(a), *TINY]) == 0
    # the same inputs (t5, latents, captions) for the interrupted run; its transformer starts from nothing
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("transformer*", "stage-transformer*.json"))
    with pytest.raises(SystemExit) as stop:
        tsf.main(["--stage", "train", "--out", str(b), "--stop-at-step", "3", *TINY])
    assert stop.value.code == 3
    assert not (b / "transformer").exists()
    from safetensors import safe_open

    with safe_open(str(b / "transformer_ckpt.safetensors"), "pt") as fh:  # safetensors, no pickle
        step = json.loads(fh.metadata()["frag_checkpoint"])["step"]
    assert step == 2  # the last checkpoint before the interruption
    assert tsf.main(["--stage", "train", "--out", str(b), *TINY]) == 0  # the same command: resumes at step 2
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the guided half of training ran (steps 3..5) and training moved the weights
    info = tsf.Run(tsf.parse_args(["--out", str(b), *TINY])[1]).read_stage("transformer")
    assert info["resumed_at_step"] == 2 and info["guide_start_step"] == 3
    assert info["loss_curve"] and info["steps"] == 6
    # the high-noise stage continued from the main stage's end and changed the weights again
    hi_a, hi_b = (_weights(x, "transformer_hi") for x in (a, b))
    assert all(torch.equal(hi_a[k], hi_b[k]) for k in hi_a)
    assert any(not torch.equal(hi_a[k], wa[k]) for k in wa)
    init = _initial_weights(a)
    assert any(not torch.equal(init[k], wa[k].float()) for k in wa)


def _initial_weights(folder: Path) -> dict:
    """The transformer as the stage initialised it (seed + 30, the same config)."""
    from diffusers import FluxTransformer2DModel

    cfg = FluxTransformer2DModel.load_config(str(folder / "transformer"))
    torch.manual_seed(30)
    return FluxTransformer2DModel.from_config(cfg).state_dict()
