"""Cross-attention gating (``fragcli/techniques/cross_attn_gate.py``): exact when nothing is gated, equal to
reusing each cross-attention module's last computed output when something is, planned from the profile."""

import math

import numpy as np
import pytest
import torch

from fragcli import api
from fragcli.fragment import load_fragment
from fragcli.models import load_model
from fragcli.techniques.cross_attn_gate import (
    CrossAttnGate,
    CrossAttnGateConfig,
    cross_attention_modules,
    gate_step,
    install_gate,
    remove_gate,
)
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"
STEPS = 6


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=g, guidance_scale=3.0, height=32, width=32,
                output_type="np").images


def _config(pipe, k):
    pipe.scheduler.set_timesteps(STEPS)
    return CrossAttnGateConfig(threshold=0.05, gate_step=k, modules=cross_attention_modules(pipe.unet),
                               timesteps=[float(t) for t in pipe.scheduler.timesteps])


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu", "fp32")


def test_gate_step_sums_the_drift_to_the_end():
    assert gate_step([math.nan, 0.5, 0.02, 0.01, 0.01], 0.025) == 3
    assert gate_step([math.nan, 0.5, 0.02, 0.01, 0.01], 0.05) == 2
    assert gate_step([math.nan, 0.5, 0.02, 0.01, 0.2], 0.05) is None  # the last step alone drifts too much
    assert gate_step([math.nan, 0.0, 0.0], 1.0) == 1  # step 0 always attends
    assert gate_step([math.nan, 0.0, math.nan, 0.0], 1.0) == 3


def test_nothing_gated_equals_the_plain_pipeline_exactly(tiny):
    plain = _images(tiny.pipe)
    cfg = _config(tiny.pipe, STEPS)  # every step computed
    patch = install_gate(tiny.pipe.unet, cfg)
    try:
        assert np.array_equal(_images(tiny.pipe), plain) and patch.state["reused"] == 0
    finally:
        remove_gate(tiny.pipe.unet)
    assert np.array_equal(_images(tiny.pipe), plain)


def test_a_gated_step_reuses_each_modules_last_output_exactly(tiny):
    unet, k = tiny.pipe.unet, 3
    names = cross_attention_modules(unet)
    modules = dict(unet.named_modules())
    step = {"i": -1}
    kept: dict[str, torch.Tensor] = {}

    def count(module, args, kwargs):
        step["i"] += 1

    def make(name):
        def hook(module, args, output):  # the reference: computes, then answers with step k-1's output
            if step["i"] < k:
                kept[name] = output
                return None
            return kept[name]
        return hook

    handles = [unet.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [modules[n].register_forward_hook(make(n)) for n in names]
    try:
        reference = _images(tiny.pipe)
    finally:
        for h in handles:
            h.remove()
    patch = install_gate(unet, _config(tiny.pipe, k))
    try:
        got = _images(tiny.pipe)
        assert patch.state["reused"] == STEPS - k
        again = _images(tiny.pipe)  # a second generation starts fresh
    finally:
        remove_gate(unet)
    assert np.array_equal(got, reference) and np.array_equal(again, got)
    assert not np.array_equal(got, _images(tiny.pipe))  # gating changed the result (the test can fail)


def test_extract_plans_the_gate_and_the_fragment_loads(tmp_path):
    prof = api.profile(PROMPT, model="tiny", seeds=2, steps=STEPS, guidance=3.0, out=tmp_path / "p",
                       show_progress=False).out
    r = run_cli("extract", prof, "--cross-attn-gate", "10", "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "f" / "fragment.safetensors").exists()
    model = load_model("tiny", "cpu", "fp32")
    plain = _images(model.pipe)
    load_fragment(model, tmp_path / "f")
    assert not np.array_equal(_images(model.pipe), plain)
    assert "frag.cross_attn_gate" in model.pipe.unet.__dict__["_frag_patches"]
    assert_one_line_error(run_cli("extract", prof, "--cross-attn-gate", "0", "--out", tmp_path / "g"),
                          "--cross-attn-gate")
    assert_one_line_error(run_cli("extract", prof, "--cross-attn-gate", "1e-12", "--out", tmp_path / "g"),
                          "still drift")
    assert not (tmp_path / "g").exists()


def test_refuses_modules_that_are_not_cross_attention(tiny):
    cfg = _config(tiny.pipe, 2).model_copy(update={"modules": ["mid_block"]})
    with pytest.raises(Exception, match="not a cross-attention module"):
        CrossAttnGate().check(tiny.pipe.unet, cfg)
    s = CrossAttnGate().summary(_config(tiny.pipe, 2), tiny.pipe.unet)
    assert (s.units_total, s.units_removed) == (STEPS, STEPS - 2)
