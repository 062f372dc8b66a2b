"""`frag extract PROFILE_DIR`: turn a profile into a fragment (plan every technique, check the stack, apply it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o
from fragcli.recipe import DEFAULT_SEARCH_SEEDS


def extract(
    profile_dir: Annotated[Path, typer.Argument(help="A profile folder written by frag profile.")],
    head_retention: Annotated[
        float | None, typer.Option("--head-retention", help="Fraction of attention heads to keep, in (0, 1] "
                                   "(0.7 when no lever and no --objective is given).", show_default=False)
    ] = None,
    ffn_retention: Annotated[
        float | None, typer.Option("--ffn-retention", help="Fraction of feed-forward inner channels to keep, in (0, 1].",
                                   show_default=False)
    ] = None,
    low_rank_energy: Annotated[
        float | None, typer.Option("--low-rank-energy", help="Factor Linear layers keeping this fraction of spectral "
                                   "energy (e.g. 0.93), where that saves bytes.", show_default=False)
    ] = None,
    quantize: Annotated[str, typer.Option("--quantize", help="Weights of what is retained: int8 | fp8 | none.")] = "none",
    cache_prompt: Annotated[
        bool, typer.Option("--cache-prompt", help="Store the prompt's text embeddings in the fragment.")
    ] = False,
    evict_text_encoders: Annotated[
        bool, typer.Option("--evict-text-encoders", help="Store the prompt's embeddings and run without the text "
                           "encoders (they load on the CPU only for another wording).")
    ] = False,
    step_cache: Annotated[
        float | None, typer.Option("--step-cache", help="Reuse the deep UNet branch on steps where the profile shows "
                                   "its output drifts less than this since the last computed step (e.g. 0.02).",
                                   show_default=False)
    ] = None,
    step_cache_max_reuse: Annotated[
        int | None, typer.Option("--step-cache-max-reuse", help="Most consecutive steps served from the step cache "
                                 "(default 4; --objective speed tries 4 and 6).", show_default=False)
    ] = None,
    block_cache: Annotated[
        float | None, typer.Option("--block-cache", help="Transformer denoisers: skip the blocks after the first on "
                                   "calls where the first block's residual barely changed, calibrated so the reused "
                                   "residual drifts at most this much in the profile (e.g. 0.1).", show_default=False)
    ] = None,
    block_cache_max_reuse: Annotated[
        int | None, typer.Option("--block-cache-max-reuse", help="Most consecutive calls served from the block cache "
                                 "(default 3).", show_default=False)
    ] = None,
    guidance_cut: Annotated[
        float | None, typer.Option("--guidance-cut", help="Drop the unconditional (guidance) branch from the step "
                                   "after which dropping it changes the predicted image by at most this fraction, "
                                   "as measured in the profile (e.g. 0.05).", show_default=False)
    ] = None,
    cross_attn_gate: Annotated[
        float | None, typer.Option("--cross-attn-gate", help="Reuse every cross-attention output from the step after "
                                   "which, in the profile, they drift less than this in total (e.g. 0.05).",
                                   show_default=False)
    ] = None,
    objective: Annotated[
        str | None, typer.Option("--objective", help="Pick the levers automatically: memory (the smallest fragment "
                                 "that passes thresholds.yaml's quality gates on a few seeds) or speed (the fastest "
                                 "one). Writes recipe.json.",
                                 show_default=False)
    ] = None,
    search_seeds: Annotated[int, typer.Option("--search-seeds", min=1, help="Seeds per candidate for --objective.")] = DEFAULT_SEARCH_SEEDS,
    thresholds: o.Thresholds = None,
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
              frag extract PROFILE --quantize int8 --ffn-retention 0.8 --evict-text-encoders
              frag extract PROFILE --objective memory
              frag extract PROFILE --step-cache 0.02 --guidance-cut 0.05
    """
    from fragcli.api import extract as run_extract
    from fragcli.console import err, print_json
    from fragcli.extraction import lever_options

    options = lever_options(head_retention=head_retention, ffn_retention=ffn_retention,
                            low_rank_energy=low_rank_energy, quantize=quantize, cache_prompt=cache_prompt,
                            evict_text_encoders=evict_text_encoders, step_cache=step_cache,
                            guidance_cut=guidance_cut, cross_attn_gate=cross_attn_gate, block_cache=block_cache,
                            default_heads=objective is None)
    options.update(block_cache_max_reuse=block_cache_max_reuse, step_cache_max_reuse=step_cache_max_reuse, score=score, per_module=per_module, safety_margin=safety_margin,
                   stability_threshold=stability_threshold)
    result = run_extract(profile_dir, options, out=out, overwrite=overwrite, name=name, model=model, device=device,
                         dtype=dtype, simulate=simulate, show_progress=not json_out, objective=objective,
                         search_seeds=search_seeds, thresholds=thresholds)
    if json_out:
        print_json(result.summary())
        return
    if result.simulate:
        err.print(f"simulated {len(result.plans)} technique(s) as masks")
        typer.echo(f"plan and masked images written to {result.out}")
        return
    if result.recipe is not None:
        _print_recipe(err, result.recipe.record)
    _print_summary(err, result.manifest)
    typer.echo(f"fragment written to {result.out}")


def _fmt(v, f: str) -> str:
    return "-" if v is None else format(v, f)


def _print_recipe(console, record) -> None:
    from rich.table import Table

    table = Table(title=f"recipe search ({record.objective}, {len(record.seeds)} seeds, {record.search_s:.0f} s)")
    for col in ("candidate", "status", "resident MiB", "s/image", "CLIP delta", "SSIM", "pHash"):
        table.add_column(col, justify="left" if col in ("candidate", "status") else "right")
    for c in record.candidates:
        q = c.quality
        table.add_row(("* " if c.id == record.chosen else "  ") + c.id, c.status,
                      _fmt(c.resident_bytes / 2**20 if c.resident_bytes is not None else None, ".2f"),
                      _fmt(c.seconds_per_image, ".2f"), _fmt(q.clip_delta_rel if q else None, "+.2%"),
                      _fmt(q.ssim_mean if q else None, ".3f"), _fmt(q.phash_mean if q else None, ".1f"))
    console.print(table)


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
