"""Quality and performance gates (``thresholds.yaml``): load, validate, and check measurements against them.

Every gate has a ``value`` and a ``direction``: ``max`` means the measured quantity must be ``<= value``,
``min`` means it must be ``>= value``. The direction of each gate is fixed by its meaning (``ssim_min`` is a
lower bound); writing the other one is an error rather than a silent inversion. ``regression`` holds the
tolerances used against a baseline report (``None`` = reported, not gated). ``gate_hypotheses`` lists the
hypotheses (H1..H5) whose FAIL should fail ``frag report --gate``; by default none do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fragcli.errors import FragError

Direction = Literal["min", "max"]
HypothesisId = Literal["H1", "H2", "H3", "H4", "H5"]


@dataclass(frozen=True)
class GateSpec:
    """What a gate means: its fixed direction, allowed value range, default, and a one-line description."""

    direction: Direction
    default: float
    lo: float
    hi: float
    description: str
    optional: bool = False  # unmeasurable by default here (LPIPS: its AlexNet weights need a download)


#: The gates, their meaning and defaults. ``thresholds.yaml`` at the repo root mirrors these defaults.
GATE_SPECS: dict[str, GateSpec] = {
    "clip_delta_max": GateSpec("max", 0.02, 0.0, 1.0, "allowed relative CLIP-score drop (0.02 = 2%)"),
    "lpips_max": GateSpec("max", 0.25, 0.0, 10.0, "largest LPIPS distance to the full model's image", optional=True),
    "ssim_min": GateSpec("min", 0.60, -1.0, 1.0, "smallest SSIM against the full model's image"),
    "phash_max": GateSpec("max", 12.0, 0.0, 64.0, "largest perceptual-hash Hamming distance (of 64 bits)"),
    "vram_reduction_min": GateSpec("min", 0.25, 0.0, 1.0, "smallest weight / peak-memory reduction (H2)"),
    "batch_speedup_min": GateSpec("min", 1.7, 0.0, 1e6, "smallest throughput speedup for a batch of variants (H4)"),
    "reuse_pass_rate_min": GateSpec("min", 0.8, 0.0, 1.0, "smallest pass rate on paraphrased prompts (H3)"),
    "break_even_max_variants": GateSpec("max", 10.0, 0.0, 1e9, "most images before profile+extract pays off (H5)"),
    "head_prunable_min": GateSpec("min", 0.30, 0.0, 1.0, "smallest prunable head fraction within clip_delta_max (H1)"),
}
GATE_NAMES = tuple(GATE_SPECS)

#: ``--fragment auto`` (fragment library, issue 14): the smallest cosine similarity between a prompt's text embedding
#: and a library fragment's prompt embedding for that fragment to serve the prompt (``fragcli.library``).
FRAGMENT_MIN_SIMILARITY = 0.9

#: Per-image quality gates: gate name -> (key in a per-image metrics dict, sign applied before comparing).
#: ``clip_delta_rel`` is negative when the fragment scores lower, so the measured *drop* is ``-clip_delta_rel``.
IMAGE_GATES: dict[str, tuple[str, float]] = {
    "clip_delta_max": ("clip_delta_rel", -1.0),
    "lpips_max": ("lpips", 1.0),
    "ssim_min": ("ssim", 1.0),
    "phash_max": ("phash_distance", 1.0),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gate(_Strict):
    """One gate: the measured value must be ``<= value`` (``max``) or ``>= value`` (``min``)."""

    value: float
    direction: Direction
    optional: bool = False  # true: when the metric cannot be measured the gate is skipped, not INVALID

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def passes(self, measured: float) -> bool:
        """True when ``measured`` is on the good side of the gate (ties pass)."""
        return measured <= self.value if self.direction == "max" else measured >= self.value

    def margin(self, measured: float) -> float:
        """How far ``measured`` is inside the gate (positive) or outside it (negative)."""
        return self.value - measured if self.direction == "max" else measured - self.value


#: The metrics a regression compares (``fragcli.report.diff.RULES``), the names ``regression.optional`` takes.
REGRESSION_METRICS = ("clip_delta_rel", "lpips_mean", "ssim_mean", "phash_mean", "pass_rate", "reuse_pass_rate",
                      "speedup", "fragment_weight_bytes", "fragment_peak_bytes", "fragment_cuda_peak_bytes",
                      "fragment_per_image_s")


class Regression(_Strict):
    """Tolerances against a baseline report. ``*_abs``: absolute; ``*_rel``: fraction of the baseline value.

    A gated metric (its tolerance not null) that the baseline or this run lacks, or holds as NaN/inf, makes the
    gate INVALID, unless it is listed in ``optional`` (then it is skipped, with a warning)."""

    clip_delta_abs: float | None = Field(0.01, ge=0)
    lpips_abs: float | None = Field(0.02, ge=0)
    ssim_abs: float | None = Field(0.02, ge=0)
    phash_abs: float | None = Field(2.0, ge=0)
    pass_rate_abs: float | None = Field(0.05, ge=0)
    reuse_pass_rate_abs: float | None = Field(0.05, ge=0)
    speedup_rel: float | None = Field(0.50, ge=0)
    memory_rel: float | None = Field(0.05, ge=0)
    peak_memory_rel: float | None = Field(0.25, ge=0)
    latency_rel: float | None = Field(None, ge=0)
    optional: tuple[str, ...] = ("lpips_mean", "fragment_cuda_peak_bytes")

    @field_validator("optional")
    @classmethod
    def _known_metrics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in REGRESSION_METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r} (known: {', '.join(REGRESSION_METRICS)})")
        return v


def _default_gate(name: str) -> Gate:
    spec = GATE_SPECS[name]
    return Gate(value=spec.default, direction=spec.direction, optional=spec.optional)


class Thresholds(_Strict):
    """The whole ``thresholds.yaml``. Omitted gates take their defaults; unknown keys are errors."""

    schema_version: Literal[1] = 1
    clip_delta_max: Gate = Field(default_factory=lambda: _default_gate("clip_delta_max"))
    lpips_max: Gate = Field(default_factory=lambda: _default_gate("lpips_max"))
    ssim_min: Gate = Field(default_factory=lambda: _default_gate("ssim_min"))
    phash_max: Gate = Field(default_factory=lambda: _default_gate("phash_max"))
    vram_reduction_min: Gate = Field(default_factory=lambda: _default_gate("vram_reduction_min"))
    batch_speedup_min: Gate = Field(default_factory=lambda: _default_gate("batch_speedup_min"))
    reuse_pass_rate_min: Gate = Field(default_factory=lambda: _default_gate("reuse_pass_rate_min"))
    break_even_max_variants: Gate = Field(default_factory=lambda: _default_gate("break_even_max_variants"))
    head_prunable_min: Gate = Field(default_factory=lambda: _default_gate("head_prunable_min"))
    fragment_min_similarity: float = Field(FRAGMENT_MIN_SIMILARITY, ge=-1.0, le=1.0,
                                           description="--fragment auto: smallest prompt-embedding cosine similarity")
    regression: Regression = Field(default_factory=Regression)
    gate_hypotheses: list[HypothesisId] = Field(default_factory=list)

    @field_validator(*GATE_NAMES, mode="before")
    @classmethod
    def _shorthand(cls, v: Any, info) -> Any:
        """``ssim_min: 0.6`` is shorthand for ``ssim_min: {value: 0.6, direction: min}``."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            spec = GATE_SPECS[info.field_name]
            return {"value": v, "direction": spec.direction, "optional": spec.optional}
        return v

    @field_validator(*GATE_NAMES)
    @classmethod
    def _check_gate(cls, gate: Gate, info) -> Gate:
        spec = GATE_SPECS[info.field_name]
        if gate.direction != spec.direction:
            raise ValueError(f"direction must be '{spec.direction}' ({spec.description}), not '{gate.direction}'")
        if not spec.lo <= gate.value <= spec.hi:
            raise ValueError(f"value {gate.value:g} is outside [{spec.lo:g}, {spec.hi:g}]")
        return gate

    @model_validator(mode="after")
    def _unique_hypotheses(self) -> Thresholds:
        if len(set(self.gate_hypotheses)) != len(self.gate_hypotheses):
            raise ValueError("gate_hypotheses lists a hypothesis twice")
        return self

    def gate(self, name: str) -> Gate:
        """The gate called ``name`` (one of ``GATE_NAMES``)."""
        if name not in GATE_SPECS:
            raise KeyError(name)
        return getattr(self, name)

    def gates(self) -> dict[str, Gate]:
        return {name: self.gate(name) for name in GATE_NAMES}

    def tightened(self, margin: float) -> Thresholds:
        """The image-quality gates moved ``margin`` of the way towards perfect (a max gate v -> v (1 - margin); a
        min gate on [0, 1] v -> v + margin (1 - v)); the rest unchanged. A recipe search gates its few seeds with
        these, so that what it picks still passes on seeds it has not seen."""
        if not 0 <= margin < 1:
            raise ValueError("margin must be in [0, 1)")
        moved = {}
        for name in IMAGE_GATES:
            g = self.gate(name)
            value = g.value * (1 - margin) if g.direction == "max" else g.value + margin * (1 - g.value)
            moved[name] = g.model_copy(update={"value": value})
        return self.model_copy(update=moved)

    def flat(self) -> dict[str, float]:
        """``{gate: value}``, the form ``validation.json`` records."""
        return {name: g.value for name, g in self.gates().items()}


