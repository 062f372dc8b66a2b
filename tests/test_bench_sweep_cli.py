"""`frag bench` and `frag sweep` on the tiny model (tiny settings), and library calls that leave process state alone."""

import json
import logging
import statistics
import warnings

import pytest

from fragcli.bench import BenchRecord, performance_block, read_bench
from fragcli.sweep import SweepRecord
from tests.helpers import assert_one_line_error, private_copy, run_cli, tiny_chain

PROMPT = "a red circle on a blue background"
FAST = ("--variants", "2", "--steps", "2", "--no-memory")  # the probes: tests/test_bench_memory.py


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return tiny_chain(tmp_path_factory.mktemp("bschain"), PROMPT)


@pytest.fixture
def fragment(chain, tmp_path):
    return private_copy(chain[2], tmp_path)


def test_bench_writes_a_typed_record_into_out_and_the_manifest(fragment, tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", fragment, *FAST, "--repeats", "2", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    on_disk = json.loads((out / "bench.json").read_text())
    printed = json.loads(r.stdout)
    assert printed.pop("out") == str((out / "bench.json").resolve()) and printed == on_disk
    rec = BenchRecord.model_validate(on_disk)
    assert rec == read_bench(out / "bench.json")
    assert on_disk["_type"] == "frag.bench" and on_disk["schema_version"] == 4
    assert rec.baseline == "full" and set(rec.runs) == {"full", "fragment"}
    f, x = rec.runs["full"], rec.runs["fragment"]
    assert f.vs_baseline is None and x.vs_baseline is not None
    assert rec.variants == 2 and rec.repeats == 2 and rec.steps == 2 and rec.order == "ABBA"
    for run in (f, x):
        assert len(run.repeats_total_s) == 2
        per = [t / 2 for t in run.repeats_total_s]
        assert run.per_image_s == pytest.approx(statistics.median(per))
        assert run.per_image_s_range == pytest.approx((min(per), max(per)))
        assert run.peak_bytes_est == run.weight_bytes + run.activation_peak_bytes
    ratios = [a / b for a, b in zip(f.repeats_total_s, x.repeats_total_s, strict=True)]
    assert x.vs_baseline.speedup_per_repeat == pytest.approx(ratios)
    assert rec.speedup == x.vs_baseline.speedup == pytest.approx(statistics.median(ratios))
    assert rec.speedup_range == pytest.approx((min(ratios), max(ratios)))
    assert x.weight_bytes < f.weight_bytes and rec.weight_reduction == x.vs_baseline.weight_reduction > 0
    assert x.params < f.params
    saved = f.per_image_s - x.per_image_s
    cost = rec.profile_cost_s + rec.extract_cost_s
    assert rec.profile_cost_s > 0 and rec.extract_cost_s > 0
    assert rec.break_even_images == (pytest.approx(cost / saved) if saved > 0 else None)
    kept = len(json.loads((fragment / "manifest.json").read_text())["profiling"]["seeds"])
    assert rec.profile_images == kept > 0
    marginal = max(0.0, cost - kept * f.per_image_s) / saved if saved > 0 else None
    assert rec.break_even_images_marginal == (pytest.approx(marginal) if saved > 0 else None)
    assert f.fidelity is None and x.fidelity is not None  # the fragment's images against the full model's
    assert 0 < x.fidelity.ssim_mean <= 1 and x.fidelity.phash_mean >= 0 and x.fidelity.pass_rate is not None
    assert rec.fragment_path == str(fragment.resolve()) and rec.techniques == ["head_prune"]
    perf = json.loads((fragment / "manifest.json").read_text())["performance"]
    assert perf == pytest.approx(performance_block(rec))
    assert perf["peak_kind"] == "weights_plus_rss" and perf["latency_full_ms"] == pytest.approx(1000 * f.per_image_s)
    r = run_cli("report", "--run", tmp_path, "--compare", "none", "--out", tmp_path / "rep", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["performance"]["speedup"] == pytest.approx(rec.speedup)
    assert summary["performance"]["fragment_per_image_s"] == pytest.approx(x.per_image_s)


def test_bench_default_out_overwrite_and_no_manifest(fragment, frag_home):
    r = run_cli("bench", fragment, *FAST, "--repeats", "1", "--no-manifest")
    assert r.exit_code == 0, r.output
    [path] = (frag_home / "reports" / "tiny").glob("*/bench/bench.json")
    assert r.stdout.strip() == f"bench written to {path}"
    assert json.loads((fragment / "manifest.json").read_text())["performance"] is None
    assert_one_line_error(run_cli("bench", fragment, *FAST, "--repeats", "1", "--out", path.parent),
                          "not empty", "--overwrite")
    first = path.read_text()
    r = run_cli("bench", fragment, *FAST, "--repeats", "1", "--out", path.parent, "--overwrite")
    assert r.exit_code == 0, r.output
    assert path.read_text() != first and [p.name for p in path.parent.iterdir() if p.name[0] != "."] == ["bench.json"]
    assert_one_line_error(run_cli("bench", fragment, *FAST, "--out", fragment, "--overwrite"), "input")
    assert json.loads((fragment / "manifest.json").read_text())["performance"]["variants"] == 2


def test_bench_refuses_bad_input(fragment, tmp_path):
    out = tmp_path / "b"
    assert_one_line_error(run_cli("bench", tmp_path / "missing", "--out", out), "no manifest.json")
    assert_one_line_error(run_cli("bench", fragment, "--variants", "0", "--out", out), "--variants")
    assert_one_line_error(run_cli("bench", fragment, "--repeats", "0", "--out", out), "--repeats")
    (fragment / "fragment.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_cli("bench", fragment, *FAST, "--out", out), "does not match its hash")
    assert not out.exists() and not list(tmp_path.glob(".b*"))  # no output, no lock left behind


def test_read_bench_migrates_version_1_and_refuses_junk(tmp_path):
    from fragcli.errors import FragError

    run = {"total_s": 2.0, "repeats_total_s": [2.0], "per_image_s": 1.0, "images_per_min": 60.0, "weight_bytes": 100,
           "activation_peak_bytes": 10, "peak_bytes_est": 110, "cuda_peak_bytes": None, "params": 25}
    v1 = {"_type": "frag.bench", "schema_version": 1, "model": {"name": "tiny", "hash": "0" * 64},
          "fragment_path": "/f", "fragment_name": "f", "device": "cpu", "dtype": "fp32", "variants": 2, "batch_size": 1,
          "repeats": 1, "prompt": "p", "steps": 2, "width": 64, "height": 64, "full": run,
          "fragment": {**run, "total_s": 1.0, "repeats_total_s": [1.0], "per_image_s": 0.5, "weight_bytes": 80,
                       "peak_bytes_est": 90},
          "speedup": 2.0, "weight_reduction": 0.2, "peak_memory_reduction": 0.18, "profile_cost_s": 1.0,
          "extract_cost_s": 1.0, "break_even_images": 4.0, "versions": {}, "created": "2026-01-01T00:00:00Z"}
    (tmp_path / "bench.json").write_text(json.dumps(v1))
    rec = read_bench(tmp_path / "bench.json")
    assert rec.speedup == 2.0 and rec.runs["fragment"].vs_baseline.speedup_range == (2.0, 2.0)
    (tmp_path / "bench.json").write_text(json.dumps({**v1, "schema_version": 2}))
    with pytest.raises(FragError, match="invalid"):
        read_bench(tmp_path / "bench.json")


@pytest.mark.parametrize("command", ["profile", "extract", "generate", "validate", "bench", "sweep", "report"])
def test_every_command_has_help_with_an_example(command):
    r = run_cli(command, "--help")
    assert r.exit_code == 0 and f"Example: frag {command}" in " ".join(r.output.split())
    assert "--json" in r.output and "--out" in r.output and "--overwrite" in r.output


def test_sweep_writes_points_and_a_typed_record(chain, tmp_path):
    _, prof, _ = chain
    out = tmp_path / "sweep"
    r = run_cli("sweep", prof, "--values", "0.9,0.5", "--seeds", "2", "--set", "score=energy", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rec = SweepRecord.model_validate(json.loads((out / "sweep.json").read_text()))
    assert json.loads(r.stdout)["points"] == rec.dump()["points"]
    assert rec.option == "head_retention" and rec.options == {"score": "energy"} and rec.seeds == [0, 1]
    assert [p.name for p in rec.points] == ["h90", "h50"] and [p.value for p in rec.points] == [0.9, 0.5]
    removed = []
    for p in rec.points:
        manifest = json.loads((out / p.fragment / "manifest.json").read_text())
        validation = json.loads((out / p.validation).read_text())
        assert manifest["techniques"][0]["config"]["method"] == "energy"
        assert validation["fragment"] == str((out / p.fragment).resolve())  # the final folder, not the staging one
        assert p.aggregate == validation["aggregate"] and p.passed == validation["passed"]
        assert manifest["quality"]["ssim_mean"] == pytest.approx(p.aggregate["ssim_mean"])
        [t] = p.techniques
        assert t.name == "head_prune"
        removed.append(t.summary.removed_fraction)
    assert removed[0] < removed[1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    r = run_cli("report", "--run", chain[0], "--sweep", out, "--compare", "none", "--out", tmp_path / "rep", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["sweep"]) == 2


def test_sweep_refuses_bad_input(chain, tmp_path):
    _, prof, _ = chain
    out = tmp_path / "s"
    assert_one_line_error(run_cli("sweep", prof, "--values", "0.9,x", "--out", out), "--values")
    assert_one_line_error(run_cli("sweep", prof, "--values", "0.9,0.9", "--out", out), "repeats")
    assert_one_line_error(run_cli("sweep", prof, "--option", "nope", "--out", out), "unknown --option", "head-retention")
    assert_one_line_error(run_cli("sweep", prof, "--set", "score", "--out", out), "--set")
    assert_one_line_error(run_cli("sweep", prof, "--set", "colour=red", "--out", out), "colour")
    assert_one_line_error(run_cli("sweep", tmp_path / "missing", "--out", out), "missing")
    assert_one_line_error(run_cli("sweep", prof, "--values", "1.5", "--seeds", "1", "--out", out), "retention")
    assert not out.exists()


def _process_state():
    import torch
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    return {"filters": list(warnings.filters), "threads": torch.get_num_threads(),
            "rng": torch.random.get_rng_state().clone(), "logging_disable": logging.root.manager.disable,
            "libs": [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlogging, tlogging)]}


def _same(a, b) -> None:
    import torch

    assert torch.equal(a.pop("rng"), b.pop("rng")), "torch's global RNG state changed"
    assert a == b


def test_library_calls_leave_process_state_unchanged(monkeypatch, tmp_path):
    """load_model and the metric loaders change no warnings filter, thread count, log level or RNG state."""
    import open_clip
    import torch
    import torchvision
    from diffusers.utils import logging as dlogging
    from safetensors.torch import save_file
    from transformers.utils import logging as tlogging

    from fragcli.judge import load_judge
    from fragcli.metrics import ClipScorer, LpipsMetric, load_metrics
    from fragcli.models import load_model
    from tests.test_metrics import TINY_CLIP

    cfg = tmp_path / "frag-state-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(cfg.stem, pretrained=None).state_dict().items()},
              tmp_path / "clip.safetensors")
    features = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(features, tmp_path / "alexnet.pth")  # the LPIPS backbone reads only the convolutions

    monkeypatch.setenv("FRAG_THREADS", "2")  # read by the frag command only
    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # a state no library would set, so a change shows
        warnings.simplefilter("always")
        for lib in (dlogging, tlogging):
            lib.set_verbosity_info()
            lib.enable_progress_bar()
        try:
            calls = [lambda: load_model("tiny"), lambda: load_metrics(None, None, None),
                     lambda: ClipScorer.from_open_clip(str(cfg), tmp_path / "clip.safetensors"),
                     lambda: LpipsMetric.load(tmp_path / "alexnet.pth"), lambda: load_judge()]
            for call in calls:
                before = _process_state()
                call()
                _same(before, _process_state())
        finally:
            for lib in (dlogging, tlogging):
                lib.set_verbosity_warning()
    assert torch.get_num_threads() == threads

    from fragcli.cli.app import configure_process

    configure_process()  # the command sets them, once, at start-up
    assert torch.get_num_threads() == 2 and not dlogging.is_progress_bar_enabled()
    assert dlogging.get_verbosity() == logging.ERROR
    torch.set_num_threads(threads)
