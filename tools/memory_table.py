"""Markdown table of `frag bench` records side by side: resident weights, on-disk size, load and generation peaks
and speed of the full model and each fragment (the issue-10 table).

    python tools/memory_table.py reports/x/bench-int8/bench.json reports/x/bench-recipe/bench.json ...

Each record holds its own full-model run (measured in the same process, interleaved), so every ratio is against
the full model of that record. The full model's row is the first record's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fragcli.bench import read_bench

MIB = 2**20


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MIB:.1f}"


def _pct(v: int | None, base: int | None) -> str:
    return "-" if v is None or not base else f"{v / base:.0%}"


def row(name: str, run, base) -> str:
    mem, bmem = run.memory, base.memory
    gen = mem.generate_peak_bytes if mem else None
    bgen = bmem.generate_peak_bytes if bmem else None
    above = mem.generate_above_import_bytes if mem else None
    babove = bmem.generate_above_import_bytes if bmem else None
    load = mem.load_peak_bytes if mem else None
    speed = "1.00" if run is base else f"{base.per_image_s / run.per_image_s:.2f}"
    lo, hi = run.per_image_s_range
    return (f"| {name} | {_mib(run.resident_bytes)} ({_pct(run.resident_bytes, base.resident_bytes)}) | "
            f"{_mib(run.disk_bytes)} | {_mib(load)} | {_mib(gen)} ({_pct(gen, bgen)}) | "
            f"{_mib(above)} ({_pct(above, babove)}) | {run.per_image_s:.3f} ({lo:.3f}-{hi:.3f}) | x{speed} |")


def main(paths: list[str]) -> None:
    recs = [(Path(p).parent.name.removeprefix("bench-"), read_bench(Path(p))) for p in paths]
    print("| side | resident MiB (of full) | on disk MiB | load peak MiB | generation peak MiB (of full) | "
          "above libraries MiB (of full) | s/image (range) | speed vs full |")
    print("|---|---|---|---|---|---|---|---|")
    first = recs[0][1]
    print(row(f"full ({first.model.name}, {first.dtype})", first.full, first.full))
    for name, rec in recs:
        print(row(f"{name}: {'+'.join(rec.techniques)}", rec.fragment, rec.full))


if __name__ == "__main__":
    main(sys.argv[1:])
