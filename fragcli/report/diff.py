"""Find the report to compare with (``--compare latest|baseline|none|PATH``) and diff key metrics against it.

Each metric has a better direction and a tolerance from ``thresholds.yaml``'s ``regression`` block: ``*_abs``
tolerances are absolute, ``*_rel`` ones a fraction of the baseline value; a ``null`` tolerance is reported
(INFO, or MISSING when a side lacks it) but never gates. A gated metric that the baseline or this run lacks, or
holds as NaN/inf, cannot be compared: INVALID (a gate never passes on a missing baseline), or UNAVAILABLE (skipped)
when ``regression.optional`` lists it. ``--compare baseline`` with no baseline report for the model is INVALID too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from fragcli.errors import FragError
from fragcli.paths import read_json, reports_dir, safe_name
from fragcli.records import invalid
from fragcli.report.schema import ComparedReport
from fragcli.thresholds import Regression
from fragcli.thresholds import finite_number as _num

SUMMARY = "metrics_summary.json"


class Rule(NamedTuple):
    metric: str
    tolerance: str  # field of Regression
    better: Literal["higher", "lower"]


RULES: tuple[Rule, ...] = (
    Rule("clip_delta_rel", "clip_delta_abs", "higher"),
    Rule("lpips_mean", "lpips_abs", "lower"),
    Rule("ssim_mean", "ssim_abs", "higher"),
    Rule("phash_mean", "phash_abs", "lower"),
    Rule("pass_rate", "pass_rate_abs", "higher"),
    Rule("reuse_pass_rate", "reuse_pass_rate_abs", "higher"),
    Rule("speedup", "speedup_rel", "higher"),
    Rule("fragment_weight_bytes", "memory_rel", "lower"),
    Rule("fragment_peak_bytes", "peak_memory_rel", "lower"),
    Rule("fragment_cuda_peak_bytes", "peak_memory_rel", "lower"),
    Rule("fragment_per_image_s", "latency_rel", "lower"),
)


class Comparison(NamedTuple):
    """The report chosen for comparison (None when there is none) and a note saying why/which."""

    path: Path | None
    summary: dict[str, Any] | None
    note: str


def _read_summary(path: Path) -> dict[str, Any] | None:
    """The comparable part of a ``metrics_summary.json`` of any schema_version (``ComparedReport``), or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, malformed, nested too deeply, a 5000-digit int
        return None
    if not isinstance(data, dict) or data.get("_type") != "frag.report":
        return None
    try:
        return ComparedReport.model_validate(data).model_dump(by_alias=True)
    except ValidationError:
        return None


def _summaries_under(folder: Path, depth: int = 3) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    if not folder.is_dir():
        return out
    for path in (p for d in range(depth + 1) for p in sorted(folder.glob("/".join(["*"] * d + [SUMMARY])))):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # staging folders
        data = _read_summary(path)
        if data is not None:
            out.append((path.parent, data))
    return out


def _newest(items: list[tuple[Path, dict[str, Any]]]) -> tuple[Path, dict[str, Any]]:
    return max(items, key=lambda x: (str(x[1].get("created", "")), x[0].name))


def find_comparison(compare: str, model: dict[str, Any], exclude: Path | None = None) -> Comparison:
    """Resolve ``--compare``. ``latest``/``baseline`` missing -> a note; an explicit PATH missing -> FragError."""
    name = str(model.get("name") or "unknown")
    excluded = exclude.resolve() if exclude else None

    def same_model(data: dict[str, Any]) -> bool:
        return (data.get("model") or {}).get("name") == name

    if compare == "none":
        return Comparison(None, None, "no comparison requested (--compare none)")
    if compare == "latest":
        items = [(p, d) for p, d in _summaries_under(reports_dir() / safe_name(name), depth=2)
                 if same_model(d) and p.resolve() != excluded]
        if not items:
            return Comparison(None, None, f"no earlier report for model {name} under {reports_dir()}")
        path, data = _newest(items)
        return Comparison(path, data, f"compared with the latest earlier report {path}")
    if compare == "baseline":
        base = reports_dir() / "baseline"
        items = [(p, d) for p, d in _summaries_under(base) if same_model(d)]
        if not items:
            return Comparison(None, None, f"no baseline report for model {name} under {base}")
        exact = [(p, d) for p, d in items if model.get("hash") and (d.get("model") or {}).get("hash") == model["hash"]]
        path, data = _newest(exact or items)
        note = f"compared with the baseline {path}"
        if not exact and model.get("hash"):
            note += " (baseline was made with another model hash)"
        return Comparison(path, data, note)
    path = Path(compare).expanduser()
    if path.is_file() and path.name == SUMMARY:
        path = path.parent
    if not path.is_dir():
        raise FragError(f"--compare {compare}: no such report folder", "pass latest, baseline, none or a report folder")
    data = _read_summary(path / SUMMARY)
    if data is None:
        raw = read_json(path / SUMMARY, "comparison report")  # a missing/malformed file -> its own FragError
        if isinstance(raw, dict) and raw.get("_type") == "frag.report":
            try:
                ComparedReport.model_validate(raw)
            except ValidationError as exc:
                raise invalid(path / SUMMARY, exc, "pass a folder written by frag report") from None
        raise FragError(f"--compare {path / SUMMARY} is not a frag report", "pass a folder written by frag report")
    note = f"compared with {path}"
    if not same_model(data):
        note += f" (a report for model {(data.get('model') or {}).get('name')}, not {name})"
    return Comparison(path, data, note)


