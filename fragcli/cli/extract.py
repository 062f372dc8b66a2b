"""`frag extract PROFILE_DIR`: turn a profile into a fragment (plan the head selection, check it, apply it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o


def _load_context(profile_dir: Path) -> dict:
    from fragcli.errors import FragError
    from fragcli.paths import read_json

    if not profile_dir.is_dir():
        raise FragError(f"profile folder {profile_dir} does not exist", "pass the folder that frag profile printed")
    ctx = read_json(profile_dir / "context.json", "profile context")
    if not isinstance(ctx, dict) or ctx.get("_type") != "frag.profile":
        raise FragError(f"{profile_dir / 'context.json'} is not a frag profile context", "re-run frag profile")
    for key in ("model", "prompt", "seeds", "steps", "profiled_steps"):
        if key not in ctx:
            raise FragError(f"profile context lacks {key!r}", "re-run frag profile with this version of frag")
    return ctx


def load_profiled_model(ctx: dict, model: str | None, device: str, dtype: str):
    """The profile's model (or ``--model``), refusing one whose hash differs from the profile's."""
    from fragcli.errors import FragError
    from fragcli.models import load_model, spec_of

    spec = model or spec_of(ctx["model"])
    loaded = load_model(spec, device, dtype)
    if loaded.hash != ctx["model"]["hash"]:
        raise FragError(f"model {spec} ({loaded.hash[:12]}) is not the profiled model ({ctx['model']['hash'][:12]})",
                        "pass the profiled model with --model, or re-run frag profile")
    return loaded


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
    """Build a fragment from a profile: score heads, write and check selection.json, prune physically, and
    save fragment.safetensors (the delta over the base model) plus a versioned manifest.json.

    Example: frag extract reports/shapes/20260101T000000Z/profile --head-retention 0.7
    """
    from fragcli.console import err, print_json
    from fragcli.fragment import build_fragment
    from fragcli.paths import check_out_dir, fragments_dir, safe_name
    from fragcli.selection import SelectionParams, plan, read_profile, score_heads

    t0 = time.perf_counter()
    params = SelectionParams(head_retention, score, per_module, safety_margin, stability_threshold)
    params.check()
    ctx = _load_context(Path(profile_dir))
    ctx["profile_dir"] = str(Path(profile_dir).resolve())
    cols = read_profile(Path(profile_dir))
    frag_name = name or safe_name(f"{ctx['model']['name']}-{ctx['prompt'][:40]}-h{round(head_retention * 100)}")
    target = check_out_dir(Path(out) if out else fragments_dir() / frag_name, overwrite)
    selection = plan(score_heads(cols, score), params)
    loaded = load_profiled_model(ctx, model, device, dtype)
    if simulate:
        _simulate(loaded, ctx, selection, target, json_out)
        return
    costs = {"profile_s": float(ctx.get("timings", {}).get("total_s", 0.0)), "extract_s": time.perf_counter() - t0}
    manifest = build_fragment(loaded, ctx, selection, target, frag_name, costs)
    summary = {
        "out": str(target), "name": manifest.name, "heads_total": manifest.pruning.heads_total,
        "heads_kept": manifest.pruning.heads_kept, "achieved_retention": manifest.pruning.achieved_retention,
        "params": manifest.params, "weight_bytes": manifest.weight_bytes, "costs": manifest.costs,
    }
    if json_out:
        print_json(summary)
        return
    _print_summary(err, selection, manifest)
    typer.echo(f"fragment written to {target}")


def _print_summary(console, selection: dict, manifest) -> None:
    from rich.table import Table

    from fragcli.profiling.recorder import top_block

    table = Table(title=f"fragment {manifest.name}", show_lines=False)
    for col in ("block", "heads", "kept", "removed"):
        table.add_column(col, justify="right" if col != "block" else "left")
    per_block: dict[str, list[int]] = {}
    for m, kept in selection["kept"].items():
        b = per_block.setdefault(top_block(m), [0, 0])
        b[0] += kept + len(selection["removed"][m])
        b[1] += kept
    for b, (total, kept) in per_block.items():
        table.add_row(b, str(total), str(kept), str(total - kept))
    console.print(table)
    p, w = manifest.params, manifest.weight_bytes
    console.print(f"heads kept {manifest.pruning.heads_kept}/{manifest.pruning.heads_total} "
                  f"({manifest.pruning.achieved_retention:.0%}); parameters -{p['removed']:,} "
                  f"({p['removed'] / p['before']:.2%} of the pipeline); weights {w['before'] / 2**20:.1f} MiB -> "
                  f"{w['after'] / 2**20:.1f} MiB")


def _simulate(loaded, ctx: dict, selection: dict, target: Path, json_out: bool) -> None:
    """Apply the plan as a reversible mask on the full model and render the profile's seeds."""
    from fragcli.console import err, print_json, progress
    from fragcli.generation import generate, resolve_settings
    from fragcli.paths import atomic_write_json, staged_dir
    from fragcli.techniques import HeadPruneConfig, apply_technique

    s = resolve_settings(loaded, ctx["prompt"], ctx["steps"], ctx.get("guidance"), ctx.get("width"), ctx.get("height"),
                         ctx.get("negative_prompt", ""))
    apply_technique(loaded.denoiser, HeadPruneConfig({m: r for m, r in selection["removed"].items() if r}, mode="mask"))
    seeds = ctx["seeds"]
    with progress("simulating (masked heads)", len(seeds) * s.steps, not json_out) as adv:
        result = generate(loaded.pipe, s, seeds, loaded.device, advance=adv)
    with staged_dir(target) as tmp:
        atomic_write_json(tmp / "selection.json", selection)
        (tmp / "images").mkdir()
        for seed, img in result.images.items():
            img.save(tmp / "images" / f"seed-{seed}.png")
    if json_out:
        print_json({"out": str(target), "simulate": True, "heads_removed": selection["heads_removed"]})
    else:
        err.print(f"simulated: {selection['heads_removed']}/{selection['heads_total']} heads masked")
        typer.echo(f"plan and masked images written to {target}")
