"""`frag generate PROMPT`: many seeds with a fragment (or the full model), falling back when a fragment is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a fragment's prompt or a paraphrase of it).")],
    fragment: Annotated[
        str | None, typer.Option("--fragment", "-f", help="A fragment folder, or 'auto' (match model and prompt).")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 2 instead of falling back when the fragment is refused.")] = False,
    model: o.Model = None,
    seeds: o.Seeds = "8",
    steps: o.Steps = None,
    guidance: o.Guidance = None,
    negative_prompt: o.Negative = "",
    width: o.Width = None,
    height: o.Height = None,
    batch_size: o.BatchSize = 1,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Generate one image per seed, with a fragment when one is given (or found), else the full model.

    A fragment that is missing, stale (another base model) or corrupt is refused with the reason; frag then runs the
    full model with a warning, or exits 2 with --strict. Writes seed-<n>.png and run.json.

    Example: frag generate "a large red circle in the center on a blue background" --fragment auto --seeds 0-31 --batch-size 4
    """
    from fragcli.console import err, print_json, warn
    from fragcli.generation import check_prompt
    from fragcli.models import default_model
    from fragcli.paths import check_out_dir, reports_dir, safe_name, timestamp
    from fragcli.runs import run_generation

    check_prompt(prompt)
    from fragcli.seeds import parse_seeds

    seed_list = parse_seeds(seeds)
    name = model or _fragment_model(fragment) or default_model()
    target = check_out_dir(Path(out) if out else reports_dir() / safe_name(name) / timestamp() / "generate", overwrite)
    run = run_generation(name, prompt, fragment, seed_list, target, steps=steps, guidance=guidance,
                         negative_prompt=negative_prompt, width=width, height=height, batch_size=batch_size,
                         device=device, dtype=dtype, strict=strict, show_progress=not json_out, on_fallback=warn)
    if json_out:
        print_json({k: run[k] for k in ("out", "model", "fragment", "fallback_reason", "images_per_min", "total_s")})
        return
    used = run["fragment"] or "the full model"
    err.print(f"{len(seed_list)} images with {used}: {run['images_per_min']:.1f} images/min")
    typer.echo(f"images written to {target}")


def _fragment_model(fragment: str | None) -> str | None:
    """With a fragment folder and no --model, use the fragment's base model."""
    if not fragment or fragment == "auto":
        return None
    from fragcli.errors import FragError
    from fragcli.manifest import read_manifest

    try:
        base = read_manifest(Path(fragment)).base_model
    except FragError:
        return None  # refused later, with the reason, by the fallback logic
    return base.spec
