"""Recipe search (``frag extract PROFILE --objective memory|speed|balanced``): try lever settings, keep the best that
passes the quality gates.

A *candidate* is an extract options dict (the levers ``head_retention``, ``ffn_retention``, ``low_rank_energy``,
``quantize``, ``evict_text_encoders``, ``cache_prompt``; None = lever off). For each one: every technique plans from
the profile (``plan_techniques``; a ``FragError`` = *refused*); the stack is applied to a deep copy of the base
denoiser swapped into the pipeline for this candidate only (the base goes back untouched; a ``FragError`` while
checking/applying = *refused*); the search seeds (default: the profile's first 8) are generated at the profile's
settings and compared with the profile's full-model images with frag validate's metrics and gates (per image, then
the aggregate gated like validation.json's ``passed``); resident bytes (the pipeline's weight bytes minus what the
stack evicts, ``Technique.evicts``: ``text_encoder*``), denoiser bytes and seconds per image are measured.

*Passed* = the aggregate passes every quality gate of thresholds.yaml, tightened by ``SEARCH_MARGIN`` (25% of the way
towards perfect: pHash <= 9 for 12, CLIP drop <= 1.5% for 2%, SSIM >= 0.7 for 0.6), because the fastest candidate
that passes on a few seeds sits at the gate and fails on others about half the time; a non-optional gate that cannot be measured
(CLIP without a judge) is refused up front unless ``allow_unmeasured``. Among passing candidates ``memory`` picks
the smallest resident bytes (those within ``SIZE_TOLERANCE``, 2%, count as as small: the least aggressive of them
wins, see ``choose``), ``speed`` the fewest seconds per image (ties: smaller), ``balanced`` the smallest bytes x
seconds; none passing -> ``chosen`` None (``RecipeResult.refusal()`` is the error to raise).
Pareto fronts (resident bytes vs quality loss, time vs quality loss) are marked.

Early stop (``prune``): a candidate at least as aggressive as one that already *failed* in every lever (the other
options equal) is *skipped* without generating; so is one whose planned stack equals an earlier one's (a lever whose
technique planned nothing).

Default grids (``GRIDS``, ``default_candidates``), cheap to aggressive. memory: ``quantize`` int8, fp8 x
``ffn_retention`` None, 0.8, 0.6 x ``low_rank_energy`` None, 0.93, all with ``evict_text_encoders`` and
``cache_prompt`` (exact: no quality cost); 12 candidates, int8 first (fp8 stores the same bytes and counts as more
aggressive, so it runs only where int8 passed with the same other levers). speed: ``step_cache``
0.05, 0.1, 0.2 x ``step_cache_max_reuse`` 4, 6 x ``guidance_cut`` None, 0.05, without quantization (dequantizing costs time on CPU) or pruning (on
the shapes model neither FFN nor head pruning bought measurable time); balanced
(provisional) varies int8, FFN retention and low rank. ``write_recipe`` writes ``recipe.json`` (``RecipeRecord``) and ``recipe.png``
(``fragcli.report.recipe_plot``) into a folder the caller has staged (the fragment folder being built).
"""

from __future__ import annotations

import copy
import gc
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from fragcli.errors import FragError
from fragcli.records import Aggregate, Block, ModelId, Record, Settings

TYPE = "frag.recipe"
SCHEMA_VERSION = 1
RECIPE_FILE = "recipe.json"
PLOT_FILE = "recipe.png"
Objective = Literal["memory", "speed", "balanced"]
OBJECTIVES: tuple[str, ...] = ("memory", "speed", "balanced")
# 8, not 4: on shapes v2 the same fragment's CLIP drop ranged 0.0-4.6% across seeds, seeds 0 and 1 four to ten
# times the others (step cache 0.05, max reuse 2: 4.6%, 1.1%, then <= 0.4%), so a 4-seed mean refused every step
# cache that passes on 20 seeds
DEFAULT_SEARCH_SEEDS = 8
SIZE_TOLERANCE = 0.02  # memory: candidates within 2% of the smallest passing one count as as small
SEARCH_MARGIN = 0.25  # the search gates its few seeds 25% of the way towards perfect (see Thresholds.tightened)
SPEED_TOLERANCE = 0.10  # speed: within 10% of the fastest count as as fast (one image's time on a shared CPU varies by 25%)

