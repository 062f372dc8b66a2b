"""Profiling transformer denoisers: every attention module has per-head rows (Flux's single-stream attention too,
through its slice of ``proj_out``), joint and Flux attention have a finite entropy, and the outputs are unchanged."""

import math

import pytest
import torch

from fragcli.profiling.processor import head_energies, install_profiler, remove_profiler
from fragcli.profiling.recorder import Recorder
from fragcli.techniques.head_prune import attention_modules
from tests import dit_helpers as H


@pytest.mark.parametrize("kind", ["flux", "sd3", "pixart"])
def test_every_attention_is_profiled_with_entropy(kind):
    model = H.BUILD[kind]()
    plain = H.run(model, kind)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rec = Recorder(profiled_steps={0})
    rec.step = 0
    install_profiler(model, rec)
    out = H.run(model, kind)
    remove_profiler(model)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # the interception is undone
    assert torch.equal(out, plain)
    rows = rec.heads
    assert set(rows["module"]) == set(attention_modules(model))
    assert all(math.isfinite(e) and 0 <= e <= 1 + 1e-6 for e in rows["entropy"])
    assert all(math.isfinite(e) and e > 0 for e in rows["energy_post"])
    if kind == "flux":
        assert {"single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"} <= set(rows["module"])
        assert set(rows["kind"]) == {"joint"}


def test_single_stream_energy_is_the_attention_slice_of_proj_out():
    """energy_post of a single-stream head = RMS of its contribution through proj_out's attention columns."""
    model = H.flux()
    block = model.single_transformer_blocks[0]
    seen = {}
    block.attn.register_forward_hook(lambda m, a, o: seen.setdefault("x", o.detach()))
    rec = Recorder(profiled_steps={0})
    rec.step = 0
    install_profiler(model, rec)
    H.run(model, "flux")
    remove_profiler(model)
    x = seen["x"]
    hd = block.attn.head_dim
    w = block.proj_out.weight[:, : x.shape[-1]]
    want = [(x[..., h * hd:(h + 1) * hd] @ w[:, h * hd:(h + 1) * hd].T).pow(2).mean().sqrt().item()
            for h in range(block.attn.heads)]
    got = [e for m, e in zip(rec.heads["module"], rec.heads["energy_post"], strict=True)
           if m == "single_transformer_blocks.0.attn"]
    assert got == pytest.approx(want, rel=1e-4)
    assert head_energies(x, block.attn.heads, w)[1].tolist() == pytest.approx(want, rel=1e-4)
