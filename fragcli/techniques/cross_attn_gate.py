"""Cross-attention gating calibrated on the prompt's profile (T-GATE's idea): once the cross-attention outputs
stop changing for this prompt, every cross-attention module returns its last computed output instead of
attending to the text again.

The profile's collector records, at every step and seed, the cosine between each cross-attention module's output
and its output at the previous step (``cross_attn.parquet``, ``cos_prev``). The plan takes the step drift
``d_t = max over modules and seeds of (1 - cos_prev)`` and gates from the first step ``k`` after which the drift
accumulated to the end, ``sum_{t >= k} d_t``, stays at or below ``threshold``: the outputs reused from step ``k-1``
then differ from what would have been computed by about that much. Early steps always attend.

The runtime is the step cache's machinery (``fragcli.techniques.step_cache.install_step_cache``: wrapped
``forward``s, generations told apart, schedule by nearest calibrated timestep, a halved batch keeps the conditional
half) under its own patch name, on the cross-attention modules with every step from ``k`` on served from the
cache. With the gate after the last step the patched denoiser equals the plain one exactly (a test). T-GATE also
drops the unconditional branch after its gate; here that is the separate ``guidance_cut`` technique, chosen from
its own measurement.
"""

from __future__ import annotations

import math

from pydantic import Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.techniques.base import (
    Collector,
    Plan,
    RuntimeTechnique,
    TechniqueConfig,
    TechniqueSummary,
    threshold_option,
)

PATCH = "frag.cross_attn_gate"
COLLECT = "frag.cross_attn_drift"
TABLE = "cross_attn"
COLUMNS = (("module", "string"), ("seed", "int64"), ("step", "int32"), ("timestep", "float64"),
           ("cos_prev", "float64"))
DOCS = {"module": "a cross-attention module (`attn2`) of the denoiser", "seed": "generation seed",
        "step": "index in the schedule, 0-based", "timestep": "the scheduler's timestep at that step",
        "cos_prev": "cosine between the module's output and its output at the previous step (NaN at step 0)"}


class CrossAttnGateConfig(TechniqueConfig):
    """Which cross-attention modules are gated, from which calibrated step on."""

    threshold: float = Field(description="largest drift (1 - cosine, summed over the gated steps) of the reused "
                                         "cross-attention outputs")
    gate_step: int = Field(description="first calibrated step whose cross-attention outputs are reused")
    modules: list[str] = Field(description="the gated cross-attention modules")
    timesteps: list[float] = Field(description="the profile's timesteps, one per calibrated step")

    @property
    def computed(self) -> list[bool]:
        return [i < self.gate_step for i in range(len(self.timesteps))]

    @property
    def max_reuse(self) -> int:
        return len(self.timesteps)


