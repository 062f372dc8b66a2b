"""The fragment library under concurrency (issue 14): several processes registering and looking up fragments while
another prunes, on one index: no exception, no corruption, every choice a whole fragment, counters consistent."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sqlite3
import time
import traceback
from pathlib import Path

import numpy as np

DIM = 16


def _fake_fragment(template: Path, folder: Path) -> None:
    """A finished fragment folder as extract leaves it (manifest, artifacts, frag's marker)."""
    shutil.copytree(template, folder)


def _worker(role: str, index: int, template: str, seconds: float, queue, start=None) -> None:
    import fragcli.fragment  # noqa: F401 - the slow imports (torch) before the clock starts
    from fragcli import library, library_disk
    from fragcli.errors import FragError
    from fragcli.paths import fragments_dir

    if start is not None:
        start.wait(timeout=120)  # all four at once

    counts = {"registered": 0, "lookups": 0, "chosen": 0, "records": 0, "refused": 0, "pruned": 0}
    try:
        rng = np.random.default_rng(index)
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            i += 1
            if role == "prune":
                got = library_disk.prune(2 * 300_000)
                counts["pruned"] += len(got["removed"])
                library_disk.scan(full=False)
                time.sleep(0.05)
                continue
            folder = fragments_dir() / f"w{index}-{i}"
            _fake_fragment(Path(template), folder)
            try:
                library.register(folder, rng.normal(size=DIM))
                counts["registered"] += 1
            except FragError:
                counts["refused"] += 1  # pruned before it was registered: a one-line refusal is the contract
            e = library.entries()[0] if library.entries() else None
            got = library.lookup(e.model_hash if e else "none", "a red circle", lambda t: rng.normal(size=DIM), -1.0)
            counts["lookups"] += 1
            if got.chosen:
                counts["chosen"] += 1
            library.record(got.chosen)
            counts["records"] += 1
            library.counters()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((role, index, traceback.format_exc()))
        return
    queue.put((role, index, counts))


def test_three_writers_and_a_pruner_on_one_index(frag_home, tmp_path):

    template = _template(tmp_path)
    (frag_home / "fragments").mkdir()
    ctx = mp.get_context("fork")  # the library needs no torch state; fork skips re-importing it
    queue, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_worker, args=("writer", i, str(template), 5.0, queue, start)) for i in range(3)]
    procs.append(ctx.Process(target=_worker, args=("prune", 9, str(template), 5.0, queue, start)))
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    errors = [r for r in results if isinstance(r[2], str)]
    assert not errors, errors[0][2]
    stats = {(r[0], r[1]): r[2] for r in results}
    writers = [s for (role, _), s in stats.items() if role == "writer"]
    assert all(s["lookups"] >= 3 for s in writers), stats
    assert stats[("prune", 9)]["pruned"] > 0, stats

    from fragcli import library, library_disk

    with sqlite3.connect(frag_home / ".frag" / library.DB_NAME) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c = library.counters()
    assert c["hits"] + c["misses"] == sum(s["records"] for s in writers)
    library_disk.scan(full=True)
    for e in library.entries():  # the index agrees with the disk: every entry a whole, valid fragment
        assert library.problem(e, full=True) is None
    assert not list((frag_home / "fragments").glob(".*.rm-*"))  # no half-deleted folder left behind


def _template(tmp_path: Path) -> Path:
    """A small finished fragment folder (manifest + artifact + marker), written by frag's own writers."""
    from datetime import datetime, timezone

    from fragcli.manifest import Artifact, BaseModelRef, Costs, Manifest, Profiling, write_manifest
    from fragcli.models.hashing import sha256_file
    from fragcli.paths import staged_dir

    out = tmp_path / "template"
    with staged_dir(out) as tmp:
        (tmp / "fragment.safetensors").write_bytes(b"\0" * 300_000)
        f = tmp / "fragment.safetensors"
        write_manifest(tmp, Manifest(
            frag_version="test", name="template", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            base_model=BaseModelRef(name="tiny", source="builtin:tiny", hash="h" * 64, dtype="fp32", denoiser="unet"),
            profiling=Profiling(prompt="a red circle", negative_prompt="", prompt_embedding_hash=None, seeds=[0],
                                steps=2, profiled_steps=[0], guidance=1.0, width=32, height=32),
            techniques=[], weights=None, params={"before": 1, "after": 1, "removed": 0},
            weight_bytes={"before": 1, "after": 1}, costs=Costs(profile_s=0.0, extract_s=0.0),
            artifacts={"fragment.safetensors": Artifact(sha256=sha256_file(f), bytes=f.stat().st_size)}))
    return out
