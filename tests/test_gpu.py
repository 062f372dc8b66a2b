"""Opt-in CUDA checks (pytest -m gpu): profiling and pruning stay exact on the GPU in half precision."""

import pytest
import torch

from fragcli.models import load_model
from fragcli.profiling.processor import install_profiler, remove_profiler
from fragcli.profiling.recorder import Recorder
from fragcli.techniques import HeadPruneConfig, apply_technique
from fragcli.techniques.head_prune import attention_modules, install_head_mask, remove_head_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_profile_and_prune_on_cuda_fp16():
    m = load_model("tiny", device="cuda", dtype="fp16")
    unet = m.pipe.unet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    t = torch.tensor([500], device="cuda")
    ctx = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        rec = Recorder(profiled_steps={0})
        rec.step = 0
        install_profiler(unet, rec)
        out = unet(x, t, ctx).sample
        remove_profiler(unet)
        assert (out - ref).abs().max().item() <= 1e-2  # fp16
        removed = {n: [0, 2] for n in attention_modules(unet)}
        install_head_mask(unet, removed)
        masked = unet(x, t, ctx).sample
        remove_head_mask(unet)
        apply_technique(unet, HeadPruneConfig(attention_heads_removed=removed))
        pruned = unet(x, t, ctx).sample
    assert (pruned - masked).abs().max().item() <= 1e-2