def cross_attention_modules(denoiser) -> list[str]:
    """Names of the denoiser's cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``)."""
    from diffusers.models.attention_processor import Attention

    return [n for n, m in denoiser.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def check_threshold(value) -> float:
    return threshold_option(value, "--cross-attn-gate", "a positive drift", "0.05")


def gate_step(drift: list[float], threshold: float) -> int | None:
    """Smallest k >= 1 with the drift summed from k to the end at or below ``threshold`` (NaN never is)."""
    k, acc = None, 0.0
    for t in range(len(drift) - 1, 0, -1):
        acc += drift[t] if math.isfinite(drift[t]) else math.inf
        if acc > threshold:
            break
        k = t
    return k


def install_drift(denoiser, recorder) -> Patch:
    """Record cos_prev of every cross-attention module's output at every step (idempotent, removable)."""
    import torch

    names = cross_attention_modules(denoiser)
    modules = dict(denoiser.named_modules())

    def install(patch: Patch) -> None:
        previous: dict[str, torch.Tensor] = {}

        def make(name: str):
            def hook(module, args, output):
                if not recorder.enabled or not isinstance(output, torch.Tensor):
                    return
                with torch.no_grad():
                    o = output.detach().float()
                    prev = previous.get(name)
                    cos = math.nan
                    if prev is not None and prev.shape == o.shape and recorder.step > 0:
                        cos = float(torch.nn.functional.cosine_similarity(o.flatten(), prev.flatten(), dim=0))
                    previous[name] = o.clone()
                recorder.add_rows(TABLE, {"module": [name], "cos_prev": [cos]})

            return hook

        for name in names:
            patch.undo.append(modules[name].register_forward_hook(make(name)).remove)
        patch.undo.append(previous.clear)

    return apply_patch(denoiser, COLLECT, install, recorder)


def remove_drift(denoiser) -> bool:
    return remove_patch(denoiser, COLLECT)


def read_drift(profile) -> tuple[list[str], list[float], list[float]]:
    """(modules, timestep per step, max over modules and seeds of 1 - cos_prev per step) from cross_attn.parquet."""
    cols = profile.table(TABLE, ("module", "step", "timestep", "cos_prev")).to_pydict()
    per_step: dict[int, list[float]] = {}
    times: dict[int, float] = {}
    for s, t, c in zip(cols["step"], cols["timestep"], cols["cos_prev"], strict=True):
        per_step.setdefault(int(s), []).append(1.0 - c if c is not None and math.isfinite(c) else math.nan)
        times[int(s)] = float(t)
    steps = sorted(per_step)
    if steps != list(range(len(steps))):
        raise FragError("the cross-attention gate needs every step profiled", "re-run frag profile")
    drift = [max(v) if all(math.isfinite(x) for x in v) else math.nan for v in (per_step[s] for s in steps)]
    return sorted(set(cols["module"])), [times[s] for s in steps], drift


def install_gate(denoiser, config: CrossAttnGateConfig) -> Patch:
    from fragcli.techniques.step_cache import install_step_cache

    return install_step_cache(denoiser, config, PATCH)


def remove_gate(denoiser) -> bool:
    return remove_patch(denoiser, PATCH)


class CrossAttnGate(RuntimeTechnique):
    """Reuse the cross-attention outputs once the profile shows them settled (runtime only)."""

    name = "cross_attn_gate"
    version = 1
    Config = CrossAttnGateConfig
    options = {"cross_attn_gate": None}

    def collectors(self) -> list[Collector]:
        return [Collector("cross_attn_drift", TABLE, list(COLUMNS), install_drift, remove_drift, DOCS)]

    def plan(self, profile, options: dict) -> Plan | None:
        if options.get("cross_attn_gate") is None:
            return None
        threshold = check_threshold(options["cross_attn_gate"])
        if (profile.context.get("rows") or {}).get(TABLE) == 0:
            raise FragError("the profiled denoiser has no separate cross-attention to gate: it attends to the text "
                            "and image tokens jointly (SD3, Flux)", "drop --cross-attn-gate")
        modules, times, drift = read_drift(profile)
        k = gate_step(drift, threshold)
        if k is None:
            raise FragError(f"this prompt's cross-attention outputs still drift more than {threshold:g} over the "
                            f"last step alone ({drift[-1]:.3g})", "pass a larger --cross-attn-gate, or drop it")
        return Plan(CrossAttnGateConfig(threshold=threshold, gate_step=k, modules=modules, timesteps=times))

    def check(self, denoiser, config: CrossAttnGateConfig) -> None:
        have = set(cross_attention_modules(denoiser))
        missing = [m for m in config.modules if m not in have]
        if missing:
            raise FragError(f"the cross-attention gate names {missing[0]}, which is not a cross-attention module of "
                            f"this {type(denoiser).__name__}", "re-run frag extract for this model")
        if not 1 <= config.gate_step < len(config.timesteps):
            raise FragError(f"the gate step {config.gate_step} is outside the {len(config.timesteps)} calibrated steps",
                            "re-run frag extract")

    def install(self, denoiser, config: CrossAttnGateConfig) -> Patch:
        return install_gate(denoiser, config)

    def summary(self, config: CrossAttnGateConfig, denoiser) -> TechniqueSummary:
        n = len(config.timesteps)
        gated = n - config.gate_step
        return TechniqueSummary(unit="cross_attention_steps", units_total=n, units_removed=gated,
                                removed_fraction=gated / n,
                                details={"threshold": config.threshold, "gate_step": config.gate_step,
                                         "modules": len(config.modules)})
