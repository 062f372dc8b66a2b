"""`frag sweep PROFILE_DIR`: extract + validate at several values of one extract option (a quality curve, H1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fragcli.cli import options as o


def _values(text: str) -> list[float]:
    from fragcli.errors import FragError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FragError(f"bad --values {text!r}", "pass numbers such as 0.9,0.8,0.7") from None
    if not values:
        raise FragError("--values is empty", "pass numbers such as 0.9,0.8,0.7")
    return values


def _settings(pairs: list[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` pairs: numbers, true/false, else text; dashes in NAME become underscores."""
    from fragcli.errors import FragError

    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise FragError(f"bad --set {pair!r}", "pass NAME=VALUE, e.g. --set score=energy")
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
        out[name.strip().replace("-", "_")] = value
    return out


def sweep(
    profile_dir: Annotated[Path, typer.Argument(help="A profile folder written by frag profile.")],
    values: Annotated[str, typer.Option("--values", help="Comma-separated values of the swept option.")] = "0.9,0.8,0.7,0.6,0.5",
    option: Annotated[str, typer.Option("--option", help="The extract option to sweep (as in frag extract).")] = "head-retention",
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="NAME=VALUE", help="Another extract option, fixed for every point (repeatable), "
        "e.g. --set score=energy.", show_default=False)] = None,
    seeds: o.Seeds = "4",
    paraphrases: o.Paraphrases = None,
    paraphrase_seeds: o.ParaphraseSeeds = 2,
    thresholds: o.Thresholds = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Extract and validate a fragment at each value of one extract option (default: head retention), so the
    quality-vs-size trade-off is a curve: writes <out>/<point>/fragment, <out>/<point>/validate and <out>/sweep.json
    (default out: reports/<model>/<timestamp>/sweep). Then frag report --run RUN --sweep OUT plots it.

    Example: frag sweep reports/demo/profile --values 0.9,0.8,0.7,0.6,0.5 --seeds 8 --out reports/demo/sweep
    """
    from fragcli.api import sweep as run_sweep
    from fragcli.console import err, print_json

    result = run_sweep(profile_dir, _values(values), option=option, options=_settings(settings or []), seeds=seeds,
                       paraphrases=paraphrases, paraphrase_seeds=paraphrase_seeds, thresholds=thresholds, model=model,
                       device=device, dtype=dtype, out=out, overwrite=overwrite, show_progress=not json_out)
    rec = result.record
    if json_out:
        print_json({"out": str(result.out), **rec.dump()})
        return
    _print_table(err, rec)
    typer.echo(f"sweep written to {result.out}")


def _print_table(console, rec) -> None:
    from rich.table import Table

    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    table = Table(title=f"sweep over {rec.option.replace('_', '-')} ({len(rec.seeds)} seeds)")
    for col in ("point", "value", "removed", "CLIP delta", "SSIM", "pHash", "passing", "gates"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for p in rec.points:
        removed = ", ".join(f"{t.name} {fmt(t.summary.removed_fraction, '.0%')}" for t in p.techniques)
        a = p.aggregate
        table.add_row(p.name, f"{p.value:g}", removed, fmt(a.get("clip_delta_rel"), "+.2%"), fmt(a.get("ssim_mean")),
                      fmt(a.get("phash_mean"), ".1f"), fmt(a.get("pass_rate"), ".0%"), "PASS" if p.passed else "FAIL")
    console.print(table)
