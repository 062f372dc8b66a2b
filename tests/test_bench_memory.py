"""`frag bench` measures memory: every component on its device, resident bytes, each side's peaks in a fresh
process (load, generation, VAE decode), on-disk sizes; bench.json schema_version 3 still reads version 2.

No timing is asserted: speed is measured, never asserted."""

import io
import json
import os

import pytest
import torch

from fragcli import api
from fragcli.bench import BenchRecord, performance_block, read_bench
from fragcli.memory import components, disk_weight_bytes, proc_status, release_memory, reset_hwm, weight_bytes
from fragcli.models import load_model
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"
MIB = 2**20


@pytest.fixture(scope="module")
def fragment(tmp_path_factory):
    """Head pruning + cached prompt with the text encoder evicted, on tiny."""
    root = tmp_path_factory.mktemp("benchmem")
    prof = api.profile(PROMPT, model="tiny", seeds=2, steps=2, out=root / "profile", show_progress=False)
    frag = api.extract(prof.out, {"head_retention": 0.6, "cache_prompt": True, "evict_text_encoders": True},
                       out=root / "fragment", show_progress=False)
    return frag.out


def test_component_table_sums_to_resident_bytes_on_the_components_devices():
    loaded = load_model("tiny", "cpu", "fp32")
    pipe = loaded.pipe
    table = components(pipe)
    assert {"unet", "vae", "text_encoder"} <= set(table)
    assert sum(c["bytes"] for c in table.values()) == weight_bytes(pipe) > 0
    for name, c in table.items():
        mod = getattr(pipe, name)
        assert c["bytes"] == weight_bytes(mod) and c["params"] == sum(p.numel() for p in mod.parameters())
        assert c["device"] == "cpu" and c["evicted"] is False
        assert c["dtypes"] == sorted({str(t.dtype)[6:] for t in [*mod.parameters(), *mod.buffers()]})
        assert [d for d in c["dtypes"] if d.startswith("float")] == ["float32"]
        assert c["class_name"] == type(mod).__name__
    pipe.vae.to(torch.float16)  # the table follows the tensors, not the configuration
    half = components(pipe)
    assert [d for d in half["vae"]["dtypes"] if d.startswith("float")] == ["float16"] and half["vae"]["bytes"] * 2 == table["vae"]["bytes"]
    assert half["unet"] == table["unet"] and sum(c["bytes"] for c in half.values()) == weight_bytes(pipe)


def test_an_evicted_text_encoder_is_listed_with_zero_bytes():
    pipe = load_model("tiny", "cpu", "fp32").pipe
    before = components(pipe)["text_encoder"]["bytes"]
    pipe.text_encoder = None
    table = components(pipe)
    assert table["text_encoder"] == {"class_name": None, "device": None, "dtypes": [], "bytes": 0, "params": 0,
                                     "evicted": True}
    assert before > 0 and sum(c["bytes"] for c in table.values()) == weight_bytes(pipe)
    assert "safety_checker" not in table and "tokenizer" not in table  # None and non-torch entries are left out


