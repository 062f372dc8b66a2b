"""Step caching with a schedule calibrated on the prompt's profile: the deep UNet branch is reused on the steps
where the profile says its output hardly changes.

On a *reuse* step the UNet computes only its shallow path (time embedding, ``conv_in``, the first down block, the
last up block, ``conv_out``); the deep branch (every other down block, the mid block and every up block but the
last) returns the outputs it produced on the last *computed* step. That is DeepCache's cut (branch 0: the last up
block reads the cached features of the one before it, plus fresh skip connections from the first down block),
with the schedule taken from the profile instead of a fixed interval:

- ``blocks.parquet`` records, for every block, step and seed, the cosine between the block's output and its output
  on the previous step (``cos_prev``). For the cached branch (``up_blocks[-2]``, the input of the last up block),
  the drift of step ``t`` is ``1 - cos_prev`` (the largest over the profiled seeds). Step 0 is computed; a later
  step is reused while the drift accumulated since the last computed step stays at or below ``threshold`` and at
  most ``max_reuse`` steps run in a row from the cache; otherwise it is computed. Early steps, where features move
  fast, are computed; late ones are mostly reused.
- The schedule is stored by *timestep* (the profile's), so a different step count or scheduler maps each call to
  the nearest calibrated timestep (``max_reuse`` still applies): it adapts, it is never applied by position.

The runtime is a named, reversible patch on the denoiser: a forward pre-hook follows the steps (a new generation
starts when the timestep rises or the input's shape changes; several calls at the same timestep, e.g. a pipeline
that runs the two guidance branches separately, are told apart and cached separately; a batch that halves within
a generation, as after a guidance cut-off, keeps the conditional half of the cache), and each deep module's
``forward`` is wrapped (not copied) so that on a reuse step it returns its cached output. With every step computed
the patched UNet equals the plain one exactly (a test). No tensor changes: a step-cache fragment has no weight delta.

UNet2DConditionModel only (SD 1.5, SDXL); DiT denoisers are refused with the module named (their lever is the
block cache, ``fragcli.techniques.block_cache``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch, second_half
from fragcli.techniques.base import (
    Plan,
    RuntimeTechnique,
    TechniqueConfig,
    TechniqueSummary,
    threshold_option,
)

PATCH = "frag.step_cache"
DEFAULT_THRESHOLD = 0.02
DEFAULT_MAX_REUSE = 4


class StepSchedule(BaseModel):
    """``step_schedule.json``: the calibration a step-cache fragment was planned from."""

    model_config = ConfigDict(extra="forbid")
    type_: Literal["frag.step_schedule"] = Field("frag.step_schedule", alias="_type")
    schema_version: Literal[1] = 1
    branch: str = Field(description="the cached module")
    timesteps: list[float] = Field(description="the profile's timestep per step")
    drift: list[float | None] = Field(description="per step: largest 1 - cos_prev of the branch over the seeds "
                                                  "(null: not measured, step 0)")
    computed: list[bool] = Field(description="per step: computed (true) or served from the cache")


class StepCacheConfig(TechniqueConfig):
    """Which deep modules are reused, and on which (calibrated) timesteps they are computed."""

    threshold: float = Field(description="accumulated drift (1 - cosine of the cached branch's output between "
                                         "steps) above which a step is computed")
    max_reuse: int = Field(DEFAULT_MAX_REUSE, description="most consecutive steps served from the cache")
    branch: str = Field(description="the module whose cached output the last up block reads (up_blocks[-2])")
    modules: list[str] = Field(description="the deep modules skipped on reuse steps")
    timesteps: list[float] = Field(description="the profile's timesteps, one per calibrated step")
    computed: list[bool] = Field(description="per calibrated step: computed (true) or reused (false)")


def _top_blocks(denoiser) -> tuple[list[str], list[str]]:
    """(down block names, up block names) of a UNet2DConditionModel; FragError for other denoisers."""
    kind = type(denoiser).__name__
    downs, ups = getattr(denoiser, "down_blocks", None), getattr(denoiser, "up_blocks", None)
    if downs is None or ups is None or getattr(denoiser, "mid_block", None) is None:
        raise FragError(f"step caching needs a UNet with down, mid and up blocks; the denoiser is a {kind}",
                        "use --block-cache for a transformer denoiser")
    if len(downs) < 2 or len(ups) < 2:
        raise FragError(f"step caching needs at least two down and two up blocks; this {kind} has "
                        f"{len(downs)} and {len(ups)}", "drop --step-cache for this model")
    return [f"down_blocks.{i}" for i in range(len(downs))], [f"up_blocks.{i}" for i in range(len(ups))]


def deep_modules(denoiser) -> tuple[str, list[str]]:
    """(the cached branch, every module skipped on a reuse step)."""
    downs, ups = _top_blocks(denoiser)
    return ups[-2], [*downs[1:], "mid_block", *ups[:-1]]


def check_threshold(value) -> float:
    return threshold_option(value, "--step-cache", "a drift in [0, 1)",
                            f"{DEFAULT_THRESHOLD} (reuse while the deep features drift <2%)", zero_ok=True, below_one=True)


def schedule(drift: list[float], threshold: float, max_reuse: int) -> list[bool]:
    """Computed (True) or reused per step, from each step's drift (NaN = unknown: computed)."""
    out, acc, run = [], 0.0, 0
    for t, d in enumerate(drift):
        acc += d if math.isfinite(d) else math.inf
        if t == 0 or acc > threshold or run >= max_reuse:
            out.append(True)
            acc, run = 0.0, 0
        else:
            out.append(False)
            run += 1
    return out


