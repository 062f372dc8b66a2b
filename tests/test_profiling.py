"""The profiling processor computes exactly what the default one does, records the right numbers, and leaves."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from fragcli.models import load_model
from fragcli.profiling.processor import head_energies, head_entropy, install_profiler, remove_profiler
from fragcli.profiling.recorder import Recorder
from tests.helpers import unet_inputs


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_profiler_preserves_outputs_and_removes_cleanly(tiny):
    unet = tiny.pipe.unet
    x, t, ctx = unet_inputs(unet)
    before_procs = {n: type(p) for n, p in unet.attn_processors.items()}
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        rec = Recorder(profiled_steps={0})
        rec.step = 0
        patch = install_profiler(unet, rec)
        assert install_profiler(unet, rec) is patch  # idempotent
        out = unet(x, t, ctx).sample
        assert remove_profiler(unet)
        assert not remove_profiler(unet)
        after = unet(x, t, ctx).sample
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(after, ref)
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before_procs
    n_modules = sum(isinstance(m, Attention) for m in unet.modules())
    assert len(rec.heads["module"]) == n_modules * 8  # 8 heads per module
    assert set(rec.heads["kind"]) == {"self", "cross"}


def test_energies_match_an_independent_hook(tiny):
    unet = tiny.pipe.unet
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = dict(unet.named_modules())[name]
    captured = {}
    handle = attn.to_out[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach().clone()))
    rec = Recorder(profiled_steps={0})
    rec.step = 0
    install_profiler(unet, rec)
    try:
        with torch.no_grad():
            unet(*unet_inputs(unet))
    finally:
        remove_profiler(unet)
        handle.remove()
    x = captured["x"]
    heads, width = attn.heads, x.shape[-1] // attn.heads
    w = attn.to_out[0].weight
    rows = [i for i, m in enumerate(rec.heads["module"]) if m == name]
    for h in range(heads):
        xh = x[..., h * width : (h + 1) * width]
        pre = xh.pow(2).mean().sqrt().item()
        post = (xh @ w[:, h * width : (h + 1) * width].T).pow(2).mean().sqrt().item()
        assert rec.heads["energy_pre"][rows[h]] == pytest.approx(pre, rel=1e-4)
        assert rec.heads["energy_post"][rows[h]] == pytest.approx(post, rel=1e-4)


def test_sampled_entropy_is_close_to_exact():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1024, 16)
    k = torch.randn(2, 4, 300, 16) * 2
    exact = head_entropy(q, k, None, None)
    sampled = head_entropy(q, k, None, 256)
    assert (exact - sampled).abs().max().item() < 0.01
    # uniform attention has normalised entropy 1, one-hot attention 0
    assert head_entropy(torch.zeros(1, 1, 4, 8), torch.randn(1, 1, 10, 8), None, None).item() == pytest.approx(1.0)
    spike = torch.zeros(1, 1, 10, 8)
    spike[..., 3, :] = 100.0
    assert head_entropy(torch.ones(1, 1, 2, 8), spike, None, None).item() < 0.01


def test_entropy_respects_the_mask():
    torch.manual_seed(0)
    q, k = torch.zeros(1, 1, 4, 8), torch.randn(1, 1, 16, 8)
    mask = torch.zeros(1, 1, 1, 16)
    mask[..., 8:] = float("-inf")  # half the keys masked: uniform over 8 of 16 keys
    assert head_entropy(q, k, mask, None).item() == pytest.approx(math.log(8) / math.log(16), rel=1e-5)


def test_head_energies_shapes():
    x = torch.randn(2, 10, 32)
    pre, post = head_energies(x, 4, torch.randn(16, 32))
    assert pre.shape == post.shape == (4,)
    assert torch.all(pre > 0) and torch.all(post > 0)


def test_the_kept_gram_follows_the_weight():
    from fragcli.profiling.processor import ProfilingAttnProcessor, head_gram

    attn = Attention(query_dim=16, heads=4, dim_head=4)
    proc = ProfilingAttnProcessor("a", Recorder(), attn.processor)
    first = proc.gram(attn)
    assert proc.gram(attn) is first  # kept between calls
    assert torch.equal(first, head_gram(attn.to_out[0].weight, 4))
    with torch.no_grad():
        attn.to_out[0].weight.mul_(2.0)  # changed in place (a new version): recomputed
    assert torch.allclose(proc.gram(attn), 4 * first)
    x = torch.randn(2, 5, 16)
    w = attn.to_out[0].weight
    assert all(torch.equal(a, b) for a, b in zip(head_energies(x, 4, w, proc.gram(attn)), head_energies(x, 4, w),
                                                 strict=True))
