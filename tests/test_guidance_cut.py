"""Guidance cut-off (``fragcli/techniques/guidance_cut.py``): exact when nothing is cut, equal to the pipeline
switching guidance off at the cut step when something is, composed with step caching, planned from the profile."""

import math

import numpy as np
import pytest
import torch

from fragcli import api
from fragcli.fragment import load_fragment
from fragcli.models import load_model
from fragcli.techniques.guidance_cut import (
    GuidanceCut,
    GuidanceCutConfig,
    cut_step,
    guided_batch,
    install_guidance_cut,
    remove_guidance_cut,
)
from fragcli.techniques.step_cache import StepCacheConfig, deep_modules, install_step_cache, remove_step_cache
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"
STEPS = 6


def _images(pipe, seed=0, steps=STEPS, prompt=PROMPT, guidance=3.0, switch_at=None, **kw):
    """The pipeline's images; ``switch_at=k``: guidance switched off from step k on by the pipeline itself (the
    diffusers dynamic-CFG callback: conditional embeddings only, guidance 0), the independent reference."""
    def switch(p, i, t, cb):
        if i == switch_at - 1:
            cb["prompt_embeds"] = cb["prompt_embeds"].chunk(2)[-1]
            p._guidance_scale = 0.0
        return cb

    extra = {}
    if switch_at is not None:
        extra = {"callback_on_step_end": switch, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, guidance_scale=guidance, height=32, width=32,
                output_type="np", **extra, **kw).images


def _config(pipe, k, steps=STEPS):
    pipe.scheduler.set_timesteps(steps)
    times = [float(t) for t in pipe.scheduler.timesteps]
    return GuidanceCutConfig(threshold=0.05, cut_step=k, cut_timestep=times[k], steps=steps)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu", "fp32")


def test_cut_step_is_the_first_step_after_which_every_error_is_small():
    assert cut_step([9, 0.5, 0.2, 0.04, 0.03, 0.01], 0.05) == 3
    assert cut_step([9, 0.5, 0.01, 0.2, 0.03, 0.01], 0.05) == 4  # a later rise moves the cut
    assert cut_step([9, 0.5, 0.2, 0.1, 0.09, 0.06], 0.05) is None  # never settles
    assert cut_step([9, 0.01, 0.01], 0.05) == 1  # step 0 always runs guided
    assert cut_step([9, 0.01, math.nan, 0.01], 0.05) == 3  # unknown is never small


def test_guided_batch_means_identical_latent_halves():
    x = torch.randn(1, 4, 8, 8)
    assert guided_batch(torch.cat([x, x]))
    assert not guided_batch(torch.cat([x, x * 1.0001]))
    assert not guided_batch(torch.cat([x, x, x]))
    assert not guided_batch(x)


def test_cut_after_the_last_step_equals_the_plain_pipeline_exactly(tiny):
    plain = _images(tiny.pipe)
    cfg = _config(tiny.pipe, 1).model_copy(update={"cut_timestep": -1.0})
    patch = install_guidance_cut(tiny.pipe.unet, cfg)
    try:
        assert np.array_equal(_images(tiny.pipe), plain)
        assert patch.state["cut_calls"] == 0 and patch.state["full_calls"] == STEPS
    finally:
        remove_guidance_cut(tiny.pipe.unet)
    assert np.array_equal(_images(tiny.pipe), plain)  # removed: nothing left behind


@pytest.mark.parametrize("k", [2, 4])
def test_a_cut_equals_the_pipeline_switching_guidance_off_at_that_step(tiny, k):
    reference = _images(tiny.pipe, switch_at=k)
    guided = _images(tiny.pipe)
    patch = install_guidance_cut(tiny.pipe.unet, _config(tiny.pipe, k))
    try:
        got = _images(tiny.pipe)
        assert patch.state["cut_calls"] == STEPS - k
    finally:
        remove_guidance_cut(tiny.pipe.unet)
    assert np.array_equal(got, reference)
    assert not np.array_equal(got, guided)  # the cut changed the result (the test can fail)


def test_with_step_caching_the_cache_keeps_the_conditional_half(tiny):
    unet = tiny.pipe.unet
    branch, modules = deep_modules(unet)
    tiny.pipe.scheduler.set_timesteps(STEPS)
    times = [float(t) for t in tiny.pipe.scheduler.timesteps]

    def both(computed):
        sc = StepCacheConfig(threshold=0.1, max_reuse=3, branch=branch, modules=modules, timesteps=times,
                             computed=computed)
        install_guidance_cut(unet, _config(tiny.pipe, 3))  # registered first, as in the technique stack
        cache = install_step_cache(unet, sc)
        return cache

    try:
        cache = both([True] * STEPS)
        got = _images(tiny.pipe)
    finally:
        remove_step_cache(unet), remove_guidance_cut(unet)
    assert np.array_equal(got, _images(tiny.pipe, switch_at=3))  # nothing reused: just the cut
    try:
        cache = both([True, True, False, False, False, True])  # the cut (step 3) falls inside a reuse run
        got = _images(tiny.pipe)
        assert cache.state["reused"] == 3
    finally:
        remove_step_cache(unet), remove_guidance_cut(unet)
    sc = StepCacheConfig(threshold=0.1, max_reuse=3, branch=branch, modules=modules, timesteps=times,
                         computed=[True, True, False, False, False, True])
    install_step_cache(unet, sc)
    try:
        reference = _images(tiny.pipe, switch_at=3)  # the pipeline halves its own batch: same cache slicing
    finally:
        remove_step_cache(unet)
    assert np.array_equal(got, reference)


