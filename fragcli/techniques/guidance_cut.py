"""Guidance cut-off calibrated on the prompt's profile: after the step where the conditional and unconditional
predictions have converged for this prompt, the denoiser runs the conditional half of the batch only.

Classifier-free guidance runs the denoiser on ``[uncond, cond]`` (the batch doubled) and mixes
``uncond + g (cond - uncond)``. Dropping the unconditional branch at a step changes the prediction by
``(g - 1) (cond - uncond)``. The profile's collector records, at every step and seed, how far apart the two
predictions are, in the space that matters for the image: the change they make to the predicted clean latent
``x0`` (through the scheduler's ``alphas_cumprod`` and prediction type: epsilon, v or sample; for flow matching,
SD3 / Flux / flow PixArt, ``x0 = x_t - σ v`` with the scheduler's σ), relative to ``x0``
(``x0_gap``; ``eps_gap`` is the raw relative gap of the predictions). The plan takes ``e_t = (g - 1) x0_gap_t``
(the largest over the profiled seeds) and cuts at the first step after which ``e_t`` stays at or below
``threshold`` to the end. Early steps, where guidance shapes the layout, are always run in full.

The runtime is a named, reversible patch on the denoiser (forward pre-hook + forward hook, no forward copied): on
a guided call at or after the calibrated cut *timestep* (so another step count or scheduler is mapped by timestep,
never by position), the pre-hook keeps the conditional half of every batch-sized input (sample, timestep, text
context, SDXL's added conditions) and the hook returns the conditional prediction for both halves, so the
pipeline's guidance formula yields ``cond`` exactly: the same as guidance 1 from that step on, at half the
denoiser cost. A guided call is one whose latent halves are identical (``torch.cat([latents] * 2)``, as every
diffusers CFG pipeline builds it); on a pipeline loaded with the fragment the pipeline's own
``do_classifier_free_guidance`` is also required, so two different prompts that share a seed are never mistaken
for a guided batch. With the cut after the last step the patched denoiser equals the plain one exactly (a test).

Registered before step caching: the step cache then sees the halved batch as a new shape and recomputes its
deep branch once, rather than reusing features of the doubled batch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, installed, remove_patch, second_half
from fragcli.techniques.base import (
    Collector,
    Plan,
    RuntimeTechnique,
    TechniqueConfig,
    TechniqueSummary,
    threshold_option,
)

PATCH = "frag.guidance_cut"
COLLECT = "frag.guidance_gap"
TABLE = "guidance"
COLUMNS = (("seed", "int64"), ("step", "int32"), ("timestep", "float64"), ("eps_gap", "float64"),
           ("x0_gap", "float64"))
DOCS = {"seed": "generation seed", "step": "index in the schedule, 0-based",
        "timestep": "the scheduler's timestep at that step",
        "eps_gap": "||cond - uncond|| / ||cond|| of the denoiser's two predictions (one row per guided call)",
        "x0_gap": "||x0(cond) - x0(uncond)|| / ||x0(cond)||: how far apart the two predictions put the clean "
                  "latent (flow matching: x0 = x_t - σ v; NaN: the scheduler has neither alphas_cumprod nor "
                  "flow-matching sigmas)"}
DEFAULT_THRESHOLD = 0.05


class GuidanceSchedule(BaseModel):
    """``guidance_schedule.json``: the calibration a guidance cut was planned from."""

    model_config = ConfigDict(extra="forbid")
    type_: Literal["frag.guidance_schedule"] = Field("frag.guidance_schedule", alias="_type")
    schema_version: Literal[1] = 1
    guidance: float = Field(description="the profile's guidance scale g")
    timesteps: list[float] = Field(description="the profile's timestep per step")
    error: list[float | None] = Field(description="per step: (g - 1) x the largest x0_gap over the seeds (what "
                                                  "dropping the unconditional branch changes x0 by, relative)")
    cut_step: int = Field(description="the first step run on the conditional half only")


class GuidanceCutConfig(TechniqueConfig):
    """From which (calibrated) timestep on the unconditional branch is dropped."""

    threshold: float = Field(description="largest relative change of x0 that dropping the unconditional branch may "
                                         "make at any step from the cut on")
    cut_step: int = Field(description="first calibrated step run without the unconditional branch")
    cut_timestep: float = Field(description="the profile's timestep at cut_step: calls at or below it are cut")
    steps: int = Field(description="calibrated steps (the profile's)")


def check_threshold(value) -> float:
    return threshold_option(value, "--guidance-cut", "a positive relative change", str(DEFAULT_THRESHOLD))


def cut_step(error: list[float], threshold: float) -> int | None:
    """First step k >= 1 with every error from k on at or below ``threshold`` (NaN never is); None: no such step."""
    k = None
    for t in range(len(error) - 1, 0, -1):
        if not (math.isfinite(error[t]) and error[t] <= threshold):
            break
        k = t
    return k


# ------------------------------------------------------------------------------------------------- profiling


def flow_sigma(scheduler, t: float):
    """σ at timestep ``t`` for a flow-matching scheduler (``FlowMatch*``, or ``prediction_type`` flow_prediction):
    the scheduler's sigma at its nearest timestep; None for any other scheduler (or before ``set_timesteps``)."""
    import torch

    kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if "FlowMatch" not in type(scheduler).__name__ and kind != "flow_prediction":
        return None
    sigmas, times = getattr(scheduler, "sigmas", None), getattr(scheduler, "timesteps", None)
    if not isinstance(sigmas, torch.Tensor) or not isinstance(times, torch.Tensor) or not len(times) or \
            not math.isfinite(t):
        return None
    i = int((times.to(torch.float64) - t).abs().argmin())
    return sigmas[i].to(torch.float64)


