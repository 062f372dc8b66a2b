"""`frag report --run DIR`: hypotheses H1-H5, quality/regression gates, plots; exit 1 when a gate fails."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fragcli.cli import options as o

STATUS_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "UNAVAILABLE": "dim", "INVALID": "bold red", "INFO": "dim",
                "MISSING": "dim"}


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _tables(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from fragcli.console import err

    hyp = Table(title="hypotheses", title_justify="left", show_lines=False)
    for col in ("id", "status", "value", "threshold", "evidence / note"):
        hyp.add_column(col, overflow="fold")
    for h in summary["hypotheses"]:
        op = ">=" if h["direction"] == "min" else "<="
        text = h["evidence"] + (f" -- {h['note']}" if h["note"] else "")
        hyp.add_row(h["id"], f"[{STATUS_STYLE[h['status']]}]{h['status']}[/]", _fmt(h["value"]),
                    f"{op} {h['threshold']:g}", text)
    err.print(hyp)
    gates = Table(title="gates" + ("" if summary["gate"]["enforced"] else " (not enforced: no --gate)"),
                  title_justify="left")
    for col in ("gate", "kind", "status", "measured", "limit", "detail"):
        gates.add_column(col, overflow="fold")
    for g in summary["gates"]:
        op = ">=" if g["direction"] == "min" else "<="
        gates.add_row(g["gate"], g["kind"], f"[{STATUS_STYLE.get(g['status'], '')}]{g['status']}[/]",
                      _fmt(g["measured"]), f"{op} {_fmt(g['threshold'])}", g["message"])
    err.print(gates)
    perf = summary.get("performance") or {}
    if perf.get("contenders"):
        _bench_table(err, perf)


def _bench_table(console, perf: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"bench ({perf.get('variants')} variants x {perf.get('repeats')} repeats, "
                        f"{perf.get('device')}; fidelity against the full model)", title_justify="left")
    for col in ("contender", "s/image", "speed-up (range)", "CLIP delta", "SSIM", "pHash", "images passing"):
        table.add_column(col, justify="right" if col != "contender" else "left")
    contenders = perf["contenders"]
    order = sorted(contenders, key=lambda n: ({"full": 0, "fragment": 1}.get(contenders[n].get("kind"), 2), n))
    for name in order:  # the full model, the fragment, then the peers (the JSON's keys are sorted)
        c = contenders[name]
        rng = c.get("speedup_range")
        speed = "-" if c.get("speedup") is None else (
            f"x{c['speedup']:.2f}" + (f" ({rng[0]:.2f}-{rng[1]:.2f})" if rng else ""))
        table.add_row(name, _fmt(c.get("per_image_s")), speed,
                      "-" if c.get("clip_delta_rel") is None else f"{c['clip_delta_rel']:+.2%}",
                      "-" if c.get("ssim_mean") is None else f"{c['ssim_mean']:.3f}",
                      "-" if c.get("phash_mean") is None else f"{c['phash_mean']:.1f}",
                      "-" if c.get("pass_rate") is None else f"{c['pass_rate']:.0%}")
    for name, why in (perf.get("unavailable_contenders") or {}).items():
        table.add_row(escape(name), "-", escape(f"not run: {why}"), "-", "-", "-", "-")
    console.print(table)
    be, bm = perf.get("break_even_images"), perf.get("break_even_images_marginal")
    if be is not None or bm is not None:
        console.print(f"break-even (H5): {_fmt(be)} images by the design formula; {_fmt(bm)} crediting the "
                      "profile's own full-model images")


def report(
    run: Annotated[Path, typer.Option("--run", metavar="DIR", help="Run folder: searched (3 levels deep) for context.json, "
                                      "manifest.json, selection.json, validation.json, bench.json.")],
    compare: Annotated[str, typer.Option(
        "--compare", metavar="latest|baseline|none|PATH", help="Report to diff against: latest (newest earlier report for this model), baseline "
        "(reports/baseline/), none, or a report folder.")] = "latest",
    gate: Annotated[Path | None, typer.Option(
        "--gate", metavar="THRESHOLDS.yaml", help="thresholds.yaml to enforce: exit 1 when a quality gate, a listed hypothesis "
        "(gate_hypotheses) or a regression tolerance fails. Without it: report only, defaults.",
        show_default=False)] = None,
    sweep: Annotated[list[Path] | None, typer.Option(
        "--sweep", metavar="DIR", help="Extra folder(s) of validation points (a sweep over head retention); repeatable.",
        show_default=False)] = None,
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Summarise a run: score hypotheses H1-H5, check quality gates and regressions against an earlier report,
    and write metrics_summary.json, head_importance.json, regression_diff.json, the profile Parquet and plots
    to reports/<model>/<timestamp>/.

    Exit codes: 0 all enforced gates pass, 1 a gate fails, 2 bad input, 3 INVALID: a gate could not be measured
    (a metric missing and not marked optional in thresholds.yaml; a gated regression whose metric is missing or
    NaN/inf in the baseline or this run, unless regression.optional lists it; --compare baseline with no baseline;
    no quality metric measured at all): a gate never passes on nothing.

    Example: frag report --run reports/shapes/20250101T000000Z --compare baseline --gate thresholds.yaml
    """
    from fragcli.api import report as run_report
    from fragcli.console import err, print_json, warn

    result = run_report(run, compare=compare, gate=gate, out=out, sweeps=sweep or [], overwrite=overwrite)
    summary = result.summary
    _tables(summary)
    for note in summary["notes"]:
        err.print(f"[dim]note:[/] {note}", soft_wrap=True)
    gate_info = summary["gate"]
    for failure in gate_info["failures"]:
        err.print(f"[bold red]FAIL[/] {failure}", soft_wrap=True)
    err.print(f"report written to {result.out}", soft_wrap=True)
    if json_out:
        print_json(summary)
    if gate_info["enforced"]:
        skipped = [g["gate"] for g in summary["gates"] if g["status"] == "UNAVAILABLE"]
        if skipped:
            warn(f"{len(skipped)} optional gate(s) could not be measured and were skipped: {', '.join(skipped)}")
        n = len(gate_info["failures"])
        if n:
            err.print(f"[bold red]gate failed[/]: {n} check(s) out of bounds")
            raise typer.Exit(1)
        if gate_info["invalid"]:
            for line in gate_info["invalid"]:
                err.print(f"[bold red]INVALID[/] {line}", soft_wrap=True)
            err.print(f"[bold red]gate INVALID[/]: {len(gate_info['invalid'])} gate(s) could not be measured -- run "
                      "the missing stage (frag validate / frag bench), or mark the metric optional in thresholds.yaml")
            raise typer.Exit(3)
        err.print("[green]gate passed[/]")
