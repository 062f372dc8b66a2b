"""`frag report` end to end on synthetic run files (no model runs)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from fragcli.bench import BenchRecord, Ratios, RunStats
from fragcli.cli.app import app
from fragcli.manifest import Manifest, content_hash
from fragcli.paths import reports_dir
from fragcli.records import ProfileContext, ValidationRecord
from fragcli.report.schema import ReportSummary
from fragcli.techniques.base import TechniqueSummary
from fragcli.techniques.head_selection import HeadSelection

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "shapes", "hash": "abc123" * 10 + "abcd"}
MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
SETTINGS = {"prompt": "a red circle", "steps": 10, "guidance": 2.5, "width": 64, "height": 64, "negative_prompt": ""}
VERSIONS = {"frag": "0.2.0", "torch": "2", "diffusers": "0.42", "transformers": "5", "python": "3.11"}
runner = CliRunner()


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, Manifest):
        path.write_text(obj.dump())  # with its content_sha256
        return path
    data = obj.model_dump(by_alias=True, mode="json") if isinstance(obj, BaseModel) else obj
    if path.name == "manifest.json":
        data = {**data, "content_sha256": content_hash(data)}
    path.write_text(json.dumps(data, sort_keys=True))
    return path


def heads_technique(frac: float, total: int = 8, name: str = "head_prune") -> dict:
    removed = round(frac * total)
    return {"name": name, "version": 1, "summary": TechniqueSummary(
        unit="attention_heads", units_total=total, units_removed=removed, removed_fraction=frac,
        params_removed=100 * removed, bytes_saved=400 * removed)}


def validation(frac, delta=-0.01, ssim=0.9, seeds=20, paraphrases=True, techniques=None) -> ValidationRecord:
    prompts = [f"p{i}" for i in range(6)]
    return ValidationRecord(
        fragment="../fragment", fragment_name="red-circle", manifest_sha256="x", model=MODEL, mode="physical",
        prompt="a red circle", settings=SETTINGS, seeds=list(range(seeds)),
        techniques=[heads_technique(frac)] if techniques is None else techniques,
        params={"before": 1000, "after": 900}, weight_bytes={"before": 4000, "after": 3600},
        per_image=[{"seed": s, "clip_full": 0.3, "clip_fragment": 0.3 * (1 + delta), "clip_delta_rel": delta,
                    "lpips": 0.1, "ssim": ssim, "phash_distance": 4, "passed": True} for s in range(seeds)],
        aggregate={"clip_full_mean": 0.3, "clip_fragment_mean": 0.3 * (1 + delta), "clip_delta_rel": delta,
                   "lpips_mean": 0.1, "ssim_mean": ssim, "phash_mean": 4.0, "pass_rate": 1.0},
        paraphrases={"prompts": prompts, "seeds": [0],
                     "per_prompt": [{"prompt": p, "clip_full": 0.3, "clip_fragment": 0.3, "clip_delta_rel": 0.0,
                                     "lpips": 0.1, "ssim": 0.9, "phash_distance": 4.0, "passed": i < 5}
                                    for i, p in enumerate(prompts)], "pass_rate": 5 / 6} if paraphrases else None,
        thresholds={}, passed=True)


def _run_stats(kind, per_image_s, weight_bytes, peak, params, vs=None) -> RunStats:
    return RunStats(kind=kind, repeats_total_s=[32 * per_image_s] * 4, total_s=32 * per_image_s,
                    per_image_s=per_image_s, per_image_s_range=(per_image_s, per_image_s),
                    images_per_min=60 / per_image_s, weight_bytes=weight_bytes, activation_peak_bytes=peak - weight_bytes,
                    peak_bytes_est=peak, cuda_peak_bytes=None, params=params, vs_baseline=vs)


def bench(speedup=2.0, weight_after=2800) -> BenchRecord:
    ratios = Ratios(speedup=speedup, speedup_range=(speedup, speedup), speedup_per_repeat=[speedup] * 4,
                    weight_reduction=1 - weight_after / 4000, peak_memory_reduction=0.3)
    return BenchRecord(
        created="2026-01-01T00:00:00Z", model=MODEL, fragment_path="../fragment", fragment_name="red-circle",
        device="cpu", dtype="fp32", variants=32, batch_size=1, repeats=4, prompt="a red circle", steps=10, width=64,
        height=64, runs={"full": _run_stats("full", 2.0, 4000, 1_000_000_000, 1000),
                         "fragment": _run_stats("fragment", 2.0 / speedup, weight_after, 700_000_000, 700, ratios)},
        speedup=speedup, speedup_range=(speedup, speedup), weight_reduction=1 - weight_after / 4000,
        peak_memory_reduction=0.3, peak_kind="weights_plus_rss", profile_cost_s=3.0, extract_cost_s=1.0,
        break_even_images=4.0 / (2.0 - 2.0 / speedup) if speedup > 1 else None)


def context() -> ProfileContext:
    return ProfileContext(
        model={**MODEL, "source": "builtin:shapes", "device": "cpu", "dtype": "fp32", "denoiser": "unet"},
        prompt="a red circle", text_embedding_hash=None, seeds=[0, 1], steps=10, profiled_steps=[0, 1],
        timesteps=[900.0, 800.0], guidance=2.5, width=64, height=64, scheduler="DDIMScheduler", exact_entropy=False,
        versions=VERSIONS, timings={"total_s": 3.0, "per_seed_s": [1.5, 1.5], "plain_first_seed_s": 1.45,
                                    "profiled_first_seed_s": 1.5, "overhead_ratio": 1.03},
        memory={"peak_rss_bytes": 10, "cuda_max_allocated_bytes": None, "weight_bytes": 4000},
        rows={"profile": 32}, images={}, settings=SETTINGS)


def manifest(weight_after=2800, techniques=None) -> Manifest:
    return Manifest(
        frag_version="0.2.0", name="red-circle", created="2026-01-01T00:00:00Z",
        base_model={**MODEL, "source": "builtin:shapes", "dtype": "fp32"},
        profiling={"prompt": "a red circle", "seeds": [0, 1], "steps": 10, "profiled_steps": [0, 1],
                   "guidance": 2.5, "width": 64, "height": 64},
        techniques=[{**heads_technique(0.375), "config": {}}] if techniques is None else techniques,
        params={"before": 1000, "after": 700, "removed": 300}, weight_bytes={"before": 4000, "after": weight_after},
        artifacts={})


def selection() -> HeadSelection:
    return HeadSelection(
        params={"head_retention": 0.625, "score": "composite", "per_module": False, "safety_margin": 0.0,
                "stability_threshold": 0.25},
        removed={MODULES[0]: [0, 1], MODULES[1]: [3]}, kept={MODULES[0]: 2, MODULES[1]: 3},
        scores={m: [0.1, 0.2, 0.3, 0.4] for m in MODULES}, instability={m: [0.0] * 4 for m in MODULES},
        protected={MODULES[1]: [0]}, heads_total=8, heads_removed=3, achieved_retention=0.625)


def make_run(root: Path, ssim=0.9, speedup=2.0, weight_after=2800) -> Path:
    run = root / "run1"
    rows = [{"module": m, "block": "down_blocks.0", "kind": "self" if m.endswith("1") else "cross", "head": h,
             "heads": 4, "seed": s, "step": t, "timestep": 900.0 - 100 * t, "energy_pre": 1.0 + h + s,
             "energy_post": 0.5 * (h + 1) + t, "entropy": float("nan") if m.endswith("2") else 0.1 * h}
            for m in MODULES for h in range(4) for s in range(2) for t in range(2)]
    (run / "profile").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run / "profile" / "profile.parquet")
    dump(run / "profile" / "context.json", context())
    dump(run / "fragment" / "manifest.json", manifest(weight_after))
    dump(run / "fragment" / "selection.json", selection())
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
    assert "attention_heads removed_fraction 0.375" in h1["evidence"]
    assert summary["fragment"]["techniques"] == [{"name": "head_prune", "unit": "attention_heads", "units_removed": 3,
                                                  "units_total": 8, "removed_fraction": 0.375, "params_removed": 300,
                                                  "bytes_saved": 1200}]
    assert sorted(p["removed_fraction"]["attention_heads"] for p in summary["sweep"]) == [0.125, 0.25, 0.375, 0.5]
    assert summary["metrics"]["removed_fraction"] == {"attention_heads": 0.375}
    assert summary["quality"]["removed_fraction"] == {"attention_heads": 0.375}
    assert summary["memory"]["full_weight_bytes"] == 4000 and summary["performance"]["fragment_per_image_s"] == 1.0
    on_disk = json.loads((out / "metrics_summary.json").read_text())
    assert ReportSummary.model_validate(on_disk).model_dump(by_alias=True, mode="json") == on_disk == summary
    assert summary["gate"] == {"enforced": True, "passed": True, "status": "PASS", "failures": [], "invalid": []}
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
    assert rows["fragment_cuda_peak_bytes"]["status"] == "UNAVAILABLE"  # optional (a GPU measures it)
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
    dump(run / "validate" / "validation.json", validation(0.375).model_copy(update={"fragment": str(outside)}))
    dump(run / "sweep" / "h50" / "fragment" / "manifest.json", manifest().model_copy(update={"name": "sweep-point"}))
    dump(run / "sweep" / "h50" / "validate" / "validation.json", validation(0.5, ssim=0.7))
    r = invoke("--run", run, "--sweep", run / "sweep", "--compare", "none", "--json")
    assert r.exit_code == 0, r.output
    inputs = json.loads(r.stdout)["provenance"]["inputs"]
    assert inputs["manifest"].endswith("red-circle/manifest.json")
    assert inputs["validation"] == "run1/validate/validation.json"


@pytest.mark.parametrize(("name", "change", "needles"), [
    ("validate/validation.json", {"seeds": "x"}, ("validation.json", "seeds")),
    ("validate/validation.json", {"aggregate": {"ssim_mean": 0.9}}, ("validation.json", "aggregate")),
    ("validate/validation.json", {"schema_version": 9}, ("validation.json", "schema_version 9", "upgrade frag")),
    ("profile/context.json", {"timings": {"total_s": "slow"}}, ("context.json", "timings")),
    ("fragment/selection.json", {"removed": {"m": ["a"]}}, ("selection.json", "removed")),
    ("fragment/manifest.json", {"techniques": [{"name": 1}]}, ("manifest", "techniques")),
    ("bench/bench.json", {"speedup": None}, ("bench", "speedup")),
])
def test_a_wrong_typed_file_is_a_one_line_error(tmp_path, name, change, needles):
    from tests.helpers import assert_one_line_error

    run = make_run(tmp_path)
    data = json.loads((run / name).read_text())
    dump(run / name, {**data, **change})
    assert_one_line_error(invoke("--run", run, "--compare", "none"), *needles)


def test_a_v1_manifest_is_read_migrated(tmp_path):
    import shutil

    run = make_run(tmp_path)
    shutil.rmtree(run / "fragment")
    shutil.copytree(ROOT / "tests" / "fixtures" / "v1_shapes_h80" / "fragment", run / "fragment")
    r = invoke("--run", run, "--compare", "none", "--json")
    assert r.exit_code == 0, r.output
    techniques = json.loads(r.stdout)["fragment"]["techniques"]
    assert len(techniques) == 1 and techniques[0]["unit"] == "attention_heads"
    assert 0 < techniques[0]["removed_fraction"] < 1


def test_the_committed_baseline_is_still_comparable(tmp_path):
    """The baseline under reports/baseline was written with schema_version 1; its metrics still diff."""
    import shutil

    base = reports_dir() / "baseline" / "shapes"
    base.mkdir(parents=True)
    shutil.copy(ROOT / "reports" / "baseline" / "shapes" / "metrics_summary.json", base)
    r = invoke("--run", make_run(tmp_path), "--compare", "baseline", "--json")
    assert r.exit_code == 0, r.output
    diff = json.loads((Path(json.loads(r.stdout)["report_dir"]) / "regression_diff.json").read_text())
    rows = {row["metric"]: row for row in diff["metrics"]}
    assert diff["baseline"]["path"].endswith("baseline/shapes")
    assert rows["ssim_mean"]["baseline"] is not None and rows["ssim_mean"]["status"] in ("PASS", "FAIL")


def test_no_head_technique_leaves_h1_unavailable(tmp_path):
    run = make_run(tmp_path)
    steps = [{"name": "step_cache", "version": 1, "summary": TechniqueSummary()}]
    dump(run / "validate" / "validation.json", validation(0.0, techniques=steps))
    dump(run / "fragment" / "manifest.json", manifest(techniques=[{**steps[0], "config": {}}]))
    r = invoke("--run", run, "--compare", "none", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    h1 = summary["hypotheses"][0]
    assert h1["status"] == "UNAVAILABLE" and "attention_heads" in h1["note"]
    assert summary["fragment"]["techniques"][0]["unit"] is None
    assert any("quality_vs_retention.png not drawn" in n for n in summary["notes"])


def test_a_gate_never_passes_on_measurements_it_could_not_make(tmp_path, frag_home):
    """No validation: INVALID (exit 3). validate into its default folder: the report finds the manifest's quality
    block; a failing gate exits 1; unmeasurable metrics gate only when not marked optional."""
    from tests.helpers import run_cli, tiny_chain

    _, _, frag = tiny_chain(tmp_path, "a red circle on a blue background")
    strict = tmp_path / "strict.yaml"
    strict.write_text("ssim_min: 1.0\n")
    r = run_cli("report", "--run", frag, "--gate", strict, "--compare", "none", "--out", tmp_path / "r0")
    assert r.exit_code == 3, r.output
    assert "gate INVALID" in r.stderr and "gate passed" not in r.stderr
    summary = json.loads((tmp_path / "r0" / "metrics_summary.json").read_text())
    assert summary["gate"]["status"] == "INVALID" and not summary["gate"]["passed"]
    assert {g["gate"]: g["status"] for g in summary["gates"]}["ssim_min"] == "INVALID"

    assert run_cli("validate", frag, "--seeds", "2", "--paraphrase-seeds", "1").exit_code == 0  # default --out
    r = run_cli("report", "--run", frag, "--gate", strict, "--compare", "none", "--out", tmp_path / "r1")
    assert r.exit_code == 1, r.output  # SSIM measured (through the manifest) and below 1.0
    gates = {g["gate"]: g for g in json.loads((tmp_path / "r1" / "metrics_summary.json").read_text())["gates"]}
    assert gates["ssim_min"]["status"] == "FAIL" and "quality block" in gates["ssim_min"]["source"]
    assert gates["clip_delta_max"]["status"] == "INVALID"  # tiny has no CLIP judge

    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("ssim_min: 0.0\nclip_delta_max: {value: 0.02, direction: max, optional: true}\n")
    r = run_cli("report", "--run", frag, "--gate", lenient, "--compare", "none", "--out", tmp_path / "r2")
    assert r.exit_code == 0, r.output
    assert "gate passed" in r.stderr and "optional gate(s) could not be measured" in r.stderr
