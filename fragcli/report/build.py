"""Build one report folder atomically: collect -> summarise -> compare -> gate -> write files and plots."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fragcli.paths import check_out_dir, reports_dir, safe_name, staged_dir
from fragcli.records import write_record
from fragcli.report import plots
from fragcli.report.collect import collect_run
from fragcli.report.diff import find_comparison, regression_diff
from fragcli.report.heads import head_importance
from fragcli.report.schema import HeadImportance, RegressionDiff, ReportSummary
from fragcli.report.summary import attach_gates, build_summary
from fragcli.thresholds import load_thresholds


@dataclass
class ReportResult:
    """Where the report went, its summary (``metrics_summary.json``) and regression diff, as written (the dicts of
    a ``ReportSummary`` and a ``RegressionDiff``)."""

    out: Path
    summary: dict[str, Any]
    diff: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.summary["gate"]["passed"])


def _unique(folder: Path) -> Path:
    if not folder.exists():
        return folder
    n = 2
    while folder.with_name(f"{folder.name}-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}-{n}")


def _inputs(rf, sweeps: Sequence[Path], comparison: Path | None, gate: Path | None) -> list[Path]:
    """What a report reads: the folder of every file it found, the --sweep folders, the comparison report and the
    thresholds file (the --run folder itself is searched: a new folder inside it is fine)."""
    found = [rf.profile, rf.manifest, rf.selection, rf.bench, *rf.validations, *rf.sweep]
    folders = sorted({Path(src.file).parent for src in found if src is not None and src.file})
    return [*folders, *sweeps, *([comparison] if comparison else []), *([gate] if gate else [])]


def make_report(run: Path, compare: str = "latest", gate: Path | None = None, out: Path | None = None,
                sweeps: Sequence[Path] = (), overwrite: bool = False) -> ReportResult:
    """Write ``reports/<model>/<timestamp>/`` (or ``out``) and return what was written.

    Bad input (thresholds, run folder, explicit --compare PATH) raises FragError before anything is written.
    """
    th = load_thresholds(gate)
    rf = collect_run(Path(run), list(sweeps))
    now = datetime.now(timezone.utc)
    summary = build_summary(rf, th, now.isoformat(timespec="seconds"))
    if out is not None:
        target = Path(out)
    else:
        target = _unique(reports_dir() / safe_name(summary["model"]["name"]) / now.strftime("%Y%m%dT%H%M%SZ"))
    comparison = find_comparison(compare, summary["model"], exclude=target)
    if out is not None:  # every input is known now: the run's files, the sweeps, the comparison, the gate file
        target = check_out_dir(target, overwrite, inputs=_inputs(rf, sweeps, comparison.path, gate),
                               searched=[run])
    diff = regression_diff(summary["metrics"], comparison, th.regression, compare)
    attach_gates(summary, diff, th, gating=gate is not None)
    heads = head_importance(rf.profile_parquet, rf.selection, rf.profile, summary["model"])
    summary["report_dir"] = str(target)
    with staged_dir(target) as tmp:
        written = ["metrics_summary.json", "regression_diff.json"]
        diff = write_record(tmp / "regression_diff.json", RegressionDiff.model_validate(diff))
        if heads is not None:
            heads = write_record(tmp / "head_importance.json", HeadImportance.model_validate(heads))
            written.append("head_importance.json")
        for src in (rf.profile_parquet, rf.blocks_parquet):
            if src is not None:
                shutil.copy2(src, tmp / src.name)
                written.append(src.name)
        drawn = {
            "head_usage.png": plots.head_usage(heads, tmp / "head_usage.png"),
            "quality_vs_retention.png": plots.quality_vs_retention(summary["sweep"], th.clip_delta_max.value,
                                                                   tmp / "quality_vs_retention.png"),
            "latency.png": plots.latency(summary["performance"], tmp / "latency.png"),
        }
        why = {"head_usage.png": "no profile.parquet or selection.json",
               "quality_vs_retention.png": "no validation point with a technique's removed_fraction",
               "latency.png": "no bench.json with per-image times"}
        for name, path in drawn.items():
            if path is None:
                summary["notes"].append(f"{name} not drawn: {why[name]}")
            else:
                written.append(name)
        summary["files"] = sorted(written)
        summary = write_record(tmp / "metrics_summary.json", ReportSummary.model_validate(summary))
    return ReportResult(target, summary, diff)
