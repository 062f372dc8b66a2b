"""`frag bench FRAGMENT_DIR`: the fragment against its full model, side by side in one process (bench.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o


def bench(
    fragment_dir: Annotated[Path, typer.Argument(help="A fragment folder written by frag extract.")],
    variants: Annotated[int, typer.Option("--variants", help="Images per model and repeat (seeds 0..N-1).")] = 32,
    repeats: Annotated[int, typer.Option("--repeats", help="Repeats of the interleaved run; medians and ranges "
                                         "over them are reported.")] = 3,
    batch_size: o.BatchSize = 1,
    steps: o.Steps = None,
    no_manifest: Annotated[bool, typer.Option("--no-manifest", help="Do not write the manifest's performance block.")] = False,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Benchmark a fragment against its full model in one process: both stay loaded and run interleaved (full,
    fragment, fragment, full, ...) after one warm-up each; per model: seconds per image, images/min, weight bytes,
    activation and peak memory; the speedup (median of the repeats, with its range), weight and peak reductions
    and the break-even image count (H4, H5). Writes bench.json into --out (default
    reports/<model>/<timestamp>/bench) and the manifest's performance block.

    Example: frag bench fragments/demo --variants 32 --repeats 3 --out reports/demo/bench
    """
    from fragcli.api import bench as run_bench
    from fragcli.console import err, print_json

    result = run_bench(fragment_dir, variants=variants, batch_size=batch_size, repeats=repeats, steps=steps,
                       model=model, device=device, dtype=dtype, out=out, overwrite=overwrite,
                       manifest=not no_manifest, show_progress=not json_out)
    rec = result.record
    if json_out:
        print_json({"out": str(result.path), **rec.dump()})
        return
    _print_table(err, rec)
    be = rec.break_even_images
    lo, hi = rec.speedup_range
    err.print(f"speedup x{rec.speedup:.2f} (x{lo:.2f}-x{hi:.2f} over {rec.repeats} repeat(s)); weights "
              f"{-rec.weight_reduction:+.1%}; peak (weights+activations) {-rec.peak_memory_reduction:+.1%}; "
              f"break-even {'never' if be is None else f'{be:.1f} images'}")
    typer.echo(f"bench written to {result.path}")


def _print_table(console, rec) -> None:
    from rich.table import Table

    mib = 2**20
    table = Table(title=f"bench {rec.fragment_name} ({rec.variants} variants x {rec.repeats} repeats, {rec.device})")
    for col in ("run", "s/image", "range", "images/min", "weights MiB", "peak MiB", "speedup"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in rec.runs.items():
        lo, hi = r.per_image_s_range
        speed = "-" if r.vs_baseline is None else f"x{r.vs_baseline.speedup:.2f}"
        table.add_row(name, f"{r.per_image_s:.3f}", f"{lo:.3f}-{hi:.3f}",
                      "-" if r.images_per_min is None else f"{r.images_per_min:.1f}", f"{r.weight_bytes / mib:.1f}",
                      f"{r.peak_bytes_est / mib:.1f}", speed)
    console.print(table)
