"""`frag profile PROMPT`: record per-head and per-block usage while generating with the full model."""

from __future__ import annotations

from pathlib import Path
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
    from fragcli.console import err, print_json
    from fragcli.generation import check_prompt, resolve_settings
    from fragcli.models import default_model, load_model
    from fragcli.paths import check_out_dir, reports_dir, safe_name, timestamp
    from fragcli.profiling.run import run_profile
    from fragcli.seeds import parse_seeds, pick_steps

    check_prompt(prompt)
    seed_list = parse_seeds(seeds)
    if steps is not None and steps < 1:
        from fragcli.errors import FragError

        raise FragError(f"--steps must be at least 1 (got {steps})", "pass --steps 1 or more")
    name = model or default_model()
    target = Path(out) if out else reports_dir() / safe_name(name) / timestamp() / "profile"
    target = check_out_dir(target, overwrite)
    loaded = load_model(name, device, dtype)
    settings = resolve_settings(loaded, prompt, steps, guidance, width, height, negative_prompt)
    chosen = pick_steps(settings.steps, profile_steps, step_spacing)
    ctx = run_profile(loaded, settings, seed_list, chosen, target, exact_entropy, show_progress=not json_out)
    summary = {"out": str(target), "model": ctx["model"], "rows": ctx["rows"], "seeds": ctx["seeds"],
               "profiled_steps": ctx["profiled_steps"], "timings": ctx["timings"]}
    if json_out:
        print_json(summary)
    else:
        t = ctx["timings"]
        err.print(f"profiled [bold]{loaded.name}[/] ({loaded.hash[:12]}) on {len(seed_list)} seeds x "
                  f"{len(chosen)}/{settings.steps} steps: {ctx['rows']['profile']} head rows, "
                  f"{ctx['rows']['blocks']} block rows; profiling overhead x{t['overhead_ratio']:.2f}")
        typer.echo(f"profile written to {target}")
