"""`frag validate FRAGMENT_DIR`: quality of a fragment against its full model, gated by thresholds.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o


def validate(
    fragment_dir: Annotated[Path, typer.Argument(help="A fragment folder written by frag extract.")],
    seeds: o.Seeds = "20",
    paraphrases: o.Paraphrases = None,
    paraphrase_seeds: o.ParaphraseSeeds = 2,
    simulate: Annotated[bool, typer.Option("--simulate", help="Validate the masked (logical) model instead.")] = False,
    clip_model: Annotated[str | None, typer.Option("--clip-model", help="open_clip model name (real models).")] = None,
    clip_weights: Annotated[Path | None, typer.Option("--clip-weights", help="Local CLIP weights file.")] = None,
    lpips_weights: Annotated[Path | None, typer.Option("--lpips-weights", help="Local AlexNet weights for LPIPS.")] = None,
    thresholds: o.Thresholds = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="Reuse this profile's full-model images.")] = None,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Measure a fragment against its full model on the same seeds: CLIP score delta, LPIPS, SSIM, perceptual
    hash; pass/fail per image against thresholds.yaml; the paraphrase pass rate (reuse). Writes validation.json and
    grid.png, and the quality/reuse blocks of the fragment's manifest. Exit 0 whether or not the gates pass (the
    gate is frag report's job); 2 for bad input.

    Example: frag validate fragments/demo --seeds 8 --thresholds thresholds.yaml
    """
    from fragcli.api import validate as run_validate
    from fragcli.console import err, print_json

    result = run_validate(fragment_dir, seeds=seeds, paraphrases=paraphrases, paraphrase_seeds=paraphrase_seeds,
                          simulate=simulate, clip_model=clip_model, clip_weights=clip_weights,
                          lpips_weights=lpips_weights, thresholds=thresholds, profile=profile, model=model,
                          device=device, dtype=dtype, out=out, overwrite=overwrite, show_progress=not json_out)
    rec, target = result.record, result.out
    seed_list = rec["seeds"]
    a = rec["aggregate"]
    summary = {"out": str(target), "passed": rec["passed"], "aggregate": a, "unavailable": rec["unavailable"],
               "reuse_pass_rate": rec["paraphrases"]["pass_rate"] if rec["paraphrases"] else None}
    if json_out:
        print_json(summary)
        return

    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    err.print(f"{rec['mode']} fragment on {len(seed_list)} seeds: CLIP delta {fmt(a['clip_delta_rel'], '+.2%')}, "
              f"LPIPS {fmt(a['lpips_mean'])}, SSIM {fmt(a['ssim_mean'])}, pHash {fmt(a['phash_mean'], '.1f')}, "
              f"images passing {fmt(a['pass_rate'], '.0%')}; reuse pass rate "
              f"{fmt(summary['reuse_pass_rate'], '.0%')} -> [bold]{'PASS' if rec['passed'] else 'FAIL'}[/]")
    for metric, why in rec["unavailable"].items():
        err.print(f"[yellow]{metric} unavailable:[/] {why}")
    typer.echo(f"validation written to {target}")
