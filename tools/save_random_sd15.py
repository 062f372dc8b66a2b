"""Write the built-in ``random:sd15`` pipeline (SD 1.5's architecture, seeded random weights) as a diffusers folder.

``random:sd15`` is built in memory, so a fragment of it can only be applied to a fully loaded model; saved as a folder
it loads like a real checkpoint, and ``open_fragment`` streams it (the full-precision weights of quantized layers are
never read). Used to measure the load peak of a quantized fragment on SD 1.5's sizes:

    python tools/save_random_sd15.py /tmp/sd15 [--dtype fp16]
    frag profile "a red circle" -m /tmp/sd15 --seeds 1 --steps 4 --width 256 --height 256 --out /tmp/p
    frag extract /tmp/p --quantize int8 --out /tmp/f && frag bench /tmp/f --variants 1 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the folder to write (must not exist)")
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="stored dtype (fp16 halves the disk)")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists -- pass a new folder", file=sys.stderr)
        return 2
    import torch

    from fragcli.models.builtin import build_random_sd15

    pipe = build_random_sd15()
    if args.dtype == "fp16":
        for name in ("unet", "vae", "text_encoder"):
            getattr(pipe, name).to(torch.float16)
    tmp = args.out.with_name(args.out.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(args.out)
    print(f"random:sd15 written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