#: Lever -> aggressiveness of a value (higher = removes more; None = lever off = 0); booleans must be equal.
_RETENTION = ("head_retention", "ffn_retention", "low_rank_energy")
_THRESHOLD = ("step_cache", "guidance_cut", "cross_attn_gate", "block_cache")  # higher = reuses more; None = off
_COUNT = ("step_cache_max_reuse", "block_cache_max_reuse")  # higher = more aggressive (None = the default)
#: A count lever belongs to its threshold lever: left out with it, and off (None) where it is off.
COMPANIONS = {"step_cache_max_reuse": "step_cache", "block_cache_max_reuse": "block_cache"}
#: The value a lever is probed with to learn whether the model can use it at all (the loosest the technique
#: accepts, so that only the model, never this prompt's numbers, decides); other levers: their grid's most aggressive.
PROBE = {"step_cache": 0.99, "block_cache": 0.99, "guidance_cut": 1e9, "cross_attn_gate": 1e9}
_QUANT_RANK = {None: 0, "none": 0, "int8": 1, "fp8": 2}  # fp8 (e4m3, 3 mantissa bits) errs more than int8/channel
_EXACT = ("evict_text_encoders", "cache_prompt")  # no quality cost: never a reason to skip
LEVERS = (*_RETENTION, *_THRESHOLD, *_COUNT, "quantize", *_EXACT)  # the extract options a recipe chooses

#: Default grids: lever -> values, cheap to aggressive; ``fixed`` levers are the same in every candidate.
GRIDS: dict[str, dict[str, Any]] = {
    "memory": {"vary": {"quantize": ("int8", "fp8"), "ffn_retention": (None, 0.8, 0.6),
                        "low_rank_energy": (None, 0.93)},
               "fixed": {"head_retention": None, "evict_text_encoders": True, "cache_prompt": True}},
    "speed": {"vary": {"step_cache": (0.05, 0.1, 0.2), "step_cache_max_reuse": (4, 6),
                       "block_cache": (None, 0.05, 0.1, 0.2, 0.3), "block_cache_max_reuse": (2, 4),
                       "guidance_cut": (None, 0.05)},
              "fixed": {"quantize": None, "head_retention": None, "low_rank_energy": None,
                        "evict_text_encoders": True, "cache_prompt": True}},
    "balanced": {"vary": {"quantize": (None, "int8"), "ffn_retention": (None, 0.8, 0.6),
                          "low_rank_energy": (None, 0.93)},
                 "fixed": {"head_retention": None, "evict_text_encoders": True, "cache_prompt": True}},
}


# ----------------------------------------------------------------------------------------------------- record


class RecipeFull(Block):
    """The full model as the search measured it (the reference of every candidate)."""

    resident_bytes: int = Field(description="weight bytes of the whole pipeline (nothing evicted)")
    denoiser_bytes: int = Field(description="weight bytes of the base denoiser")
    seconds_per_image: float | None = Field(description="full model's generation time per image (warm); null: "
                                                        "not timed")
    timed_seeds: list[int] = Field(default_factory=list, description="the seeds the full model was timed on")


class RecipeCandidate(Block):
    """One tried set of levers: its status, size, speed and quality against the full model."""

    id: str = Field(description="short name, e.g. int8-f80-r93-evict")
    options: dict[str, Any] = Field(description="the extract options tried (None = lever off)")
    status: Literal["passed", "failed", "refused", "skipped"] = Field(
        description="passed/failed: the quality gates on the search seeds; refused: a technique refused the "
                    "options (FragError); skipped: not generated (see reasons)")
    reasons: list[str] = Field(default_factory=list, description="failed gates, the refusal, or why it was skipped")
    techniques: list[str] = Field(default_factory=list, description="the techniques planned, in stack order")
    resident_bytes: int | None = Field(None, description="weight bytes resident while generating: the pipeline "
                                                         "minus the components the stack evicts (text_encoder*)")
    resident_ratio: float | None = Field(None, description="resident_bytes / full.resident_bytes")
    weight_bytes_full: int | None = Field(None, description="weight bytes of the whole pipeline with the stack "
                                                            "applied, evicted components included")
    denoiser_bytes: int | None = Field(None, description="weight bytes of the denoiser with the stack applied")
    seconds_per_image: float | None = Field(None, description="generation seconds of the fastest search seed (the "
                                                               "one least disturbed by other work)")
    build_s: float | None = Field(None, description="seconds to plan and apply the stack")
    quality: Aggregate | None = Field(None, description="means over the search seeds (as validation.json's)")
    pareto: bool = Field(False, description="on the front of resident bytes vs quality loss")
    pareto_speed: bool = Field(False, description="on the front of seconds per image vs quality loss")