def default_thresholds() -> Thresholds:
    """The built-in defaults (identical to the shipped ``thresholds.yaml``)."""
    return Thresholds()


def _describe(err: dict[str, Any], path: Path) -> FragError:
    """Turn the first pydantic error into a one-line FragError that names the key and the fix."""
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    where = f"{path.name}: "
    if kind == "extra_forbidden":
        known = ", ".join([*GATE_NAMES, "fragment_min_similarity", "regression", "gate_hypotheses",
                           "schema_version"])
        if loc.startswith("regression."):
            known = ", ".join(Regression.model_fields)
        elif "." in loc:
            known = "value, direction, optional"
        return FragError(f"{where}unknown key '{loc}'", f"remove it or fix its spelling (known keys: {known})")
    if kind == "missing":
        return FragError(f"{where}key '{loc}' is missing", "give every gate both 'value' and 'direction'")
    if kind == "literal_error" and loc.endswith("direction"):
        return FragError(f"{where}{loc} is {err.get('input')!r}", "use 'min' or 'max'")
    if kind == "literal_error" and loc.startswith("gate_hypotheses"):
        return FragError(f"{where}{loc} is {err.get('input')!r}", "list hypothesis ids H1..H5")
    if kind == "literal_error" and loc == "schema_version":
        return FragError(f"{where}schema_version {err.get('input')!r} is not supported", "use schema_version: 1")
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err.get("msg", "")))
        return FragError(f"{where}{loc or 'file'}: {msg}", f"fix '{loc or 'the file'}' in {path}")
    if kind.startswith(("float", "int", "list", "model", "dict", "bool")) or kind.endswith("_type"):
        return FragError(
            f"{where}{loc or 'file'} has the wrong type ({err.get('msg', kind)}, got {err.get('input')!r})",
            f"fix '{loc}' in {path}: " + (
                "regression tolerances are numbers or null" if loc.startswith("regression")
                else "gates are {value: NUMBER, direction: min|max}"),
        )
    return FragError(f"{where}{loc or 'file'}: {err.get('msg', kind)}", f"fix '{loc}' in {path}")


