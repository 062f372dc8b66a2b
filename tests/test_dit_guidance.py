"""Guidance levers on every scheduler: the x0 gap of flow matching (x0 = x_t - σ v) lets the guidance cut plan on
SD3; Flux (distilled guidance, no CFG batch) and joint-attention models refuse the guidance cut and the
cross-attention gate with the true reason."""

import pytest
import torch

from fragcli.errors import FragError
from fragcli.techniques.cross_attn_gate import CrossAttnGate
from fragcli.techniques.guidance_cut import GuidanceCut, _x0_scale, flow_sigma


def test_flow_matching_x0_is_x_minus_sigma_v():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for i in (0, 2, 5):
        t = float(sched.timesteps[i])
        sigma = float(sched.sigmas[i])
        assert float(flow_sigma(sched, t)) == pytest.approx(sigma)
        xt = (1 - sigma) * x0 + sigma * eps
        got, scale = _x0_scale(sched, t, xt.double(), (eps - x0).double())
        torch.testing.assert_close(got.float(), x0, atol=1e-5, rtol=0)
        assert float(scale) == pytest.approx(sigma)
    from diffusers import DDIMScheduler

    assert flow_sigma(DDIMScheduler(), 500.0) is None  # alphas_cumprod schedulers keep their own formula


class _Profile:
    def __init__(self, rows):
        self.context = {"guidance": 3.5, "rows": rows, "scheduler": "FlowMatchEulerDiscreteScheduler"}
        self.folder = None

    def table(self, *a, **k):
        raise FragError("no rows", "re-run frag profile")  # what the plans said before: never reached now


def test_distilled_guidance_and_joint_attention_refuse_with_the_true_reason():
    with pytest.raises(FragError) as e:
        GuidanceCut().plan(_Profile({"guidance": 0}), {"guidance_cut": 0.05})
    assert "distilled" in e.value.problem and "re-run" not in (e.value.fix or "")
    with pytest.raises(FragError) as e:
        CrossAttnGate().plan(_Profile({"cross_attn": 0}), {"cross_attn_gate": 0.05})
    assert "jointly" in e.value.problem and "re-run" not in (e.value.fix or "")
