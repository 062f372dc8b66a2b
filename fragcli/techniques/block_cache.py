"""Block caching for transformer denoisers (the First-Block-Cache / DBCache family), calibrated on the prompt's
profile: the first block(s) always run; when their residual has changed less than a calibrated threshold since the
last fully computed step, the remaining blocks are not run and their cached residual is added instead.

A transformer denoiser (Flux: dual-stream then single-stream blocks; SD3/SD3.5: joint blocks; PixArt: its blocks) is
a chain of blocks ``b_0 .. b_{N-1}`` on the image tokens ``h`` (and, for joint blocks, the text tokens ``c``). With
``F`` first blocks and ``B`` last blocks always computed, at each denoiser call

- the *head residual* ``r = h_F - h_0`` (image tokens after the first F blocks minus their input) is compared with
  the head residual of the last computed call: ``d = mean|r - r_ref| / mean|r_ref|`` (relative L1);
- if ``d < residual_threshold``, the middle blocks ``b_F .. b_{N-B-1}`` are skipped: the first of them returns its
  input plus the cached middle residual (image and text tokens: ``h_{N-B} - h_F`` of the last computed call), the
  others pass their input through; else they run, and ``r_ref`` and the middle residual are refreshed.

Bounds: the first call of a generation and the call at the last calibrated timestep are always computed, and at
most ``max_reuse`` calls in a row are served from the cache. Several calls at one timestep (a pipeline running its
guidance branches separately) are told apart and cached separately; a batch that halves within a generation (after
a guidance cut) keeps the conditional half of the cache.

Calibration (``plan``): the profile's collector records, at every step and seed, for F in 1, 2, 4, 8 (below N), the
head residual's relative L1 change from the previous step (``head_diff``) and the same for the middle residual
(``rest_diff``), in ``block_cache.parquet``. Reusing at step t after the last computed step s changes the middle
residual by about ``sum_{s<u<=t} rest_diff_u``: the plan simulates the runtime rule on every profiled seed (head
change accumulated the same way) and picks the residual threshold that reuses the most steps while that error stays
at or below ``--block-cache`` (the budget) on every seed; ``block_schedule.json`` records the simulated schedule.

The runtime is a named, reversible patch: a forward pre-hook on the denoiser follows the steps, and each block's
``forward`` is wrapped (not copied: a computed call runs the block's own forward and returns its output untouched).
With the threshold 0 nothing is reused and the patched denoiser equals the plain one exactly (a test). No tensor
changes: a block-cache fragment has no weight delta. UNets are refused (their lever is ``--step-cache``).
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
from fragcli.techniques.step_cache import halved

PATCH = "frag.block_cache"
COLLECT = "frag.block_residuals"
TABLE = "block_cache"
COLUMNS = (("seed", "int64"), ("step", "int32"), ("timestep", "float64"), ("call", "int32"),
           ("first_blocks", "int32"), ("head_diff", "float64"), ("rest_diff", "float64"))
DOCS = {"seed": "generation seed", "step": "index in the schedule, 0-based",
        "timestep": "the scheduler's timestep at that step", "call": "denoiser call at that step, 0-based",
        "first_blocks": "F: blocks counted in the head (always computed by the block cache)",
        "head_diff": "mean|r_t - r_{t-1}| / mean|r_{t-1}| of the head residual r (image tokens after the first F "
                     "blocks minus before them) between this step and the previous one (NaN at step 0)",
        "rest_diff": "the same for the residual of the remaining blocks (what the block cache reuses)"}
FIRST_CANDIDATES = (1, 2, 4, 8)
DEFAULT_THRESHOLD = 0.1
DEFAULT_MAX_REUSE = 3
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class BlockSchedule(BaseModel):
    """``block_schedule.json``: the calibration a block-cache fragment was planned from."""

    model_config = ConfigDict(extra="forbid")
    type_: Literal["frag.block_schedule"] = Field("frag.block_schedule", alias="_type")
    schema_version: Literal[1] = 1
    first_blocks: int = Field(description="blocks always computed at the start")
    residual_threshold: float = Field(description="the calibrated threshold on the head residual's change")
    budget: float = Field(description="largest accumulated change of the reused residual allowed (--block-cache)")
    timesteps: list[float] = Field(description="the profile's timestep per step")
    computed: dict[str, list[bool]] = Field(description="seed -> per step: computed (true) or reused, simulated")
    error: dict[str, list[float | None]] = Field(description="seed -> per step: accumulated rest_diff of a reused "
                                                             "step (null: computed)")


class BlockCacheConfig(TechniqueConfig):
    """Which blocks are cached, and the calibrated rule that decides when."""

    threshold: float = Field(description="budget: largest accumulated relative change of the reused residual")
    residual_threshold: float = Field(description="a call reuses the cache while the head residual changed less "
                                                  "than this (relative L1) since the last computed call")
    first_blocks: int = Field(description="blocks always computed at the start (the head)")
    last_blocks: int = Field(0, description="blocks always computed at the end")
    max_reuse: int = Field(DEFAULT_MAX_REUSE, description="most consecutive calls served from the cache")
    blocks: list[str] = Field(description="every block of the denoiser, in order")
    timesteps: list[float] = Field(description="the profile's timesteps (the last one is always computed)")
    computed: list[bool] = Field(description="per calibrated step, first profiled seed: computed (true) or reused")


def block_names(denoiser) -> list[str]:
    """The denoiser's transformer blocks in call order (Flux: dual-stream, then single-stream); FragError for a
    denoiser without them (a UNet)."""
    names = []
    for attr in BLOCK_LISTS:
        blocks = getattr(denoiser, attr, None)
        if blocks is not None and hasattr(blocks, "__len__"):
            names += [f"{attr}.{i}" for i in range(len(blocks))]
    if not names:
        kind = type(denoiser).__name__
        raise FragError(f"block caching needs a transformer denoiser (transformer_blocks); the denoiser is a {kind}",
                        "use --step-cache for a UNet")
    return names


def check_threshold(value) -> float:
    return threshold_option(value, "--block-cache", "a relative change in [0, 1)",
                            f"{DEFAULT_THRESHOLD} (reuse while the skipped blocks' residual drifts <10%)",
                            zero_ok=True, below_one=True)


def rel_l1(now, ref) -> float:
    return float((now - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


def _hidden_in(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _context_in(args, kwargs):
    return kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)


def _hidden_out(output):
    """Image tokens of a block's output: Flux and SD3 blocks return (encoder_hidden_states, hidden_states)."""
    return output[1] if isinstance(output, tuple) else output


