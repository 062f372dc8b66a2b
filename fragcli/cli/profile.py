"""`frag profile PROMPT`: record per-head and per-block usage while generating with the full model."""

from __future__ import annotations

from typing import Annotated

import typer

from fragcli.cli import options as o


def profile(
    prompt: Annotated[str, typer.Argument(help="The prompt to profile.")],
    model: o.Model = None,
    seeds: o.Seeds = "8",
    steps: o.Steps = None,
    profile_steps: Annotated[
        int | None, typer.Option("--profile-steps", help="Profile K steps spread over the schedule (default: all).")
    ] = None,
    step_spacing: Annotated[str, typer.Option("--step-spacing", help="uniform | geometric (dense early steps).")] = "uniform",
    exact_entropy: Annotated[bool, typer.Option("--exact-entropy", help="Exact entropy over all query rows (slower).")] = False,
    guidance: o.Guidance = None,
    negative_prompt: o.Negative = "",
    width: o.Width = None,
    height: o.Height = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Generate with the full model while recording, per attention head, block, step and seed, how much each
    part contributes (energy, entropy) and how blocks change between steps.

    Writes profile.parquet, blocks.parquet, context.json and the full model's images.

    Example: frag profile "a large red circle in the center on a blue background" --seeds 4 --profile-steps 5
    """
    from fragcli.api import profile as run_profile
    from fragcli.console import err, print_json

    result = run_profile(prompt, model=model, seeds=seeds, steps=steps, profile_steps=profile_steps,
                         step_spacing=step_spacing, exact_entropy=exact_entropy, guidance=guidance,
                         negative_prompt=negative_prompt, width=width, height=height, device=device, dtype=dtype,
                         out=out, overwrite=overwrite, show_progress=not json_out)
    if json_out:
        print_json(result.summary())
        return
    ctx = result.context
    t = ctx["timings"]
    err.print(f"profiled [bold]{ctx['model']['name']}[/] ({ctx['model']['hash'][:12]}) on {len(ctx['seeds'])} seeds x "
              f"{len(ctx['profiled_steps'])}/{ctx['steps']} steps: {ctx['rows']['profile']} head rows, "
              f"{ctx['rows']['blocks']} block rows; profiling overhead x{t['overhead_ratio']:.2f}")
    typer.echo(f"profile written to {result.out}")