class RecipeRecord(Record):
    """``recipe.json``: the candidates a recipe search tried, and the one it chose (``frag extract --objective``)."""

    TYPE: ClassVar[str] = TYPE
    WHAT: ClassVar[str] = "recipe"
    FIX: ClassVar[str] = "re-run frag extract --objective"

    type_: Literal["frag.recipe"] = Field(TYPE, alias="_type")
    schema_version: Literal[1] = SCHEMA_VERSION
    frag_version: str = Field("", description="the frag version that ran the search")
    created: str = Field(description="UTC time, ISO 8601")
    objective: Objective = Field(description="memory: smallest resident bytes; speed: fewest seconds per image; "
                                             "balanced: smallest bytes x seconds (among passing candidates)")
    model: ModelId
    settings: Settings = Field(description="the profile's generation settings, used for every candidate")
    seeds: list[int] = Field(description="the search seeds (compared with the profile's full-model images)")
    thresholds: dict[str, float] = Field(description="gate name -> value used (the image gates tightened by "
                                                     "search_margin)")
    search_margin: float = Field(0.0, description="how far the image-quality gates were tightened for the search "
                                                  "seeds (0: thresholds.yaml as is), so that the pick also passes on "
                                                  "seeds the search did not see")
    unmeasured: dict[str, str] = Field(default_factory=dict, description="quality gate -> why it was not measured "
                                                                         "(did not gate; see allow_unmeasured)")
    allow_unmeasured: bool = Field(False, description="true: unmeasurable non-optional gates were let through")
    pareto_metric: Literal["clip_drop", "ssim_loss"] = Field(
        description="quality loss of the Pareto fronts: -clip_delta_rel, or 1 - ssim_mean when CLIP is unmeasured")
    full: RecipeFull
    candidates: list[RecipeCandidate] = Field(description="in the order tried")
    chosen: str | None = Field(description="id of the chosen candidate; null: none passed")
    speed_tolerance: float = Field(SPEED_TOLERANCE, description="speed: passing candidates within this fraction "
                                                                "of the fastest count as as fast; the least "
                                                                "aggressive of them is chosen")
    size_tolerance: float = Field(SIZE_TOLERANCE, description="memory: passing candidates within this fraction of "
                                                              "the smallest resident bytes count as as small; the "
                                                              "least aggressive of them is chosen")
    search_s: float = Field(description="wall seconds of the whole search (a cost of extraction, H5)")
    left_out: dict[str, str] = Field(default_factory=dict, description="lever -> why this model cannot use it (left "
                                                                       "out of every candidate of the default grid)")
    plot: str | None = Field(None, description="the plot beside recipe.json (recipe.png); null: nothing to plot")


@dataclass
class RecipeResult:
    record: RecipeRecord

    @property
    def chosen(self) -> RecipeCandidate | None:
        return next((c for c in self.record.candidates if c.id == self.record.chosen), None)

    @property
    def chosen_options(self) -> dict[str, Any] | None:
        """The chosen candidate's extract options (to plan the fragment with), or None when none passed."""
        c = self.chosen
        return dict(c.options) if c is not None else None

    def refusal(self) -> FragError:
        """The one-line error for a search where nothing passed (raise it: never build an unchecked fragment)."""
        rec = self.record
        count = {s: sum(c.status == s for c in rec.candidates) for s in ("failed", "refused", "skipped")}
        first = next((c for c in rec.candidates if c.status == "failed"), None) or \
            next((c for c in rec.candidates if c.reasons), None)
        why = f"; first {first.status}: {first.id}: {first.reasons[0]}" if first is not None and first.reasons else ""
        if rec.left_out:
            why += "; left out: " + ", ".join(f"{k} ({v})" for k, v in rec.left_out.items())
        return FragError(f"no {rec.objective} recipe passed the quality gates on seeds {rec.seeds} "
                         f"({count['failed']} failed, {count['refused']} refused, {count['skipped']} skipped{why})",
                         "loosen the gates in thresholds.yaml (--gate), or choose the levers by hand "
                         "(e.g. --quantize int8 --evict-text-encoders)")