def _split(config: BlockCacheConfig) -> tuple[list[str], list[str]]:
    n = len(config.blocks)
    return config.blocks[: config.first_blocks], config.blocks[config.first_blocks : n - config.last_blocks]


# ------------------------------------------------------------------------------------------------- runtime


def install_block_cache(denoiser, config: BlockCacheConfig) -> Patch:
    """The runtime patch (idempotent: a second install returns the first; ``remove_block_cache`` undoes it)."""
    import torch

    modules = dict(denoiser.named_modules())
    missing = [b for b in config.blocks if b not in modules]
    if missing:
        raise FragError(f"block caching: the denoiser has no block {missing[0]}", "re-run frag extract")
    head, middle = _split(config)
    calibrated = torch.tensor(config.timesteps, dtype=torch.float64)
    last_step = len(config.timesteps) - 1

    def install(patch: Patch) -> None:
        st: dict[str, Any] = {"t": None, "shape": None, "call": 0, "may_reuse": False, "skip": False,
                              "ref": {}, "res": {}, "run": {}, "h0": None, "mid_in": None, "tuple_out": {},
                              "computed": 0, "reused": 0, "diffs": []}
        patch.state = st

        def pre(module, args, kwargs):
            sample = args[0] if args else kwargs.get("hidden_states")
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
            if halved(st["shape"], shape) and st["t"] is not None and t <= st["t"]:
                n = st["shape"][0]  # a guidance cut dropped the unconditional half: keep the conditional one
                for key in ("ref", "res"):
                    st[key] = {k: second_half(v, n) for k, v in st[key].items()}
                st["shape"] = shape
            if st["t"] is None or t > st["t"] or shape != st["shape"]:  # a new generation
                for key in ("ref", "res", "run"):
                    st[key].clear()
                st["call"] = 0
            elif t == st["t"]:
                st["call"] += 1
            else:
                st["call"] = 0
            i = int((calibrated - t).abs().argmin())
            key = st["call"]
            st["may_reuse"] = (i != last_step and key in st["ref"] and key in st["res"]
                               and st["run"].get(key, 0) < config.max_reuse)
            st["t"], st["shape"], st["skip"] = t, shape, False

        def decide(out):
            key = st["call"]
            r = _hidden_out(out) - st["h0"]
            skip = False
            if st["may_reuse"]:
                d = rel_l1(r, st["ref"][key])
                st["diffs"].append(d)
                skip = d < config.residual_threshold
            if skip:
                st["run"][key] = st["run"].get(key, 0) + 1
                st["reused"] += 1
            else:
                st["ref"][key] = r
                st["run"][key] = 0
                st["computed"] += 1
            st["skip"] = skip

        def passthrough(name, hidden, context):
            return (context, hidden) if st["tuple_out"].get(name) else hidden

        def wrap(name: str, mod, role: str):
            original = mod.forward

            def forward(*args, **kwargs):
                if role in ("first", "first+decide"):
                    st["h0"] = _hidden_in(args, kwargs)
                if role.startswith("mid") and st["skip"]:
                    hidden, context = _hidden_in(args, kwargs), _context_in(args, kwargs)
                    if role in ("mid_first", "mid_only"):
                        res_h, res_c = st["res"][st["call"]]
                        hidden = hidden + res_h
                        context = context + res_c if res_c is not None and context is not None else context
                    return passthrough(name, hidden, context)
                if role in ("mid_first", "mid_only"):
                    st["mid_in"] = (_hidden_in(args, kwargs), _context_in(args, kwargs))
                out = original(*args, **kwargs)
                st["tuple_out"][name] = isinstance(out, tuple)
                if role in ("decide", "first+decide"):
                    decide(out)
                if role in ("mid_last", "mid_only"):
                    h_in, c_in = st["mid_in"]
                    c_out = out[0] if isinstance(out, tuple) else None
                    res_c = c_out - c_in if c_out is not None and c_in is not None and c_out.shape == c_in.shape else None
                    st["res"][st["call"]] = (_hidden_out(out) - h_in, res_c)
                return out

            mod.forward = forward
            patch.undo.append(lambda: mod.__dict__.pop("forward", None))

        roles = {}
        for j, name in enumerate(head):
            roles[name] = "first+decide" if len(head) == 1 else "first" if j == 0 else "decide" if j == len(head) - 1 else None
        for j, name in enumerate(middle):
            roles[name] = ("mid_only" if len(middle) == 1 else "mid_first" if j == 0
                           else "mid_last" if j == len(middle) - 1 else "mid")
        for name, role in roles.items():
            if role is not None:
                wrap(name, modules[name], role)
        patch.undo.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True).remove)
        patch.undo.append(lambda: [st[k].clear() for k in ("ref", "res", "run")])

    return apply_patch(denoiser, PATCH, install)


