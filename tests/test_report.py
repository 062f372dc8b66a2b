"""`frag report` end to end on synthetic run files (no model runs)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fragcli.cli.app import app
from fragcli.paths import reports_dir

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "shapes", "hash": "abc123" * 10}
MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
runner = CliRunner()


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True))
    return path


def validation(frac, delta=-0.01, ssim=0.9, seeds=20, paraphrases=True):
    return {
        "_type": "frag.validation", "schema_version": 1, "fragment": "../fragment", "manifest_sha256": "x",
        "model": MODEL, "mode": "physical", "prompt": "a red circle", "seeds": list(range(seeds)),
        "head_retention": 1 - frac, "heads_removed_fraction": frac, "params": {"before": 1000, "after": 900},
        "weight_bytes": {"before": 4000, "after": 3600},
        "per_image": [{"seed": s, "clip_full": 0.3, "clip_fragment": 0.3 * (1 + delta), "clip_delta_rel": delta,
                       "lpips": 0.1, "ssim": ssim, "phash_distance": 4, "passed": True} for s in range(seeds)],
        "aggregate": {"clip_full_mean": 0.3, "clip_fragment_mean": 0.3 * (1 + delta), "clip_delta_rel": delta,
                      "lpips_mean": 0.1, "ssim_mean": ssim, "phash_mean": 4.0, "pass_rate": 1.0},
        "unavailable": {},
        "paraphrases": {"prompts": [f"p{i}" for i in range(6)], "per_prompt": [], "pass_rate": 5 / 6}
        if paraphrases else None,
        "thresholds": {}, "passed": True,
    }


def bench(speedup=2.0, weight_after=2800):
    return {
        "_type": "frag.bench", "schema_version": 1, "model": MODEL, "device": "cpu",
        "variants": 32, "prompt": "a red circle", "steps": 10, "repeats": 4,
        "full": {"total_s": 64.0, "per_image_s": 2.0, "images_per_min": 30.0, "peak_bytes_est": 1e9,
                 "cuda_peak_bytes": None, "weight_bytes": 4000, "params": 1000},
        "fragment": {"total_s": 64.0 / speedup, "per_image_s": 2.0 / speedup, "images_per_min": 30.0 * speedup,
                     "peak_bytes_est": 7e8, "cuda_peak_bytes": None, "weight_bytes": weight_after, "params": 700},
        "speedup": speedup, "weight_reduction": 1 - weight_after / 4000, "peak_memory_reduction": 0.3,
        "profile_cost_s": 3.0, "extract_cost_s": 1.0, "break_even_images": 4.0 / (2.0 - 2.0 / speedup),
    }


def make_run(root: Path, ssim=0.9, speedup=2.0, weight_after=2800) -> Path:
    run = root / "run1"
    rows = [{"module": m, "block": "down_blocks.0", "kind": "self" if m.endswith("1") else "cross", "head": h,
             "heads": 4, "seed": s, "step": t, "timestep": 900.0 - 100 * t, "energy_pre": 1.0 + h + s,
             "energy_post": 0.5 * (h + 1) + t, "entropy": float("nan") if m.endswith("2") else 0.1 * h}
            for m in MODULES for h in range(4) for s in range(2) for t in range(2)]
    (run / "profile").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run / "profile" / "profile.parquet")
    dump(run / "profile" / "context.json", {"_type": "frag.profile", "schema_version": 1,
                                            "model": {**MODEL, "device": "cpu"}, "prompt": "a red circle",
                                            "timings": {"total_s": 3.0, "overhead_ratio": 1.03}})
    dump(run / "fragment" / "manifest.json", {"_type": "frag.fragment", "schema_version": 1, "name": "red-circle",
                                              "base_model": MODEL, "pruning": {"head_retention": 0.625,
                                                                               "heads_total": 8, "heads_kept": 5},
                                              "weight_bytes": {"before": 4000, "after": weight_after}})
    dump(run / "fragment" / "selection.json", {"_type": "frag.selection", "schema_version": 1,
                                               "removed": {MODULES[0]: [0, 1], MODULES[1]: [3]},
                                               "kept": {MODULES[0]: 2, MODULES[1]: 3},
                                               "scores": {m: [0.1, 0.2, 0.3, 0.4] for m in MODULES},
                                               "protected": {MODULES[1]: [0]}})
    dump(run / "validate" / "validation.json", validation(0.375, ssim=ssim))
    dump(run / "bench" / "bench.json", bench(speedup, weight_after))
    return run


def invoke(*args):
    return runner.invoke(app, ["report", *map(str, args)])


def only_report(model="shapes"):
    found = sorted((reports_dir() / model).glob("*/metrics_summary.json"))
    return found[-1].parent


def test_report_writes_files_and_passes(tmp_path):
    run = make_run(tmp_path)
    sweep = tmp_path / "sweep"
    for frac, delta in ((0.125, 0.0), (0.25, -0.005), (0.5, -0.03)):
        dump(sweep / f"r{frac}" / "validation.json", validation(frac, delta))
    res = invoke("--run", run, "--gate", ROOT / "thresholds.yaml", "--sweep", sweep, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    out = Path(summary["report_dir"])
    assert out.parent.parent == reports_dir() and out.parent.name == "shapes"
    for name in ("metrics_summary.json", "head_importance.json", "regression_diff.json", "profile.parquet",
                 "head_usage.png", "quality_vs_retention.png", "latency.png"):
        assert (out / name).is_file(), name
    assert summary["_type"] == "frag.report" and summary["model"] == MODEL
    assert len(summary["fragment"]["hash"]) == 64
    assert summary["provenance"]["versions"]["frag"]
    status = {h["id"]: h["status"] for h in summary["hypotheses"]}
    assert status == {"H1": "PASS", "H2": "PASS", "H3": "PASS", "H4": "PASS", "H5": "PASS"}
    h1 = summary["hypotheses"][0]
    assert h1["value"] == 0.375 and len(summary["sweep"]) == 4
    assert summary["gate"] == {"enforced": True, "passed": True, "failures": []}
    heads = json.loads((out / "head_importance.json").read_text())
    first = heads["modules"][0]
    assert first["module"] == MODULES[0] and first["energy_post"] == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert first["status"] == ["removed", "removed", "kept", "kept"]
    assert heads["modules"][1]["entropy"] == [None] * 4 and heads["modules"][1]["status"][0] == "protected"
    assert heads["totals"]["removed"] == 3
    assert "hypotheses" in res.stderr and "gate passed" in res.stderr
    diff = json.loads((out / "regression_diff.json").read_text())
    assert diff["baseline"] is None and "no earlier report" in diff["note"]


def test_stricter_thresholds_fail_with_exit_1(tmp_path):
    run = make_run(tmp_path)
    strict = tmp_path / "strict.yaml"
    strict.write_text("ssim_min: {value: 0.95, direction: min}\n")
    res = invoke("--run", run, "--gate", strict, "--compare", "none")
    assert res.exit_code == 1, res.output
    assert "ssim_min" in res.stderr and "gate failed" in res.stderr
    summary = json.loads((only_report() / "metrics_summary.json").read_text())
    assert summary["gate"]["passed"] is False and "ssim_min" in summary["gate"]["failures"][0]


def test_gate_hypotheses_opt_in(tmp_path):
    run = make_run(tmp_path, speedup=1.2)  # H4 fails
    plain = invoke("--run", run, "--gate", ROOT / "thresholds.yaml", "--compare", "none")
    assert plain.exit_code == 0, plain.output
    opt_in = tmp_path / "h4.yaml"
    opt_in.write_text("gate_hypotheses: [H4]\n")
    res = invoke("--run", run, "--gate", opt_in, "--compare", "none")
    assert res.exit_code == 1 and "H4 FAIL" in res.stderr


def test_no_gate_reports_only(tmp_path):
    run = make_run(tmp_path, ssim=0.1)
    res = invoke("--run", run)
    assert res.exit_code == 0 and "not enforced" in res.stderr


@pytest.mark.parametrize("text", ["ssim_min: [1,\n", "ssim_mn: 0.5\n"])
def test_malformed_thresholds_exit_2(tmp_path, text):
    run = make_run(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    res = invoke("--run", run, "--gate", bad)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " -- " in lines[0]
    assert not reports_dir().exists() or not any(reports_dir().rglob("metrics_summary.json"))


def test_bad_inputs_exit_2(tmp_path):
    run = make_run(tmp_path)
    assert invoke("--run", tmp_path / "nope").exit_code == 2
    (tmp_path / "empty").mkdir()
    res = invoke("--run", tmp_path / "empty")
    assert res.exit_code == 2 and "no frag files" in res.stderr
    res = invoke("--run", run, "--compare", tmp_path / "missing-report")
    assert res.exit_code == 2 and "--compare" in res.stderr


def test_regression_against_baseline(tmp_path):
    # a committed baseline: same model, better numbers
    base_run = make_run(tmp_path / "base", speedup=2.0, weight_after=2800)
    assert invoke("--run", base_run, "--compare", "none", "--out", reports_dir() / "baseline" / "shapes").exit_code == 0
    # the same numbers pass against it
    ok = invoke("--run", base_run, "--compare", "baseline", "--gate", ROOT / "thresholds.yaml", "--json")
    assert ok.exit_code == 0, ok.output
    diff = json.loads((Path(json.loads(ok.stdout)["report_dir"]) / "regression_diff.json").read_text())
    assert diff["baseline"]["path"].endswith("baseline/shapes") and diff["passed"]
    rows = {r["metric"]: r for r in diff["metrics"]}
    assert rows["speedup"]["status"] == "PASS" and rows["fragment_per_image_s"]["status"] == "INFO"
    assert rows["fragment_cuda_peak_bytes"]["status"] == "MISSING"
    # slower and heavier: speedup -60% (> 50%), weights +14% (> 5%) -> exit 1
    worse = make_run(tmp_path / "worse", speedup=0.8, weight_after=3200)
    res = invoke("--run", worse, "--compare", "baseline", "--gate", ROOT / "thresholds.yaml", "--json")
    assert res.exit_code == 1, res.output
    summary = json.loads(res.stdout)
    assert set(summary["regression"]["failures"]) == {"speedup", "fragment_weight_bytes"}
    diff = json.loads((Path(summary["report_dir"]) / "regression_diff.json").read_text())
    row = {r["metric"]: r for r in diff["metrics"]}["speedup"]
    assert row["baseline"] == 2.0 and row["current"] == 0.8 and row["delta"] == pytest.approx(-1.2)
    assert row["tolerance"] == 0.5 and row["limit"] == pytest.approx(1.0) and row["status"] == "FAIL"
    assert "speedup regressed" in res.stderr
    # --compare latest finds the previous report for this model (not the baseline folder)
    latest = invoke("--run", worse, "--compare", "latest", "--json")
    assert latest.exit_code == 0
    assert json.loads(latest.stdout)["regression"]["baseline"]["path"] == summary["report_dir"]


def test_fragment_outside_the_run_and_sweep_inside_it(tmp_path):
    """The run's own fragment is found through validation.json; sweep points inside the run are not mistaken for it."""
    import shutil

    run = make_run(tmp_path)
    outside = tmp_path / "fragments" / "red-circle"
    shutil.move(str(run / "fragment"), str(outside))
    v = json.loads((run / "validate" / "validation.json").read_text())
    v["fragment"] = str(outside)
    dump(run / "validate" / "validation.json", v)
    sweep_manifest = json.loads((outside / "manifest.json").read_text())
    sweep_manifest["name"] = "sweep-point"
    dump(run / "sweep" / "h50" / "fragment" / "manifest.json", sweep_manifest)
    dump(run / "sweep" / "h50" / "validate" / "validation.json", validation(0.5, ssim=0.7))
    r = invoke("--run", run, "--sweep", run / "sweep", "--compare", "none", "--json")
    assert r.exit_code == 0, r.output
    inputs = json.loads(r.stdout)["provenance"]["inputs"]
    assert inputs["manifest"].endswith("red-circle/manifest.json")
    assert inputs["validation"] == "run1/validate/validation.json"