def parse_thresholds(data: Any, path: Path = Path("thresholds.yaml")) -> Thresholds:
    """Validate already-parsed YAML data; every problem becomes a FragError naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FragError(f"{path.name} must be a mapping of gate names, got {type(data).__name__}",
                        "see the shipped thresholds.yaml for the format")
    try:
        return Thresholds.model_validate(data)
    except ValidationError as exc:
        raise _describe(exc.errors()[0], path) from None


def load_thresholds(path: Path | str | None) -> Thresholds:
    """Read and validate a thresholds YAML file (``None`` -> the built-in defaults)."""
    if path is None:
        return default_thresholds()
    path = Path(path).expanduser()
    if not path.is_file():
        raise FragError(f"thresholds file not found: {path}", "pass --gate the path of a thresholds.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FragError(f"{path.name} is not valid YAML{where} ({getattr(exc, 'problem', None) or exc})",
                        f"fix the YAML syntax in {path}") from None
    except UnicodeDecodeError:
        raise FragError(f"{path.name} is not UTF-8 text", "save it as UTF-8 YAML") from None
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of more than 4300 digits
        kind = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0][:80]
        raise FragError(f"{path.name} is not usable YAML ({kind})", f"fix the YAML in {path}") from None
    if data is None:
        raise FragError(f"{path} is empty: a gate with no thresholds would pass on the defaults unannounced",
                        "write the thresholds to enforce (see the repository's thresholds.yaml), or drop --gate")
    return parse_thresholds(data, path)


@dataclass
class ImageCheck:
    """The outcome of checking one image's (or an aggregate's) metrics against the quality gates."""

    passed: bool
    failures: list[str] = field(default_factory=list)  # human-readable, one per failed gate
    skipped: dict[str, str] = field(default_factory=dict)  # gate -> why it did not gate (metric unavailable)


def finite_number(value: Any) -> float | None:
    """A finite float, or None for None/bools/NaN/inf/non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def check_image(metrics: dict[str, Any], thresholds: Thresholds) -> ImageCheck:
    """Check ``{clip_delta_rel, lpips, ssim, phash_distance}`` against the quality gates.

    A metric that is missing, ``None`` or NaN (unavailable) does not gate; it is listed in ``skipped``.
    """
    check = ImageCheck(passed=True)
    for gate_name, (key, sign) in IMAGE_GATES.items():
        value = finite_number(metrics.get(key))
        if value is None:
            check.skipped[gate_name] = f"{key} unavailable"
            continue
        gate = thresholds.gate(gate_name)
        measured = sign * value
        if not gate.passes(measured):
            check.passed = False
            op = "<=" if gate.direction == "max" else ">="
            check.failures.append(f"{gate_name}: {measured:.4g} not {op} {gate.value:g}")
    return check


def image_passes(metrics: dict[str, Any], thresholds: Thresholds) -> bool:
    """True when every available quality metric of one image is within its gate (unavailable ones don't gate)."""
    return check_image(metrics, thresholds).passed