def remove_block_cache(denoiser) -> bool:
    return remove_patch(denoiser, PATCH)


# ------------------------------------------------------------------------------------------------- profiling


def install_block_residuals(denoiser, recorder) -> Patch:
    """Record head_diff and rest_diff for every candidate F at every step (idempotent and removable); a UNet
    records nothing."""
    import torch

    def install(patch: Patch) -> None:
        try:
            names = block_names(denoiser)
        except FragError:
            return
        firsts = [f for f in FIRST_CANDIDATES if f < len(names)]
        if not firsts:
            return
        modules = dict(denoiser.named_modules())
        st: dict[str, Any] = {"h0": None, "outs": {}, "prev": {}, "step": None, "call": 0}

        def first_pre(module, args, kwargs):
            if recorder.step != st["step"]:
                st["step"], st["call"] = recorder.step, 0
            else:
                st["call"] += 1
            if recorder.step == 0 and st["call"] == 0:
                st["prev"].clear()  # a new seed
            st["h0"] = _hidden_in(args, kwargs).detach().float()

        def out_hook(index):
            def hook(module, args, kwargs, output):
                st["outs"][index] = _hidden_out(output).detach().float()
                if index == len(names) - 1 and recorder.enabled:
                    record()

            return hook

        def record():
            rows = {"call": [], "first_blocks": [], "head_diff": [], "rest_diff": []}
            with torch.no_grad():
                last = st["outs"][len(names) - 1]
                for f in firsts:
                    head, rest = st["outs"][f - 1] - st["h0"], last - st["outs"][f - 1]
                    prev = st["prev"].get((st["call"], f))
                    same = prev is not None and prev[0].shape == head.shape
                    rows["call"].append(st["call"])
                    rows["first_blocks"].append(f)
                    rows["head_diff"].append(rel_l1(head, prev[0]) if same else math.nan)
                    rows["rest_diff"].append(rel_l1(rest, prev[1]) if same else math.nan)
                    st["prev"][(st["call"], f)] = (head, rest)
            st["outs"].clear()
            recorder.add_rows(TABLE, rows)

        patch.undo.append(modules[names[0]].register_forward_pre_hook(first_pre, with_kwargs=True).remove)
        for i in sorted({f - 1 for f in firsts} | {len(names) - 1}):
            patch.undo.append(modules[names[i]].register_forward_hook(out_hook(i), with_kwargs=True).remove)
        patch.undo.append(st["prev"].clear)

    return apply_patch(denoiser, COLLECT, install, recorder)


