"""Option types shared by every command, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model: a diffusers folder, a .safetensors checkpoint, a Hugging Face id in the local cache, "
        "or a built-in: shapes (default when shipped), tiny, tiny-sdxl, tiny-sd3, tiny-flux, tiny-pixart, random:sd15.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA, fp32 on CPU)")]
Seeds = Annotated[str, typer.Option("--seeds", help="How many seeds (8 = 0..7), a list (3,5,9) or a range (0-31).")]
Steps = Annotated[int | None, typer.Option("--steps", help="Denoising steps (default: the model's).", show_default=False)]
Guidance = Annotated[
    float | None, typer.Option("--guidance", help="Classifier-free guidance scale (default: the model's).", show_default=False)
]
Negative = Annotated[str, typer.Option("--negative-prompt", help="Negative prompt.")]
Width = Annotated[int | None, typer.Option("--width", help="Image width (default: the model's).", show_default=False)]
Height = Annotated[int | None, typer.Option("--height", help="Image height (default: the model's).", show_default=False)]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: under FRAG_HOME).", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder (atomically).")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per pipeline call.")]
Paraphrases = Annotated[
    Path | None, typer.Option("--paraphrases", help="One prompt per line (default for shapes: the prompt's family).")
]
ParaphraseSeeds = Annotated[int, typer.Option("--paraphrase-seeds", min=1, help="Seeds per paraphrase.")]
Thresholds = Annotated[Path | None, typer.Option("--thresholds", help="Gates file (default: built-in defaults).")]