# ----------------------------------------------------------------------------------------------- candidates


def candidate_id(options: dict[str, Any]) -> str:
    """A short name: int8-f80-r93-h70-evict (levers off are left out; "full" when none is on)."""
    from fragcli.sweep import extract_options

    parts = []
    q = options.get("quantize")
    if q not in (None, "none"):
        parts.append(str(q))
    for key, letter in (("head_retention", "h"), ("ffn_retention", "f"), ("low_rank_energy", "r")):
        v = options.get(key)
        if v is not None:
            parts.append(f"{letter}{v * 100:g}")
    if options.get("step_cache") is not None:
        parts.append(f"sc{options['step_cache'] * 100:g}")
    if options.get("step_cache") is not None and options.get("step_cache_max_reuse") is not None:
        parts.append(f"m{options['step_cache_max_reuse']}")
    if options.get("block_cache") is not None:
        parts.append(f"bc{options['block_cache'] * 100:g}")
        if options.get("block_cache_max_reuse") is not None:
            parts.append(f"m{options['block_cache_max_reuse']}")
    if options.get("guidance_cut") is not None:
        parts.append(f"gc{options['guidance_cut'] * 100:g}")
    if options.get("cross_attn_gate") is not None:
        parts.append(f"ca{options['cross_attn_gate'] * 100:g}")
    if options.get("evict_text_encoders"):
        parts.append("evict")
    elif options.get("cache_prompt"):
        parts.append("cache")
    defaults = extract_options()  # other options show only where they differ from their technique's default
    extra = sorted(k for k, v in options.items() if k not in LEVERS and v is not None
                   and (k not in defaults or v != defaults[k]))
    parts += [f"{k}={options[k]}" for k in extra]
    return "-".join(parts) or "full"


def _rank(options: dict[str, Any]) -> tuple:
    """Sort key, cheap to aggressive: quantization format first, then how much the retention levers remove."""
    removed = [0 if options.get(k) is None else round((1 - float(options[k])) * 100) for k in _RETENTION]
    removed += [0 if options.get(k) is None else round(float(options[k]) * 100) for k in _THRESHOLD]
    removed += [0 if options.get(k) is None else int(options[k]) for k in _COUNT]
    return (_QUANT_RANK.get(options.get("quantize"), 1), sum(removed), *removed)


