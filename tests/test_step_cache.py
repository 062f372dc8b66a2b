"""Step caching (``fragcli/techniques/step_cache.py``): exact when nothing is reused, DeepCache's cut when it is,
reset between generations, planned from the profile, saved and loaded as a runtime-only fragment."""

import numpy as np
import pytest
import torch

from fragcli import api
from fragcli.errors import FragError
from fragcli.fragment import load_fragment
from fragcli.models import load_model
from fragcli.techniques.step_cache import (
    StepCache,
    StepCacheConfig,
    deep_modules,
    install_step_cache,
    remove_step_cache,
    schedule,
)
from tests.helpers import assert_one_line_error, run_cli, unet_inputs

PROMPT = "a red circle on a blue background"


def _config(unet, computed, timesteps=None, max_reuse=3):
    branch, modules = deep_modules(unet)
    timesteps = timesteps or [float(999 - 100 * i) for i in range(len(computed))]
    return StepCacheConfig(threshold=0.02, max_reuse=max_reuse, branch=branch, modules=modules,
                           timesteps=timesteps, computed=computed)


def _images(pipe, seed=0, steps=4, n=1):
    g = torch.Generator().manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=steps, generator=g, guidance_scale=3.0, height=32, width=32,
               output_type="np", num_images_per_prompt=n)
    return out.images


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu", "fp32")


def test_schedule_from_drift():
    drift = [float("nan"), 0.5, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001]
    assert schedule(drift, 0.0, 3) == [True] * 9  # nothing may drift: every step computed
    assert schedule(drift, 0.025, 3) == [True, True, False, False, True, False, False, False, True]
    assert schedule(drift, 0.9, 2) == [True, False, False, True, False, False, True, False, False]
    assert schedule([float("nan"), float("nan"), 0.0], 0.5, 3) == [True, True, False]  # unknown drift: computed


def test_nothing_reused_equals_the_plain_pipeline_exactly(tiny):
    plain = _images(tiny.pipe)
    patch = install_step_cache(tiny.pipe.unet, _config(tiny.pipe.unet, [True] * 4))
    try:
        cached = _images(tiny.pipe)
        assert patch.state["reused"] == 0 and patch.state["computed"] == 4
    finally:
        remove_step_cache(tiny.pipe.unet)
    assert np.array_equal(plain, cached)
    assert "forward" not in tiny.pipe.unet.mid_block.__dict__  # the wrap is undone
    assert np.array_equal(_images(tiny.pipe), plain)


def test_a_reuse_step_is_deepcache_cut_and_skips_the_deep_modules(tiny):
    unet = tiny.pipe.unet
    branch, modules = deep_modules(unet)
    x, _, ctx = unet_inputs(unet)
    t1, t2 = torch.tensor([900]), torch.tensor([800])
    grabbed = {}
    h = unet.get_submodule(branch).register_forward_hook(lambda m, a, o: grabbed.setdefault("o", o))
    with torch.no_grad():
        unet(x, t1, encoder_hidden_states=ctx)
        h.remove()
        h = unet.get_submodule(branch).register_forward_hook(lambda m, a, o: grabbed["o"])
        x2 = x * 0.9
        reference = unet(x2, t2, encoder_hidden_states=ctx).sample  # the last up block reads step 1's features
        h.remove()
        calls = []
        hooks = [sub.register_forward_pre_hook(lambda mod, a, n=m: calls.append(n))  # the insides: real work
                 for m in modules for sub in unet.get_submodule(m).modules()
                 if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear))]
        install_step_cache(unet, _config(unet, [True, False], timesteps=[900.0, 800.0]))
        try:
            unet(x, t1, encoder_hidden_states=ctx)
            assert sorted(set(calls)) == sorted(modules)
            calls.clear()
            got = unet(x2, t2, encoder_hidden_states=ctx).sample
        finally:
            remove_step_cache(unet)
            for hk in hooks:
                hk.remove()
    assert calls == []  # nothing of the deep branch ran
    assert torch.equal(got, reference)


def test_state_resets_between_generations_and_batch_sizes(tiny):
    a = _images(tiny.pipe, seed=0)
    install_step_cache(tiny.pipe.unet, _config(tiny.pipe.unet, [True, False, True, False]))
    try:
        first = _images(tiny.pipe, seed=0)
        _images(tiny.pipe, seed=1, n=2)  # another seed and batch size in between
        again = _images(tiny.pipe, seed=0)
        patch_state = tiny.pipe.unet.__dict__["_frag_patches"]["frag.step_cache"].state
        assert patch_state["reused"] > 0
    finally:
        remove_step_cache(tiny.pipe.unet)
    assert np.array_equal(first, again)  # no features leak from one generation into the next
    assert not np.array_equal(first, a)  # and reuse did change the result (the test can fail)


def test_a_schedule_for_other_step_counts_maps_by_timestep(tiny):
    patch = install_step_cache(tiny.pipe.unet, _config(tiny.pipe.unet, [True] + [False] * 9,
                                                       timesteps=[float(999 - 111 * i) for i in range(10)],
                                                       max_reuse=2))
    try:
        _images(tiny.pipe, steps=7)
        st = patch.state
        assert st["computed"] + st["reused"] == 7
        assert st["computed"] == 3 and st["reused"] == 4  # max_reuse still bounds every run of reuse
    finally:
        remove_step_cache(tiny.pipe.unet)


def test_refuses_denoisers_without_a_unet_layout():
    with pytest.raises(FragError, match="Linear"):
        deep_modules(torch.nn.Linear(2, 2))


def test_extract_plans_from_the_profile_and_the_fragment_loads_with_no_delta(tmp_path):
    prof = api.profile(PROMPT, model="tiny", seeds=2, steps=6, out=tmp_path / "p", show_progress=False).out
    r = run_cli("extract", prof, "--step-cache", "0.5", "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f" / "step_schedule.json").is_file()
    assert not (tmp_path / "f" / "fragment.safetensors").exists()
    model = load_model("tiny", "cpu", "fp32")
    plain = _images(model.pipe, steps=6)
    load_fragment(model, tmp_path / "f")
    cfg = model.pipe.unet.__dict__["_frag_patches"]["frag.step_cache"]
    assert cfg is not None
    cached = _images(model.pipe, steps=6)
    assert cached.shape == plain.shape and not np.array_equal(cached, plain)
    assert_one_line_error(run_cli("extract", prof, "--step-cache", "1.5", "--out", tmp_path / "g"), "--step-cache")
    assert_one_line_error(run_cli("extract", prof, "--step-cache", "0.1", "--step-cache-max-reuse", "0",
                                  "--out", tmp_path / "g"), "--step-cache-max-reuse 0")
    assert not (tmp_path / "g").exists()


def test_summary_counts_reused_steps(tiny):
    s = StepCache().summary(_config(tiny.pipe.unet, [True, False, False, True]), tiny.pipe.unet)
    assert (s.units_total, s.units_removed, s.removed_fraction) == (4, 2, 0.5)
