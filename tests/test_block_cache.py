"""Block caching on transformer denoisers (Flux dual+single stream, SD3 joint blocks, PixArt): exact when nothing is
reused (threshold 0), reuses when the threshold is large (first and last steps computed, max reuse held), removable;
the calibration keeps every simulated reuse within the budget."""

import math

import pytest
import torch

from fragcli.errors import FragError
from fragcli.techniques.block_cache import (
    BlockCache,
    BlockCacheConfig,
    block_cache_state,
    block_names,
    calibrate,
    install_block_cache,
    remove_block_cache,
    simulate,
)
from tests import dit_helpers as H

TIMES = [900.0, 700.0, 500.0, 300.0, 100.0]


def _config(model, tau: float, first: int = 1, max_reuse: int = 2) -> BlockCacheConfig:
    scale = 1000 if type(model).__name__.startswith("Flux") else 1  # Flux's pipeline passes t / 1000, as here
    return BlockCacheConfig(threshold=0.1, residual_threshold=tau, first_blocks=first, max_reuse=max_reuse,
                            blocks=block_names(model), timesteps=[t / scale for t in TIMES],
                            computed=[True] * len(TIMES))


def _generation(model, kind):
    """One generation: the latent moves a little at every step, as in a sampler."""
    torch.manual_seed(1)
    x = H.inputs(kind)["hidden_states"]
    outs = []
    for t in TIMES:
        out = H.run(model, kind, t=t, sample=x)
        outs.append(out)
        x = x - 0.05 * out[:, : x.shape[1]] if out.shape == x.shape or kind != "pixart" else x - 0.05 * out[:, :4]
    return outs


@pytest.mark.parametrize("kind", ["flux", "sd3", "pixart"])
def test_exact_when_nothing_is_reused_and_reuses_with_a_large_threshold(kind):
    model = H.BUILD[kind](layers=2) if kind != "flux" else H.flux(layers=2, single=2)
    plain = _generation(model, kind)
    BlockCache().check(model, _config(model, 0.0))
    install_block_cache(model, _config(model, 0.0))
    exact = _generation(model, kind)
    st = block_cache_state(model)
    assert st["reused"] == 0 and st["computed"] == len(TIMES)
    remove_block_cache(model)
    for a, b in zip(exact, plain, strict=True):
        assert (a - b).abs().max() <= 1e-6
    install_block_cache(model, _config(model, 1e9, max_reuse=2))
    cached = _generation(model, kind)
    st = block_cache_state(model)
    # step 0 computed (no reference), steps 1-2 reused, step 3 computed (max reuse 2), step 4 the last: computed
    assert (st["computed"], st["reused"]) == (3, 2)
    assert torch.equal(cached[0], plain[0])
    assert (cached[1] - plain[1]).abs().max() > 1e-6 and all(torch.isfinite(c).all() for c in cached)
    remove_block_cache(model)
    assert block_cache_state(model) is None
    again = _generation(model, kind)
    assert all(torch.equal(a, b) for a, b in zip(again, plain, strict=True))


@pytest.mark.parametrize("kind", ["flux", "pixart"])
def test_a_reused_call_adds_the_cached_residual_of_the_middle_blocks(kind):
    """After the last block: h = h_head(now) + (h_last - h_head)(last computed call), image and text tokens."""
    model = H.flux(layers=1, single=2) if kind == "flux" else H.pixart(layers=3)
    names = block_names(model)
    seen = []
    head, last = model.get_submodule(names[0]), model.get_submodule(names[-1])
    head.register_forward_hook(lambda m, a, o: seen.append(("head", o)))
    last.register_forward_hook(lambda m, a, o: seen.append(("last", o)))
    install_block_cache(model, _config(model, 1e9, max_reuse=5))
    _generation(model, kind)
    assert block_cache_state(model)["reused"] == 3  # steps 1, 2, 3; 0 and the last computed
    remove_block_cache(model)
    outs = [o for _, o in seen]
    as_pairs = [(o if isinstance(o, tuple) else (None, o)) for o in outs]
    (c_h0, h_h0), (c_l0, h_l0) = as_pairs[0], as_pairs[1]
    for step in (1, 2, 3):
        (c_h, h_h), (c_l, h_l) = as_pairs[2 * step], as_pairs[2 * step + 1]
        torch.testing.assert_close(h_l, h_h + (h_l0 - h_h0), rtol=0, atol=1e-6)
        if kind == "flux":
            torch.testing.assert_close(c_l, c_h + (c_l0 - c_h0), rtol=0, atol=1e-6)


def test_simulate_and_calibrate_keep_the_budget():
    diffs = [(math.nan, math.nan), (0.5, 0.5), (0.05, 0.02), (0.05, 0.03), (0.04, 0.2), (0.01, 0.01), (0.3, 0.3)]
    computed, errors = simulate(diffs, 0.2, max_reuse=6)
    assert computed[0] and computed[-1]
    assert computed == [True, True, False, False, False, False, True]
    tau, reused, least = calibrate({0: diffs}, budget=0.1, max_reuse=6)
    comp, errs = simulate(diffs, tau, 6)
    assert reused == sum(not c for c in comp) >= 2
    assert all(e <= 0.1 for e in errs if e is not None)
    assert least <= 0.1
    assert calibrate({0: diffs}, budget=0.001, max_reuse=6)[1] == 0


def test_a_unet_is_refused_with_the_true_reason():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                norm_num_groups=16, sample_size=8, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(FragError) as e:
        block_names(unet)
    assert "UNet2DConditionModel" in e.value.problem and "--step-cache" in e.value.fix