def default_candidates(objective: str = "memory", fixed: dict[str, Any] | None = None,
                       left_out: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The objective's grid (``GRIDS``), ordered cheap to aggressive. ``fixed``: levers the user set by hand (a
    value that is None or False is not set), the same in every candidate; other keys (e.g. ``score``) pass
    through to every candidate. ``left_out``: levers this model cannot use (``unusable_levers``), absent from every
    candidate (with their count levers); a count lever is None where its threshold lever is off."""
    if objective not in GRIDS:
        raise FragError(f"unknown objective {objective!r}", f"use one of: {', '.join(OBJECTIVES)}")
    levers = set(LEVERS)
    fixed = dict(fixed or {})
    given = {k: v for k, v in fixed.items() if k in levers and v is not None and v is not False}
    if given.get("quantize") == "none":
        given["quantize"] = None  # asked for explicitly: no quantization in any candidate
    passthrough = {k: v for k, v in fixed.items() if k not in levers and v is not None}
    gone = set(left_out or ()) | {k for k, lever in COMPANIONS.items() if lever in (left_out or ())}
    vary = {k: v for k, v in GRIDS[objective]["vary"].items() if k not in given and k not in gone}
    base = {**GRIDS[objective]["fixed"], **passthrough, **given}
    out, seen = [], set()
    for values in itertools.product(*vary.values()):
        opts = {**base, **dict(zip(vary, values, strict=True))}
        for count, lever in COMPANIONS.items():
            if count in vary and opts.get(lever) is None:
                opts[count] = None
        key = tuple(sorted((k, repr(v)) for k, v in opts.items()))
        if key not in seen:
            seen.add(key)
            out.append(opts)
    return sorted(out, key=_rank)


def unusable_levers(profile, objective: str, fixed: dict[str, Any] | None = None) -> dict[str, str]:
    """Levers of the objective's grid that this model cannot use, with the technique's reason: each one is planned
    alone from ``profile`` at its ``PROBE`` value (else its grid's most aggressive value); a refusal there leaves it
    out. Levers the user fixed are not probed (their refusal is the error)."""
    from fragcli.extraction import plan_techniques

    given = {k for k, v in (fixed or {}).items() if v is not None and v is not False}
    out = {}
    for lever, values in GRIDS[objective]["vary"].items():
        if lever in given or lever in COMPANIONS:
            continue
        if lever in PROBE:
            value = PROBE[lever]
        else:
            on = [v for v in values if v is not None]
            if not on:
                continue
            value = max(on, key=lambda v: _rank({lever: v}))
        try:
            plan_techniques(profile, {lever: value})
        except FragError as exc:
            out[lever] = exc.problem
    return out


def more_aggressive(b: dict[str, Any], a: dict[str, Any]) -> bool:
    """True when ``b`` removes at least as much as ``a`` in every lever (and differs), all other options equal."""
    if b == a:
        return False
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if key in _RETENTION:
            ra, rb = _removed(va), _removed(vb)
            if ra is None or rb is None or rb < ra:
                return False
        elif key in (*_THRESHOLD, *_COUNT):
            ra, rb = _threshold(va), _threshold(vb)
            if ra is None or rb is None or rb < ra:
                return False
        elif key == "quantize":
            ra, rb = _QUANT_RANK.get(va), _QUANT_RANK.get(vb)
            if ra is None or rb is None or rb < ra:
                return False
        elif key in _EXACT:
            continue
        elif va != vb:
            return False
    return True


def _threshold(value) -> float | None:
    """How much a threshold lever reuses (0 when off); None for a value that is not a number."""
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _removed(value) -> float | None:
    """How much a retention lever removes (0 when off); None for a value that is not a number."""
    if value is None:
        return 0.0
    try:
        return 1.0 - float(value)
    except (TypeError, ValueError):
        return None


def check_candidates(candidates: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    from fragcli.sweep import extract_options

    known = [*extract_options(), *(k for k in LEVERS if k not in extract_options())]  # a lever may be a skeleton
    out = []
    for c in candidates:
        if not isinstance(c, dict) or not c:
            raise FragError(f"recipe candidate {c!r} is not an options dict", "pass e.g. {'quantize': 'int8'}")
        bad = sorted(k for k in c if k not in known)
        if bad:
            raise FragError(f"recipe candidate {candidate_id(c)} has unknown option(s) {', '.join(bad)}",
                            f"use: {', '.join(known)}")
        out.append(dict(c))
    if not out:
        raise FragError("no recipe candidate to try", "pass at least one candidate, or none for the default grid")
    return out


# ------------------------------------------------------------------------------------------------- measuring


def resident_bytes(pipe, steps) -> int:
    """Weight bytes of ``pipe`` minus the components the stack's techniques evict (``Technique.evicts``)."""
    from fragcli.memory import weight_bytes

    prefixes = [p for s in steps for p in s.technique.evicts(s.config)]
    comps = getattr(pipe, "components", {}) or {}
    evicted = sum(weight_bytes(m) for n, m in comps.items() if m is not None and n.startswith(tuple(prefixes))) \
        if prefixes else 0
    return weight_bytes(pipe) - evicted


def unmeasured_gates(metrics, thresholds) -> dict[str, str]:
    """Quality gates whose metric the metric set cannot measure: ``{gate: reason}``."""
    from fragcli.thresholds import IMAGE_GATES

    family = {"clip_delta_rel": ("clip", metrics.clip), "lpips": ("lpips", metrics.lpips)}
    out = {}
    for gate, (key, _sign) in IMAGE_GATES.items():
        if key in family and family[key][1] is None:
            out[gate] = metrics.unavailable.get(family[key][0], f"{family[key][0]} unavailable")
    return out


def quality_loss(q: Aggregate | None, metric: str) -> float | None:
    """The Pareto fronts' quality loss (lower is better): the CLIP-score drop, or 1 - SSIM."""
    if q is None:
        return None
    if metric == "clip_drop":
        return None if q.clip_delta_rel is None else -q.clip_delta_rel
    return None if q.ssim_mean is None else 1.0 - q.ssim_mean


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, loss) pairs (lower is better in both): True where no other point is <= in both and < in one."""
    return [not any(c2 <= c and q2 <= q and (c2 < c or q2 < q) for c2, q2 in points) for c, q in points]


def choose(candidates: list[RecipeCandidate], objective: str, size_tolerance: float = SIZE_TOLERANCE
           ) -> RecipeCandidate | None:
    """The objective's best passing candidate.

    memory: every passing candidate within ``size_tolerance`` of the smallest resident bytes counts as as small; of
    those, the least aggressive (fewest levers removing least: ``_rank``, int8 before fp8) wins, then the better
    SSIM, then time. A few seeds' timing is too noisy to decide between equal-sized candidates, and bytes differing
    by a fraction of a percent are not worth the quality or time a stronger lever costs (int8 and fp8 store the same
    bytes; fp8's upcast costs more on CPU). speed: the same rule on seconds per image, within ``SPEED_TOLERANCE``."""
    ok = [c for c in candidates if c.status == "passed" and c.resident_bytes is not None
          and c.seconds_per_image is not None]
    if not ok:
        return None

    def ssim_loss(c):
        return -(c.quality.ssim_mean if c.quality is not None and c.quality.ssim_mean is not None else -1.0)

    if objective == "memory":
        limit = min(c.resident_bytes for c in ok) * (1 + size_tolerance)
        near = [c for c in ok if c.resident_bytes <= limit]
        return min(near, key=lambda c: (_rank(c.options), ssim_loss(c), c.seconds_per_image))
    if objective == "speed":
        limit = min(c.seconds_per_image for c in ok) * (1 + SPEED_TOLERANCE)
        near = [c for c in ok if c.seconds_per_image <= limit]
        return min(near, key=lambda c: (_rank(c.options), ssim_loss(c), c.seconds_per_image))
    keys = {"balanced": lambda c: (c.resident_bytes * c.seconds_per_image, c.resident_bytes)}
    return min(ok, key=keys[objective])


def mark_pareto(candidates: list[RecipeCandidate], metric: str) -> None:
    measured = [c for c in candidates
                if c.status in ("passed", "failed") and quality_loss(c.quality, metric) is not None]
    for attr, cost in (("pareto", "resident_bytes"), ("pareto_speed", "seconds_per_image")):
        pts = [(float(getattr(c, cost)), quality_loss(c.quality, metric)) for c in measured]
        for c, on in zip(measured, pareto_front(pts), strict=True):
            setattr(c, attr, on)


# ---------------------------------------------------------------------------------------------------- search


def search_recipe(profile, loaded, objective: str = "memory", *, seeds: list[int] | None = None,
                  candidates: list[dict[str, Any]] | None = None, thresholds=None, metrics=None,
                  allow_unmeasured: bool = False, prune: bool = True, show_progress: bool = True,
                  left_out: dict[str, str] | None = None) -> RecipeResult:
    """Try ``candidates`` (default: ``default_candidates(objective)``) on ``seeds`` of ``profile`` (a
    ``ProfileData``) with ``loaded`` (the profiled ``LoadedModel``; its denoiser is left untouched); see the module
    docstring. ``thresholds``: a ``Thresholds``, a thresholds.yaml path, or None (defaults); ``metrics``: a
    ``MetricSet`` (default: what frag validate would build for this model)."""
    from fragcli import __version__
    from fragcli.console import progress
    from fragcli.generation import generate, resolve_settings
    from fragcli.memory import weight_bytes
    from fragcli.thresholds import Thresholds, load_thresholds
    from fragcli.validation import profile_images, quality_metrics

    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise FragError(f"unknown objective {objective!r}", f"use one of: {', '.join(OBJECTIVES)}")
    ctx = profile.context
    seeds = [int(s) for s in (seeds if seeds is not None else ctx["seeds"][:DEFAULT_SEARCH_SEEDS])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise FragError(f"recipe search seeds {seeds} are empty or repeat a seed", "pass distinct seeds")
    th = thresholds if isinstance(thresholds, Thresholds) else load_thresholds(thresholds)
    th = th.tightened(SEARCH_MARGIN)
    if candidates is None:
        left_out = unusable_levers(profile, objective) if left_out is None else left_out
        candidates = default_candidates(objective, left_out=left_out)
    left_out = dict(left_out or {})
    if left_out and show_progress:
        from fragcli.console import warn

        for lever, why in left_out.items():
            warn(f"--objective {objective} leaves out {lever}: {why}")
    todo = check_candidates(candidates)
    _refuse_if_none_plans(profile, todo)
    base = loaded.denoiser
    if base.__dict__.get("_frag_patches"):
        raise FragError(f"the base denoiser carries runtime patches ({', '.join(base.__dict__['_frag_patches'])})",
                        "search recipes on a freshly loaded model")
    s = resolve_settings(loaded, ctx["prompt"], ctx["steps"], ctx.get("guidance"), ctx.get("width"),
                         ctx.get("height"), ctx.get("negative_prompt", ""))
    metrics = metrics if metrics is not None else quality_metrics(loaded)
    unmeasured = unmeasured_gates(metrics, th)
    strict = {g: r for g, r in unmeasured.items() if not th.gate(g).optional}
    if strict and not allow_unmeasured:
        gate, reason = next(iter(strict.items()))
        raise FragError(f"the quality gate {gate} cannot be measured on {loaded.name} ({reason}): no recipe could "
                        "pass it", "give frag a CLIP (a model with a judge, or CLIP weights), or choose levers by hand")
    metric = "ssim_loss" if "clip_delta_max" in unmeasured else "clip_drop"

    full = profile_images(profile.folder, loaded.hash, s, seeds)
    missing = [x for x in seeds if x not in full]
    timed = missing or seeds[:2]  # the full model is timed (and warmed up) on the seeds it must render anyway
    rows: list[RecipeCandidate] = []
    done: dict[str, str] = {}  # planned stack -> candidate id
    with progress(f"recipe search ({objective})", (len(timed) + len(todo) * len(seeds)) * s.steps,
                  show_progress) as adv:
        ref = generate(loaded.pipe, s, timed, loaded.device, advance=adv)
        full.update({x: ref.images[x] for x in missing})
        full_info = RecipeFull(resident_bytes=weight_bytes(loaded.pipe), denoiser_bytes=weight_bytes(base),
                               seconds_per_image=min(ref.seconds.values()), timed_seeds=timed)
        for options in todo:
            row = _try(options, rows, done, prune, profile, loaded, base, s, seeds, full, metrics, th, adv)
            if row.resident_bytes is not None:
                row.resident_ratio = row.resident_bytes / full_info.resident_bytes
            rows.append(row)
    mark_pareto(rows, metric)
    best = choose(rows, objective, SIZE_TOLERANCE)
    record = RecipeRecord(
        frag_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), objective=objective,
        model=ModelId(name=loaded.name, hash=loaded.hash), settings=Settings(**s.as_dict()), seeds=seeds,
        thresholds=th.flat(), search_margin=SEARCH_MARGIN, unmeasured=unmeasured, allow_unmeasured=allow_unmeasured, pareto_metric=metric,
        full=full_info, candidates=rows, chosen=best.id if best else None,
        size_tolerance=SIZE_TOLERANCE, speed_tolerance=SPEED_TOLERANCE, search_s=time.perf_counter() - t0,
        left_out=left_out)
    return RecipeResult(record)


def _refuse_if_none_plans(profile, todo: list[dict[str, Any]]) -> None:
    """Plan every candidate before generating anything: when none can plan (e.g. a lever fixed by hand at a value no
    technique accepts), the first refusal is the error, not the result of a whole search."""
    from fragcli.extraction import plan_techniques

    first = None
    for options in todo:
        try:
            plan_techniques(profile, options)
        except FragError as exc:
            first = first or exc
        else:
            return
    if first is not None:
        raise first


def _try(options, rows, done, prune, profile, loaded, base, s, seeds, full, metrics, th, adv) -> RecipeCandidate:
    """One candidate (the base denoiser is swapped back into the pipeline whatever happens)."""
    from fragcli.extraction import plan_techniques
    from fragcli.fragment import plan_steps
    from fragcli.generation import generate
    from fragcli.memory import weight_bytes
    from fragcli.techniques.stack import apply_stack
    from fragcli.validation import fidelity

    cid = candidate_id(options)
    taken = {r.id for r in rows}
    cid = cid if cid not in taken else next(f"{cid}-{i}" for i in itertools.count(2) if f"{cid}-{i}" not in taken)
    row = RecipeCandidate(id=cid, options=options, status="skipped")
    skip = lambda: adv(len(seeds) * s.steps)  # noqa: E731 - the progress bar counts every candidate's images
    if prune:
        milder = next((r for r in rows if r.status == "failed" and more_aggressive(options, r.options)), None)
        if milder is not None:
            row.reasons = [f"at least as aggressive as {milder.id}, which failed the gates"]
            skip()
            return row
    t0 = time.perf_counter()
    try:
        plans = plan_techniques(profile, options)
    except FragError as exc:
        row.status, row.reasons = "refused", [exc.one_line()]
        skip()
        return row
    steps = plan_steps(plans)
    row.techniques = [st.technique.name for st in steps]
    stack_key = repr([(st.technique.name, st.config.to_dict()) for st in steps])
    if prune and stack_key in done:
        row.reasons = [f"plans the same stack as {done[stack_key]}"]
        skip()
        return row
    pipe, name = loaded.pipe, loaded.denoiser_name
    work = copy.deepcopy(base)
    try:
        try:
            steps = apply_stack(work, steps)
        except FragError as exc:
            row.status, row.reasons = "refused", [exc.one_line()]
            skip()
            return row
        row.build_s = time.perf_counter() - t0
        setattr(pipe, name, work)
        row.weight_bytes_full = weight_bytes(pipe)
        row.resident_bytes = resident_bytes(pipe, steps)
        row.denoiser_bytes = weight_bytes(work)
        got = generate(pipe, s, seeds, loaded.device, advance=adv)
    finally:
        setattr(pipe, name, base)
        del work
        gc.collect()
    done[stack_key] = cid
    row.seconds_per_image = min(got.seconds.values())
    row.quality, check = fidelity(full, got.images, seeds, s.prompt, metrics, th)
    row.status = "passed" if check.passed else "failed"
    row.reasons = list(check.failures)
    return row


# --------------------------------------------------------------------------------------------- write / read


def write_recipe(result: RecipeResult | RecipeRecord, folder: Path) -> list[str]:
    """Write ``recipe.json`` (and ``recipe.png`` where there is something to plot) into ``folder``, a folder the
    caller is building (e.g. the staged fragment folder); each file atomically. Returns the names written."""
    from fragcli.paths import atomic_write_json
    from fragcli.report.recipe_plot import recipe_plot

    record = result.record if isinstance(result, RecipeResult) else result
    folder = Path(folder)
    drawn = recipe_plot(record, folder / PLOT_FILE)
    record = record.model_copy(update={"plot": PLOT_FILE if drawn else None})
    if isinstance(result, RecipeResult):
        result.record = record
    atomic_write_json(folder / RECIPE_FILE, RecipeRecord.model_validate(record.dump()).dump())
    return [RECIPE_FILE, *([PLOT_FILE] if drawn else [])]


def read_recipe(path: Path) -> RecipeRecord:
    """``recipe.json`` (or the folder holding it) as a ``RecipeRecord``; any problem is a one-line FragError."""
    from fragcli.records import read_record

    path = Path(path)
    return read_record(RecipeRecord, path / RECIPE_FILE if path.is_dir() else path)