def _x0_scale(scheduler, t: float, x, pred):
    """(x0 of the prediction, |dx0 / dpred|) at timestep ``t``; None where the scheduler gives neither alphas nor
    flow-matching sigmas. Flow matching: x_t = (1 - σ) x0 + σ ε and the denoiser predicts v = ε - x0, so
    x0 = x_t - σ v."""
    import torch

    sigma = flow_sigma(scheduler, t)
    if sigma is not None:
        return x - sigma * pred, sigma
    alphas = getattr(scheduler, "alphas_cumprod", None)
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if alphas is None or not 0 <= int(round(t)) < len(alphas):
        return None
    a = alphas[int(round(t))].to(torch.float64)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if kind == "epsilon":
        return (x - sb * pred) / sa, sb / sa
    if kind == "v_prediction":
        return sa * x - sb * pred, sb
    if kind == "sample":
        return pred, torch.tensor(1.0, dtype=torch.float64)
    return None


def _sample_and_t(args, kwargs):
    import torch

    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else math.nan)
    return sample, t


def guided_batch(sample) -> bool:
    """A classifier-free-guidance batch: even, and its two halves are the same latents."""
    import torch

    if not isinstance(sample, torch.Tensor) or sample.shape[0] < 2 or sample.shape[0] % 2:
        return False
    a, b = sample.chunk(2)
    return torch.equal(a, b)


def _prediction(output):
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def install_guidance_gap(denoiser, recorder) -> Patch:
    """Record eps_gap and x0_gap of every guided denoiser call (idempotent and removable)."""
    import torch

    def install(patch: Patch) -> None:
        def hook(module, args, kwargs, output):
            if not recorder.enabled:
                return
            sample, t = _sample_and_t(args, kwargs)
            if not guided_batch(sample):
                return
            with torch.no_grad():
                pred = _prediction(output).detach().to(torch.float64)
                if pred.ndim == sample.ndim and pred.shape[1] == 2 * sample.shape[1]:
                    pred = pred[:, : sample.shape[1]]  # learned variance (PixArt): the first half is the noise
                u, c = pred.chunk(2)
                diff = (c - u).norm()
                eps_gap = float(diff / c.norm().clamp_min(1e-12))
                got = _x0_scale(getattr(recorder, "scheduler", None), t, sample.chunk(2)[1].to(torch.float64), c)
                x0_gap = math.nan if got is None else float(diff * got[1] / got[0].norm().clamp_min(1e-12))
            recorder.add_rows(TABLE, {"eps_gap": [eps_gap], "x0_gap": [x0_gap]})

        patch.undo.append(denoiser.register_forward_hook(hook, with_kwargs=True).remove)

    return apply_patch(denoiser, COLLECT, install, recorder)


def remove_guidance_gap(denoiser) -> bool:
    return remove_patch(denoiser, COLLECT)


def read_error(profile, guidance: float) -> tuple[list[float], list[float]]:
    """(timestep per step, (g - 1) x the largest x0_gap over the seeds per step) from guidance.parquet."""
    cols = profile.table(TABLE, ("seed", "step", "timestep", "x0_gap")).to_pydict()
    per_step: dict[int, list[float]] = {}
    times: dict[int, float] = {}
    for s, t, g in zip(cols["step"], cols["timestep"], cols["x0_gap"], strict=True):
        per_step.setdefault(int(s), []).append(g if g is not None else math.nan)
        times[int(s)] = float(t)
    steps = sorted(per_step)
    if steps != list(range(len(steps))):
        raise FragError("the guidance cut needs every step profiled (guidance.parquet skips some)",
                        "re-run frag profile")
    err = [(guidance - 1) * max(v) if all(math.isfinite(x) for x in v) else math.nan
           for v in (per_step[s] for s in steps)]
    return [times[s] for s in steps], err


# ------------------------------------------------------------------------------------------------- runtime