def remove_block_residuals(denoiser) -> bool:
    return remove_patch(denoiser, COLLECT)


# ------------------------------------------------------------------------------------------------- planning


def read_diffs(profile, first: int) -> tuple[list[float], dict[int, list[tuple[float, float]]]]:
    """(timestep per step, seed -> per step (head_diff, rest_diff), the largest over that step's calls)."""
    folder = getattr(profile, "folder", None)
    if folder is not None and not (folder / f"{TABLE}.parquet").is_file():
        raise FragError(f"profile {folder} has no {TABLE}.parquet (taken before block caching existed?)",
                        "re-run frag profile, then frag extract --block-cache")
    if (profile.context.get("rows") or {}).get(TABLE) == 0:
        raise FragError("block caching needs a transformer denoiser; the profiled model's blocks.parquet has no "
                        "transformer block chain (a UNet?)", "use --step-cache for a UNet")
    cols = profile.table(TABLE, dict(COLUMNS)).to_pydict()
    have = sorted(set(cols["first_blocks"]))
    if first not in have:
        raise FragError(f"the profile has no block-cache rows for {first} first block(s) (it has {have})",
                        f"pass --block-cache-first {have[0]}")
    per: dict[int, dict[int, list[tuple[float, float]]]] = {}
    times: dict[int, float] = {}
    for seed, step, t, f, hd, rd in zip(cols["seed"], cols["step"], cols["timestep"], cols["first_blocks"],
                                        cols["head_diff"], cols["rest_diff"], strict=True):
        if f == first:
            per.setdefault(int(seed), {}).setdefault(int(step), []).append(
                (math.nan if hd is None else hd, math.nan if rd is None else rd))
            times[int(step)] = float(t)
    steps = sorted(times)
    if steps != list(range(len(steps))):
        raise FragError("block caching needs every step profiled (block_cache.parquet skips some)",
                        "re-run frag profile")
    out = {}
    for seed, by_step in per.items():
        if sorted(by_step) != steps:
            raise FragError(f"block_cache.parquet lacks steps for seed {seed}", "re-run frag profile")
        out[seed] = [(max(v[0] for v in by_step[s]), max(v[1] for v in by_step[s])) for s in steps]
    return [times[s] for s in steps], out


def simulate(diffs: list[tuple[float, float]], tau: float, max_reuse: int) -> tuple[list[bool], list[float | None]]:
    """The runtime rule on one seed's profiled diffs: (computed per step, accumulated rest change of reused steps)."""
    computed, errors, acc_h, acc_r, run = [], [], 0.0, 0.0, 0
    last = len(diffs) - 1
    for t, (hd, rd) in enumerate(diffs):
        if t > 0:
            acc_h += hd if math.isfinite(hd) else math.inf
            acc_r += rd if math.isfinite(rd) else math.inf
        reuse = 0 < t < last and run < max_reuse and acc_h < tau
        computed.append(not reuse)
        errors.append(acc_r if reuse else None)
        if reuse:
            run += 1
        else:
            acc_h = acc_r = 0.0
            run = 0
    return computed, errors


def calibrate(per_seed: dict[int, list[tuple[float, float]]], budget: float, max_reuse: int) -> tuple[float, int, float]:
    """(residual threshold reusing the most steps with every reused step's error <= budget on every seed (0: none),
    steps reused, the smallest budget that would reuse one step)."""
    candidates = set()
    for diffs in per_seed.values():
        for start in range(1, len(diffs)):
            acc = 0.0
            for hd, _ in diffs[start : start + max_reuse]:
                acc += hd
                if math.isfinite(acc):
                    candidates.add(acc * (1 + 1e-6) + 1e-12)
    best, best_reused, least_budget = 0.0, 0, math.inf
    for tau in sorted(candidates):
        runs = [simulate(d, tau, max_reuse) for d in per_seed.values()]
        reused = min(sum(not c for c in comp) for comp, _ in runs)
        worst = max((e for _, errs in runs for e in errs if e is not None), default=0.0)
        if reused >= 1:
            least_budget = min(least_budget, worst)
        if reused > best_reused and worst <= budget:
            best, best_reused = tau, reused
    return best, best_reused, least_budget


def _count(value, option: str, default: int, least: int) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise FragError(f"{option} {value} is not a whole number >= {least}", f"pass e.g. {max(least, default)}")
    return value