def test_the_high_water_mark_resets_and_sees_a_freed_spike():
    if not reset_hwm():
        pytest.skip("this system cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    release_memory()
    assert reset_hwm()
    start = proc_status()
    assert start["hwm"] - start["rss"] < 2 * MIB
    x = torch.ones(64 * MIB // 4)  # 64 MiB, touched
    del x
    release_memory()
    after = proc_status()
    assert after["hwm"] - start["rss"] >= 60 * MIB and after["rss"] < after["hwm"] - 32 * MIB
    assert reset_hwm() and proc_status()["hwm"] < after["hwm"] - 32 * MIB


def test_bench_measures_components_probes_and_disk_side_by_side(fragment, tmp_path):
    out = tmp_path / "bench"
    r = run_cli("bench", fragment, "--variants", "2", "--steps", "2", "--repeats", "1", "--batch-size", "2",
                "--out", out, "--json")
    assert r.exit_code == 0, r.output
    on_disk = json.loads((out / "bench.json").read_text())
    printed = json.loads(r.stdout)
    assert printed.pop("out") == str((out / "bench.json").resolve()) and printed == on_disk
    assert on_disk["schema_version"] == 4
    rec = read_bench(out / "bench.json")
    assert rec.peak_source == "probe" and rec.memory_probes == 1 and rec.peak_kind == "rss_hwm"
    full, frag = rec.runs["full"], rec.runs["fragment"]
    for run in (full, frag):
        assert sum(c.bytes for c in run.components.values()) == run.resident_bytes == run.weight_bytes
        assert {"unet", "vae", "text_encoder"} <= set(run.components)
        [p] = run.memory.probes
        assert p.pid != os.getpid() and p.threads == 1 and p.hwm_reset and p.peak_kind == "rss_hwm"
        assert p.resident_bytes == run.resident_bytes  # the fresh process loaded the same thing
        assert 0 < p.rss_after_import_bytes < p.load_peak_bytes
        assert 0 < p.rss_before_generate_bytes < p.generate_peak_bytes
        assert p.generate_rise_bytes == p.generate_peak_bytes - p.rss_before_generate_bytes > 0
        assert p.seeds == [0, 1] and p.batch_size == 2
        assert run.memory.peak_bytes == p.generate_peak_bytes == run.memory.generate_peak_bytes
        assert run.memory.generate_above_import_bytes == p.generate_peak_bytes - p.rss_after_import_bytes > 0
        d = run.memory.decode
        assert set(d.tries) == {"plain", "tiled", "sliced"} and d.latent_shape == [2, 4, 32, 32]
        assert d.tries["tiled"].applies is False and d.tries["sliced"].applies is True  # 32 = the tile; batch 2
        assert all(t.rise_bytes >= 0 and t.peak_bytes > 0 for t in d.tries.values())
        assert d.used == "plain" and d.lowest in ("plain", "sliced")
    assert full.components["text_encoder"].bytes > 0 and not full.components["text_encoder"].evicted
    te = frag.components["text_encoder"]
    assert te.evicted and te.bytes == 0 and te.device is None
    assert frag.components["unet"].bytes < full.components["unet"].bytes
    assert frag.components["vae"] == full.components["vae"]
    assert rec.weight_reduction == pytest.approx(1 - frag.resident_bytes / full.resident_bytes)
    assert rec.weight_reduction > 0
    assert rec.peak_memory_reduction == pytest.approx(1 - frag.memory.peak_bytes / full.memory.peak_bytes)
    manifest = json.loads((fragment / "manifest.json").read_text())
    assert frag.disk_bytes == sum(a["bytes"] for a in manifest["artifacts"].values()) == sum(
        (fragment / rel).stat().st_size for rel in manifest["artifacts"]) > 0
    base = load_model("tiny", "cpu", "fp32").folder
    assert full.disk_bytes == disk_weight_bytes(base) == sum(p.stat().st_size for p in base.rglob("*.safetensors"))
    perf = manifest["performance"]
    assert perf == pytest.approx(performance_block(rec)) and perf["peak_kind"] == "rss_hwm"
    assert perf["peak_vram_full_mb"] == pytest.approx(full.memory.generate_peak_bytes / MIB)
    assert perf["peak_vram_fragment_mb"] == pytest.approx(frag.memory.generate_peak_bytes / MIB)
    from rich.console import Console

    from fragcli.cli.bench import _print_table

    buf = io.StringIO()
    _print_table(Console(file=buf, width=200), rec)
    text = buf.getvalue()
    for label in ("text_encoder", "evicted", "resident MiB", "on disk MiB", "load peak MiB", "generation peak MiB",
                  "decode tiled MiB"):
        assert label in text, (label, text)
    assert f"{full.memory.generate_peak_bytes / MIB:.1f}" in text and f"{frag.disk_bytes / MIB:.1f}" in text


V4_TOP, V4_RUN = ("break_even_images_marginal", "profile_images", "peers"), ("fidelity", "peer")


def _v3(doc: dict) -> dict:
    """A schema_version 4 record as frag wrote it at version 3 (no fidelity, peers, marginal break-even)."""
    v3 = {k: v for k, v in doc.items() if k not in V4_TOP}
    v3["runs"] = {n: {k: v for k, v in r.items() if k not in V4_RUN} for n, r in doc["runs"].items()}
    return {**v3, "schema_version": 3}


def test_a_version_3_record_still_reads(tmp_path):
    from tests.test_report import bench

    v3 = _v3(bench().dump())
    (tmp_path / "bench.json").write_text(json.dumps(v3))
    rec = read_bench(tmp_path / "bench.json")
    assert rec.schema_version == 4 and rec.break_even_images_marginal is None and rec.peers == []
    assert rec.runs["fragment"].fidelity is None and rec.speedup == v3["speedup"]
    (tmp_path / "bench.json").write_text(json.dumps({**v3, "peers": 1}))  # a v4 field, wrong type: refused
    from fragcli.errors import FragError

    with pytest.raises(FragError, match="peers"):
        read_bench(tmp_path / "bench.json")


def _v2(doc: dict) -> dict:
    """A schema_version 4 record as frag wrote it at version 2 (no components, disk sizes, probes)."""
    new_top = ("peak_source", "memory_probes", "decode", "decode_used", "unavailable", *V4_TOP)
    new_run = ("components", "resident_bytes", "disk_bytes", "memory", *V4_RUN)
    v2 = {k: v for k, v in doc.items() if k not in new_top}
    v2["runs"] = {n: {k: v for k, v in r.items() if k not in new_run} for n, r in doc["runs"].items()}
    return {**v2, "schema_version": 2}


def test_a_version_2_record_still_reads(tmp_path):
    from fragcli.errors import FragError
    from tests.test_report import bench

    v2 = _v2(bench().dump())
    (tmp_path / "bench.json").write_text(json.dumps(v2))
    rec = read_bench(tmp_path / "bench.json")
    assert rec.schema_version == 4 and rec.peak_source == "in_process" and rec.memory_probes == 0
    assert rec.runs["full"].memory is None and rec.runs["fragment"].components is None
    assert rec.speedup == v2["speedup"] and rec.peak_kind == "weights_plus_rss"
    assert performance_block(v2) == performance_block(rec)
    assert performance_block(rec)["peak_vram_full_mb"] == pytest.approx(v2["runs"]["full"]["peak_bytes_est"] / MIB)
    bad_run = {**v2["runs"]["full"], "memory": {"peak_bytes": 1}}  # a v3 block, incomplete
    for junk in ({"runs": {**v2["runs"], "full": bad_run}}, {"memory": {}}):
        (tmp_path / "bench.json").write_text(json.dumps({**v2, **junk}))
        with pytest.raises(FragError, match="invalid"):
            read_bench(tmp_path / "bench.json")
    (tmp_path / "bench.json").write_text(json.dumps({**v2, "schema_version": 5}))
    with pytest.raises(FragError, match="schema_version"):
        read_bench(tmp_path / "bench.json")
    BenchRecord.model_validate(bench().dump())  # the current version round-trips


@pytest.mark.parametrize(("args", "needle"), [
    (("--memory-repeats", "0"), "--memory-repeats"),
    (("--decode", "bogus"), "--decode"),
    (("--decode", "auto", "--no-memory"), "--no-memory"),
])
def test_bad_memory_options_exit_2_before_anything_runs(fragment, tmp_path, args, needle):
    out = tmp_path / "b"
    assert_one_line_error(run_cli("bench", fragment, *args, "--out", out), needle)
    assert not out.exists()