def install_guidance_cut(denoiser, config: GuidanceCutConfig) -> Patch:
    """The runtime patch (idempotent; ``remove_guidance_cut`` undoes it). ``patch.state['guided']`` is the
    pipeline-side check (set by ``attach``: the pipeline's ``do_classifier_free_guidance``)."""
    import torch

    def install(patch: Patch) -> None:
        st: dict[str, Any] = {"cut": False, "n": 0, "guided": None, "cut_calls": 0, "full_calls": 0}
        patch.state = st

        def pre(module, args, kwargs):
            sample, t = _sample_and_t(args, kwargs)
            pipe_says = st["guided"]() if st["guided"] is not None else True
            st["cut"] = bool(pipe_says and t <= config.cut_timestep and guided_batch(sample))
            if not st["cut"]:
                st["full_calls"] += 1
                return None
            st["cut_calls"] += 1
            st["n"] = n = sample.shape[0]
            return second_half(tuple(args), n), second_half(dict(kwargs), n)

        def post(module, args, kwargs, output):
            if not st["cut"]:
                return None
            st["cut"] = False
            if isinstance(output, tuple):
                return (torch.cat([output[0], output[0]]), *output[1:])
            if hasattr(output, "sample"):
                output.sample = torch.cat([output.sample, output.sample])
                return output
            return torch.cat([output, output])

        patch.undo.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True).remove)
        patch.undo.append(denoiser.register_forward_hook(post, with_kwargs=True).remove)

    return apply_patch(denoiser, PATCH, install)


def remove_guidance_cut(denoiser) -> bool:
    return remove_patch(denoiser, PATCH)


class GuidanceCut(RuntimeTechnique):
    """Drop the unconditional branch after the step where this prompt's guidance has converged (runtime only)."""

    name = "guidance_cut"
    version = 1
    Config = GuidanceCutConfig
    records = {"guidance_schedule.json": GuidanceSchedule}
    options = {"guidance_cut": None}

    def collectors(self) -> list[Collector]:
        return [Collector("guidance_gap", TABLE, list(COLUMNS), install_guidance_gap, remove_guidance_gap, DOCS)]

    def plan(self, profile, options: dict) -> Plan | None:
        if options.get("guidance_cut") is None:
            return None
        threshold = check_threshold(options["guidance_cut"])
        g = float(profile.context.get("guidance") or 0.0)
        if g <= 1:
            raise FragError(f"the profile ran without classifier-free guidance (guidance {g:g}): there is no "
                            "unconditional branch to drop", "drop --guidance-cut")
        if (profile.context.get("rows") or {}).get(TABLE) == 0:
            raise FragError("the profiled denoiser never ran a classifier-free-guidance batch: its guidance is "
                            "distilled (an input of the denoiser, as in Flux), there is no unconditional branch to "
                            "drop", "drop --guidance-cut")
        times, err = read_error(profile, g)
        if not any(math.isfinite(e) for e in err):
            raise FragError(f"the profile has no x0 gap for its scheduler ({profile.context.get('scheduler')}): "
                            "frag cannot tell what dropping guidance would change", "drop --guidance-cut")
        k = cut_step(err, threshold)
        if k is None:
            last = err[-1]
            raise FragError(f"this prompt's guidance never settles at or below {threshold:g} (last step: "
                            f"{last:.3g})", f"pass --guidance-cut {max(last, threshold) * 1.5:.2g} or more, or drop it")
        config = GuidanceCutConfig(threshold=threshold, cut_step=k, cut_timestep=times[k], steps=len(times))
        record = GuidanceSchedule(guidance=g, timesteps=times, cut_step=k,
                                  error=[e if math.isfinite(e) else None for e in err]).model_dump(by_alias=True)
        return Plan(config, record, "guidance_schedule.json")

    def check(self, denoiser, config: GuidanceCutConfig) -> None:
        if not 1 <= config.cut_step < config.steps:
            raise FragError(f"the guidance cut step {config.cut_step} is outside the {config.steps} calibrated steps",
                            "re-run frag extract")

    def install(self, denoiser, config: GuidanceCutConfig) -> Patch:
        return install_guidance_cut(denoiser, config)

    def attach(self, pipe, config: GuidanceCutConfig, tensors, *, evict=None, reload=None) -> Patch | None:
        """On a loaded pipeline, cut only calls the pipeline itself runs with classifier-free guidance."""
        for name in ("unet", "transformer"):
            den = getattr(pipe, name, None)
            patch = installed(den).get(PATCH) if den is not None else None
            if patch is not None and hasattr(type(pipe), "do_classifier_free_guidance"):
                patch.state["guided"] = lambda: bool(pipe.do_classifier_free_guidance)
        return None

    def summary(self, config: GuidanceCutConfig, denoiser) -> TechniqueSummary:
        cut = config.steps - config.cut_step
        return TechniqueSummary(unit="guided_steps", units_total=config.steps, units_removed=cut,
                                removed_fraction=cut / config.steps,
                                details={"threshold": config.threshold, "cut_step": config.cut_step,
                                         "cut_timestep": config.cut_timestep})