class BlockCache(RuntimeTechnique):
    """Skip a transformer's middle blocks on calls where its first blocks' residual barely changed (runtime only)."""

    name = "block_cache"
    version = 1
    Config = BlockCacheConfig
    records = {"block_schedule.json": BlockSchedule}
    options = {"block_cache": None, "block_cache_max_reuse": DEFAULT_MAX_REUSE, "block_cache_first": 1}

    def collectors(self) -> list[Collector]:
        return [Collector("block_residuals", TABLE, list(COLUMNS), install_block_residuals, remove_block_residuals,
                          DOCS)]

    def plan(self, profile, options: dict) -> Plan | None:
        if options.get("block_cache") is None:
            return None
        budget = check_threshold(options["block_cache"])
        max_reuse = _count(options.get("block_cache_max_reuse"), "--block-cache-max-reuse", DEFAULT_MAX_REUSE, 1)
        first = _count(options.get("block_cache_first"), "--block-cache-first", 1, 1)
        blocks = sorted({b for b in profile.table("blocks", ("block",)).column("block").to_pylist()
                         if b.count(".") == 1 and b.split(".")[0] in BLOCK_LISTS},
                        key=lambda b: (BLOCK_LISTS.index(b.split(".")[0]), int(b.split(".")[1])))
        if not blocks:
            raise FragError("block caching needs a transformer denoiser; the profiled one has no transformer blocks "
                            "(a UNet)", "use --step-cache for a UNet")
        times, per_seed = read_diffs(profile, first)
        if len(blocks) <= first:
            raise FragError(f"the profiled denoiser has {len(blocks)} transformer blocks: none left to cache after "
                            f"the first {first}", "pass a smaller --block-cache-first, or drop --block-cache")
        tau, reused, least = calibrate(per_seed, budget, max_reuse)
        if reused == 0:
            more = f"pass --block-cache {least * 1.05:.2g} or more, or drop it" if math.isfinite(least) and least < 1 \
                else "drop --block-cache (too few steps, or the residuals never settle)"
            raise FragError(f"no step of this prompt can reuse the cached blocks within --block-cache {budget:g} "
                            f"(the first {first} block(s)' residual moves too much between steps)", more)
        runs = {str(seed): simulate(d, tau, max_reuse) for seed, d in sorted(per_seed.items())}
        first_seed = next(iter(runs.values()))[0]
        config = BlockCacheConfig(threshold=budget, residual_threshold=tau, first_blocks=first, max_reuse=max_reuse,
                                  blocks=blocks, timesteps=times, computed=first_seed)
        record = BlockSchedule(first_blocks=first, residual_threshold=tau, budget=budget, timesteps=times,
                               computed={s: c for s, (c, _) in runs.items()},
                               error={s: e for s, (_, e) in runs.items()}).model_dump(by_alias=True)
        return Plan(config, record, "block_schedule.json")

    def check(self, denoiser, config: BlockCacheConfig) -> None:
        names = block_names(denoiser)
        if names != config.blocks:
            raise FragError(f"the block cache was planned for {len(config.blocks)} blocks ({config.blocks[0]}...), "
                            f"this denoiser has {len(names)}", "re-run frag extract for this model")
        head, middle = _split(config)
        if not head or not middle or config.last_blocks < 0:
            raise FragError("the block cache has no head or no middle blocks", "re-run frag extract")
        if not config.timesteps or not math.isfinite(config.residual_threshold) or config.residual_threshold < 0:
            raise FragError("the block cache's calibration is inconsistent", "re-run frag extract")

    def install(self, denoiser, config: BlockCacheConfig) -> Patch:
        return install_block_cache(denoiser, config)

    def summary(self, config: BlockCacheConfig, denoiser) -> TechniqueSummary:
        reused = sum(not c for c in config.computed)
        _, middle = _split(config)
        return TechniqueSummary(unit="steps", units_total=len(config.computed), units_removed=reused,
                                removed_fraction=reused / len(config.computed),
                                details={"first_blocks": config.first_blocks, "cached_blocks": len(middle),
                                         "budget": config.threshold, "residual_threshold": config.residual_threshold,
                                         "max_reuse": config.max_reuse,
                                         "computed_steps": [i for i, c in enumerate(config.computed) if c]})


def block_cache_state(denoiser) -> dict | None:
    """The runtime counters of an installed block cache (computed / reused calls, head diffs), else None."""
    patch = installed(denoiser).get(PATCH)
    return None if patch is None else patch.state