def read_drift(profile, branch: str) -> tuple[list[float], list[float]]:
    """(timestep per step, largest 1 - cos_prev over the seeds per step) of ``branch`` from blocks.parquet."""
    cols = profile.table("blocks", ("block", "seed", "step", "timestep", "cos_prev")).to_pydict()
    per_step: dict[int, list[float]] = {}
    times: dict[int, float] = {}
    for b, s, t, c in zip(cols["block"], cols["step"], cols["timestep"], cols["cos_prev"], strict=True):
        if b == branch:
            per_step.setdefault(int(s), []).append(1.0 - c if c is not None and math.isfinite(c) else math.nan)
            times[int(s)] = float(t)
    if not per_step:
        raise FragError(f"the profile's blocks.parquet has no rows for {branch}", "re-run frag profile")
    steps = sorted(per_step)
    if steps != list(range(len(steps))):
        raise FragError("step caching needs every step profiled (the profile skipped some)",
                        "re-run frag profile without --profile-steps")
    drift = [max(v) if all(math.isfinite(x) for x in v) else math.nan for v in (per_step[s] for s in steps)]
    return [times[s] for s in steps], drift


def halved(before: tuple | None, now: tuple | None) -> bool:
    """The batch went from 2B to B with the same latent shape."""
    return bool(before and now and len(before) == len(now) and before[0] == 2 * now[0] and before[1:] == now[1:])


def install_step_cache(denoiser, config: StepCacheConfig, name: str = PATCH) -> Patch:
    """The runtime patch (idempotent: a second install returns the first; ``remove_step_cache`` undoes it).

    Generic over ``config.modules`` / ``timesteps`` / ``computed`` / ``max_reuse`` (any object with them): the
    cross-attention gate installs the same machinery on the cross-attention modules under its own ``name``."""
    import torch

    modules = dict(denoiser.named_modules())
    missing = [m for m in config.modules if m not in modules]
    if missing:
        raise FragError(f"step caching: the denoiser has no module {missing[0]}", "re-run frag extract")
    calibrated = torch.tensor(config.timesteps, dtype=torch.float64)

    def install(patch: Patch) -> None:
        st: dict[str, Any] = {"t": None, "shape": None, "call": 0, "reuse": 0, "skip": False, "cache": {},
                              "computed": 0, "reused": 0}
        patch.state = st

        def pre(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample")
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
            if halved(st["shape"], shape) and st["t"] is not None and t <= st["t"]:
                # the same generation on half the batch (a guidance cut dropped the unconditional half): the
                # cached features keep their second, conditional half
                n = st["shape"][0]
                st["cache"].update({k: second_half(v, n) for k, v in st["cache"].items()})
                st["shape"] = shape
            if st["t"] is None or t > st["t"] or shape != st["shape"]:  # a new generation
                st["cache"].clear()
                st["call"], st["reuse"] = 0, 0
            elif t == st["t"]:
                st["call"] += 1  # another call at the same step
            else:
                st["call"] = 0
            first_call = st["call"] == 0
            if first_call and t != st["t"]:
                i = int((calibrated - t).abs().argmin())
                ready = all((0, m) in st["cache"] for m in config.modules)
                reuse = ready and not config.computed[i] and st["reuse"] < config.max_reuse
                st["reuse"] = st["reuse"] + 1 if reuse else 0
                st["step_reuse"] = reuse
            st["t"], st["shape"] = t, shape
            st["skip"] = st.get("step_reuse", False) and all((st["call"], m) in st["cache"] for m in config.modules)
            st["reused" if st["skip"] else "computed"] += 1

        def wrap(name: str, mod):
            original = mod.forward

            def forward(*args, **kwargs):
                key = (st["call"], name)
                if st["skip"]:
                    return st["cache"][key]
                out = original(*args, **kwargs)
                st["cache"][key] = out
                return out

            mod.forward = forward
            patch.undo.append(lambda: mod.__dict__.pop("forward", None))

        for module_name in config.modules:
            wrap(module_name, modules[module_name])
        patch.undo.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True).remove)
        patch.undo.append(st["cache"].clear)

    return apply_patch(denoiser, name, install)