def _measured(value: Any) -> float | None:
    """A finite JSON number (not a bool, not a string that looks like one), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _num(value)


def _unusable(side: str, value: Any, missing: bool) -> str:
    """Why one side of a comparison holds no number."""
    if missing or value is None:
        return f"missing from {side}"
    return f"not a finite number in {side} ({value!r})"


def diff_metric(rule: Rule, baseline: Any, current: Any, tol: Regression, *, in_baseline: bool = True,
                in_current: bool = True, where: str = "the baseline") -> dict[str, Any]:
    """One row of regression_diff.json (``in_*``: whether that side has the key at all; ``where``: the baseline,
    named in the note)."""
    b, c = _measured(baseline), _measured(current)
    tolerance = getattr(tol, rule.tolerance)
    kind = "relative" if rule.tolerance.endswith("_rel") else "absolute"
    row: dict[str, Any] = {"metric": rule.metric, "baseline": b, "current": c, "better": rule.better,
                           "tolerance": tolerance, "tolerance_kind": kind, "tolerance_key": rule.tolerance,
                           "delta": None, "delta_rel": None, "limit": None, "note": None}
    if b is None or c is None:
        why = [_unusable(where, baseline, not in_baseline)] if b is None else []
        why += [_unusable("this run", current, not in_current)] if c is None else []
        row["note"] = "; ".join(why)
        if tolerance is None:
            row["status"] = "MISSING"  # reported only: never gates
        else:
            row["status"] = "UNAVAILABLE" if rule.metric in tol.optional else "INVALID"
        return row
    row["delta"] = c - b
    row["delta_rel"] = (c - b) / abs(b) if b else None
    if tolerance is None:
        row["status"] = "INFO"
        return row
    slack = tolerance * abs(b) if kind == "relative" else tolerance
    limit = b - slack if rule.better == "higher" else b + slack
    row["limit"] = limit
    ok = c >= limit if rule.better == "higher" else c <= limit
    row["status"] = "PASS" if ok else "FAIL"
    return row


def regression_diff(current: dict[str, Any], comparison: Comparison, tol: Regression, compare: str) -> dict[str, Any]:
    """The ``regression_diff.json`` document: per metric baseline, current, delta, tolerance, status."""
    rows: list[dict[str, Any]] = []
    base_meta = None
    if comparison.summary is not None:
        base = comparison.summary.get("metrics") or {}
        where = f"the baseline {comparison.path}"
        rows = [diff_metric(rule, base.get(rule.metric), current.get(rule.metric), tol,
                            in_baseline=rule.metric in base, in_current=rule.metric in current, where=where)
                for rule in RULES]
        s = comparison.summary
        base_meta = {"path": str(comparison.path), "run_id": (s.get("run") or {}).get("id"),
                     "created": s.get("created"), "model": s.get("model")}
    failures = [r for r in rows if r["status"] == "FAIL"]
    invalid = [f"{r['metric']}: {r['note']}" for r in rows if r["status"] == "INVALID"]
    if comparison.summary is None and compare == "baseline":
        invalid.append(f"no baseline to compare with: {comparison.note}")
    return {
        "_type": "frag.regression_diff",
        "schema_version": 1,
        "compare": compare,
        "baseline": base_meta,
        "note": comparison.note,
        "metrics": rows,
        "passed": not failures and not invalid,
        "failures": [r["metric"] for r in failures],
        "invalid": invalid,
    }