def test_extract_plans_the_cut_and_a_loaded_fragment_cuts_only_guided_calls(tmp_path):
    prof = api.profile(PROMPT, model="tiny", seeds=2, steps=STEPS, guidance=3.0, out=tmp_path / "p",
                       show_progress=False).out
    r = run_cli("extract", prof, "--guidance-cut", "10", "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f" / "guidance_schedule.json").is_file()
    assert not (tmp_path / "f" / "fragment.safetensors").exists()
    model = load_model("tiny", "cpu", "fp32")
    plain = _images(model.pipe)
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]  # same seed, different prompts
    unguided = model.pipe([PROMPT, "a green square"], num_inference_steps=STEPS, generator=g, guidance_scale=1.0,
                          height=32, width=32, output_type="np").images
    load_fragment(model, tmp_path / "f")
    patch = model.pipe.unet.__dict__["_frag_patches"]["frag.guidance_cut"]
    assert not np.array_equal(_images(model.pipe), plain)
    assert patch.state["cut_calls"] > 0
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    calls = patch.state["cut_calls"]
    again = model.pipe([PROMPT, "a green square"], num_inference_steps=STEPS, generator=g, guidance_scale=1.0,
                       height=32, width=32, output_type="np").images
    assert patch.state["cut_calls"] == calls  # the pipeline ran unguided: nothing is cut
    assert np.array_equal(again, unguided)


def test_bad_input_and_unguided_profiles_are_refused(tmp_path):
    prof = api.profile(PROMPT, model="tiny", seeds=1, steps=4, guidance=3.0, out=tmp_path / "p",
                       show_progress=False).out
    assert_one_line_error(run_cli("extract", prof, "--guidance-cut", "-1", "--out", tmp_path / "g"),
                          "--guidance-cut")
    assert_one_line_error(run_cli("extract", prof, "--guidance-cut", "1e-9", "--out", tmp_path / "g"),
                          "never settles")
    flat = api.profile(PROMPT, model="tiny", seeds=1, steps=4, guidance=1.0, out=tmp_path / "q",
                       show_progress=False).out
    assert_one_line_error(run_cli("extract", flat, "--guidance-cut", "0.1", "--out", tmp_path / "g"),
                          "without classifier-free guidance")
    assert not (tmp_path / "g").exists()


def test_summary_counts_unguided_steps(tiny):
    s = GuidanceCut().summary(_config(tiny.pipe, 4, steps=10), tiny.pipe.unet)
    assert (s.units_total, s.units_removed, s.removed_fraction) == (10, 6, 0.6)


def test_a_halved_batch_reuses_the_conditional_half_of_the_cached_features(tiny):
    unet = tiny.pipe.unet
    branch, modules = deep_modules(unet)
    torch.manual_seed(0)
    size, ch, dim = unet.config.sample_size, unet.config.in_channels, unet.config.cross_attention_dim
    x = torch.randn(1, ch, size, size)
    ctx = torch.randn(2, 77, dim)  # [uncond, cond]
    t1, t2 = torch.tensor([900]), torch.tensor([800])
    grabbed = {}
    with torch.no_grad():
        h = unet.get_submodule(branch).register_forward_hook(lambda m, a, o: grabbed.setdefault("o", o))
        unet(torch.cat([x, x]), t1, encoder_hidden_states=ctx)
        h.remove()
        refs = []
        for half in (slice(1, 2), slice(0, 1)):  # the conditional half, and (to show the test can fail) the other
            h = unet.get_submodule(branch).register_forward_hook(lambda m, a, o, s=half: grabbed["o"][s])
            refs.append(unet(x * 0.9, t2, encoder_hidden_states=ctx[1:]).sample)
            h.remove()
        sc = StepCacheConfig(threshold=0.1, max_reuse=3, branch=branch, modules=modules, timesteps=[900.0, 800.0],
                             computed=[True, False])
        patch = install_step_cache(unet, sc)
        try:
            unet(torch.cat([x, x]), t1, encoder_hidden_states=ctx)
            got = unet(x * 0.9, t2, encoder_hidden_states=ctx[1:]).sample
            assert patch.state["reused"] == 1
        finally:
            remove_step_cache(unet)
    assert torch.equal(got, refs[0])
    assert not torch.equal(got, refs[1])