def remove_step_cache(denoiser) -> bool:
    return remove_patch(denoiser, PATCH)


class StepCache(RuntimeTechnique):
    """Reuse the deep UNet branch on the steps where the profile shows its output is stable (runtime only)."""

    name = "step_cache"
    version = 1
    Config = StepCacheConfig
    records = {"step_schedule.json": StepSchedule}
    options = {"step_cache": None, "step_cache_max_reuse": DEFAULT_MAX_REUSE}

    def plan(self, profile, options: dict) -> Plan | None:
        if options.get("step_cache") is None:
            return None
        threshold = check_threshold(options["step_cache"])
        max_reuse = options.get("step_cache_max_reuse")
        max_reuse = DEFAULT_MAX_REUSE if max_reuse is None else max_reuse
        if isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 1:
            raise FragError(f"--step-cache-max-reuse {max_reuse} is not a whole number >= 1", "pass e.g. 3")
        names = sorted({b for b in profile.table("blocks", ("block",)).column("block").to_pylist()
                        if b.count(".") == 1 and b.startswith(("down_blocks.", "up_blocks."))},
                       key=lambda n: (n.split(".")[0], int(n.split(".")[1])))
        downs = [n for n in names if n.startswith("down_blocks.")]
        ups = [n for n in names if n.startswith("up_blocks.")]
        if len(downs) < 2 or len(ups) < 2:
            raise FragError("step caching needs a UNet profile with at least two down and two up blocks",
                            "use --block-cache for a transformer denoiser")
        branch = ups[-2]
        times, drift = read_drift(profile, branch)
        computed = schedule(drift, threshold, max_reuse)
        config = StepCacheConfig(threshold=threshold, max_reuse=max_reuse, branch=branch,
                                 modules=[*downs[1:], "mid_block", *ups[:-1]], timesteps=times, computed=computed)
        record = StepSchedule(branch=branch, timesteps=times, computed=computed,
                              drift=[d if math.isfinite(d) else None for d in drift]).model_dump(by_alias=True)
        return Plan(config, record, "step_schedule.json")

    def check(self, denoiser, config: StepCacheConfig) -> None:
        branch, modules = deep_modules(denoiser)
        if branch != config.branch or modules != config.modules:
            raise FragError(f"the step schedule caches {config.branch}, this denoiser's branch is {branch}",
                            "re-run frag extract for this model")
        if len(config.timesteps) != len(config.computed) or not config.computed or not config.computed[0]:
            raise FragError("the step schedule is inconsistent (timesteps and steps differ, or step 0 is reused)",
                            "re-run frag extract")

    def install(self, denoiser, config: StepCacheConfig) -> Patch:
        return install_step_cache(denoiser, config)

    def summary(self, config: StepCacheConfig, denoiser) -> TechniqueSummary:
        reused = sum(not c for c in config.computed)
        return TechniqueSummary(unit="steps", units_total=len(config.computed), units_removed=reused,
                                removed_fraction=reused / len(config.computed),
                                details={"branch": config.branch, "threshold": config.threshold,
                                         "max_reuse": config.max_reuse,
                                         "computed_steps": [i for i, c in enumerate(config.computed) if c]})
