"""`frag generate PROMPT`: many seeds with a fragment (or the full model), falling back when a fragment is refused."""

from __future__ import annotations

from typing import Annotated

import typer

from fragcli.cli import options as o


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a fragment's prompt or a paraphrase of it).")],
    fragment: Annotated[
        str | None, typer.Option("--fragment", "-f", help="A fragment folder, or 'auto' (the fragment library's closest "
                                                     "prompt for this model; see frag cache).")
    ] = None,
    min_similarity: Annotated[
        float | None, typer.Option("--min-similarity", help="--fragment auto: the smallest prompt-embedding cosine "
                                   "similarity for a library fragment to serve this prompt (default: thresholds.yaml's "
                                   "fragment_min_similarity, 0.9).", show_default=False)
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 2 instead of falling back when the fragment is refused.")] = False,
    evict_text_encoders: Annotated[
        bool | None, typer.Option("--evict-text-encoders/--keep-text-encoders",
                                  help="Run without the text encoders when the fragment caches its prompt's "
                                  "embeddings (default: as the fragment was extracted).", show_default=False)
    ] = None,
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

    --fragment auto asks the fragment library (frag cache list): the fragment built for this prompt, else the one
    whose prompt is most similar (cosine of the model's text embeddings) at --min-similarity or above; run.json
    records the choice ("library"), the similarity and why the others were rejected.

    Example: frag generate "a large red circle in the center on a blue background" --fragment auto --seeds 0-31 --batch-size 4
    """
    from fragcli.api import generate as run_generate
    from fragcli.console import err, print_json, warn

    result = run_generate(prompt, fragment=fragment, strict=strict, model=model, seeds=seeds, steps=steps,
                          guidance=guidance, negative_prompt=negative_prompt, width=width, height=height,
                          batch_size=batch_size, device=device, dtype=dtype, out=out, overwrite=overwrite,
                          show_progress=not json_out, on_fallback=warn, evict_text_encoders=evict_text_encoders,
                          min_similarity=min_similarity)
    if json_out:
        print_json(result.summary())
        return
    run = result.run
    used = run["fragment"] or "the full model"
    lib = run.get("library")
    if lib and lib.get("chosen"):
        how = "built for this prompt" if lib["exact"] else f"prompt similarity {lib['similarity']:.4f}"
        err.print(f"fragment library: {lib['chosen']} ({how}, >= {lib['min_similarity']:g})")
    err.print(f"{len(run['seeds'])} images with {used}: {run['images_per_min']:.1f} images/min")
    typer.echo(f"images written to {result.out}")
