"""Issue 34: a gate never passes on a missing baseline. A regression whose baseline (or current run) lacks the
metric or holds NaN/inf is INVALID (exit 3) unless thresholds.yaml marks it optional, and a gate in which no
quality metric at all was measured is INVALID even when every quality gate is optional. No model runs."""

import json
import math
from pathlib import Path

import pytest

from tests.test_report import ROOT, invoke, make_run

GATE = ROOT / "thresholds.yaml"


@pytest.fixture
def baseline(tmp_path):
    """A report of a complete synthetic run, used as the baseline; returns (run, baseline folder)."""
    run = make_run(tmp_path / "base")
    base = tmp_path / "baseline"
    r = invoke("--run", run, "--compare", "none", "--out", base)
    assert r.exit_code == 0, r.output
    return run, base


def _edit_metrics(base: Path, **changes) -> None:
    """Change (value) or drop (None) metrics of the baseline's metrics_summary.json; NaN/inf written as JSON does."""
    path = base / "metrics_summary.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data["metrics"].pop(key, None)
        else:
            data["metrics"][key] = value
    path.write_text(json.dumps(data))  # allow_nan: NaN / Infinity, as another tool might write them


def _invalid_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("INVALID")]


def test_an_intact_baseline_still_passes(baseline, tmp_path):
    run, base = baseline
    r = invoke("--run", run, "--compare", base, "--gate", GATE, "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert "gate passed" in r.stderr


@pytest.mark.parametrize(("metric", "value", "word"), [
    ("speedup", None, "missing"),
    ("ssim_mean", float("nan"), "not a finite number"),
    ("fragment_weight_bytes", float("inf"), "not a finite number"),
    ("clip_delta_rel", float("-inf"), "not a finite number"),
    ("pass_rate", "0.9", "not a finite number"),  # a string is not a measurement either
])
def test_a_baseline_without_the_metric_is_invalid(baseline, tmp_path, metric, value, word):
    run, base = baseline
    _edit_metrics(base, **{metric: value})
    r = invoke("--run", run, "--compare", base, "--gate", GATE, "--out", tmp_path / "r")
    assert r.exit_code == 3, r.output
    assert "gate passed" not in r.stderr and "gate INVALID" in r.stderr
    lines = _invalid_lines(r)
    assert len(lines) == 1 and metric in lines[0] and "baseline" in lines[0] and word in lines[0], r.stderr
    summary = json.loads((tmp_path / "r" / "metrics_summary.json").read_text())
    assert summary["gate"]["status"] == "INVALID" and not summary["gate"]["passed"]
    gates = {g["gate"]: g for g in summary["gates"]}
    assert gates[f"regression.{metric}"]["status"] == "INVALID"
    diff = json.loads((tmp_path / "r" / "regression_diff.json").read_text())
    assert {row["metric"]: row["status"] for row in diff["metrics"]}[metric] == "INVALID"


def test_an_optional_regression_may_lack_its_baseline(baseline, tmp_path):
    run, base = baseline
    _edit_metrics(base, speedup=None, ssim_mean=math.nan)
    lenient = tmp_path / "lenient.yaml"
    shipped = "  optional: [lpips_mean, fragment_cuda_peak_bytes]"
    assert shipped in GATE.read_text()
    lenient.write_text(GATE.read_text().replace(shipped, "  optional: [speedup, ssim_mean, lpips_mean, "
                                                "fragment_cuda_peak_bytes]"))
    r = invoke("--run", run, "--compare", base, "--gate", lenient, "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert "gate passed" in r.stderr and "regression.speedup" in r.stderr  # named as skipped
    gates = {g["gate"]: g["status"] for g in json.loads((tmp_path / "r" / "metrics_summary.json").read_text())["gates"]}
    assert gates["regression.speedup"] == "UNAVAILABLE" and gates["regression.ssim_mean"] == "UNAVAILABLE"


def test_a_metric_reported_only_never_gates(baseline, tmp_path):
    """latency_rel is null (reported only): its metric missing from the baseline changes nothing."""
    run, base = baseline
    _edit_metrics(base, fragment_per_image_s=None)
    r = invoke("--run", run, "--compare", base, "--gate", GATE, "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output


def test_the_current_run_lacking_a_gated_metric_is_invalid(baseline, tmp_path):
    """The baseline has a speedup; this run has no bench.json: the speedup regression could not be checked."""
    _, base = baseline
    run = make_run(tmp_path / "cur")
    (run / "bench" / "bench.json").unlink()
    r = invoke("--run", run, "--compare", base, "--gate", GATE, "--out", tmp_path / "r")
    assert r.exit_code == 3, r.output
    assert any("regression.speedup" in ln and "this run" in ln for ln in _invalid_lines(r)), r.stderr


def test_a_missing_baseline_report_is_invalid_when_asked_for(tmp_path, frag_home):
    """--compare baseline with no baseline report for this model: nothing to compare with, so the gate cannot
    pass (without --gate it stays a note)."""
    run = make_run(tmp_path)
    r = invoke("--run", run, "--compare", "baseline", "--gate", GATE, "--out", tmp_path / "r")
    assert r.exit_code == 3, r.output
    lines = _invalid_lines(r)
    assert len(lines) == 1 and "baseline" in lines[0], r.stderr
    r = invoke("--run", run, "--compare", "baseline", "--out", tmp_path / "r2")
    assert r.exit_code == 0, r.output


def test_no_quality_metric_measured_is_invalid_even_when_every_gate_is_optional(tmp_path):
    run = make_run(tmp_path)
    (run / "validate" / "validation.json").unlink()
    optional = tmp_path / "optional.yaml"
    optional.write_text("".join(f"{g}: {{value: {v}, direction: {d}, optional: true}}\n" for g, v, d in (
        ("clip_delta_max", 0.02, "max"), ("lpips_max", 0.25, "max"), ("ssim_min", 0.6, "min"),
        ("phash_max", 12, "max"))))
    r = invoke("--run", run, "--compare", "none", "--gate", optional, "--out", tmp_path / "r")
    assert r.exit_code == 3, r.output
    lines = _invalid_lines(r)
    assert len(lines) == 1 and "no quality metric" in lines[0], r.stderr
    for metric in ("clip_delta_rel", "ssim_mean", "phash_mean"):
        assert metric in lines[0]
    assert "gate passed" not in r.stderr


def test_optional_regressions_name_known_metrics(tmp_path):
    from fragcli.errors import FragError
    from fragcli.report.diff import RULES
    from fragcli.thresholds import REGRESSION_METRICS, load_thresholds

    assert {r.metric for r in RULES} == set(REGRESSION_METRICS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("regression: {optional: [speed]}\n")
    with pytest.raises(FragError, match="regression.optional.*unknown metric 'speed'"):
        load_thresholds(bad)
