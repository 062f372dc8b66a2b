"""`frag extract PROFILE_DIR`: turn a profile into a fragment (plan every technique, check the stack, apply it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o


def extract(
    profile_dir: Annotated[Path, typer.Argument(help="A profile folder written by frag profile.")],
    head_retention: Annotated[float, typer.Option("--head-retention", help="Fraction of heads to keep, in (0, 1].")] = 0.7,
    score: Annotated[str, typer.Option("--score", help="energy | entropy | composite (see docs).")] = "composite",
    per_module: Annotated[bool, typer.Option("--per-module", help="Apply the retention in every module, not globally.")] = False,
    safety_margin: Annotated[float, typer.Option("--safety-margin", help="Extra fraction of heads kept.")] = 0.0,
    stability_threshold: Annotated[
        float, typer.Option("--stability-threshold", help="Keep heads whose rank varies more than this across seeds.")
    ] = 0.25,
    simulate: Annotated[
        bool, typer.Option("--simulate", help="What-if: write the plan and the masked model's images, no weights.")
    ] = False,
    name: Annotated[str, typer.Option("--name", help="Fragment name (default: model-prompt-retention).")] = "",
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Build a fragment from a profile: every technique plans from the profile (head pruning writes
    selection.json), the whole stack is checked, then applied; saves fragment.safetensors (the delta over the base
    model) and a versioned, hashed manifest.json.

    Example: frag extract reports/shapes/20260101T000000Z/profile --head-retention 0.7
    """
    from fragcli.api import extract as run_extract
    from fragcli.console import err, print_json

    options = {"head_retention": head_retention, "score": score, "per_module": per_module,
               "safety_margin": safety_margin, "stability_threshold": stability_threshold}
    result = run_extract(profile_dir, options, out=out, overwrite=overwrite, name=name, model=model, device=device,
                         dtype=dtype, simulate=simulate, show_progress=not json_out)
    if json_out:
        print_json(result.summary())
        return
    if result.simulate:
        err.print(f"simulated {len(result.plans)} technique(s) as masks")
        typer.echo(f"plan and masked images written to {result.out}")
        return
    _print_summary(err, result.manifest)
    typer.echo(f"fragment written to {result.out}")


def _print_summary(console, manifest) -> None:
    from rich.table import Table

    table = Table(title=f"fragment {manifest.name}", show_lines=False)
    for col in ("technique", "unit", "removed", "of", "fraction", "params -", "bytes -"):
        table.add_column(col, justify="left" if col in ("technique", "unit") else "right")
    for t in manifest.techniques:
        s = t.summary
        table.add_row(t.name, s.unit or "-", "-" if s.units_removed is None else str(s.units_removed),
                      "-" if s.units_total is None else str(s.units_total),
                      "-" if s.removed_fraction is None else f"{s.removed_fraction:.1%}", f"{s.params_removed:,}",
                      f"{s.bytes_saved:,}")
    console.print(table)
    p, w = manifest.params, manifest.weight_bytes
    console.print(f"parameters -{p['removed']:,} ({p['removed'] / p['before']:.2%} of the pipeline); weights "
                  f"{w['before'] / 2**20:.1f} MiB -> {w['after'] / 2**20:.1f} MiB")
