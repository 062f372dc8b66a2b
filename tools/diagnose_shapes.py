#!/usr/bin/env python
"""Where the shipped ``shapes`` model loses shape information (issue 12), measured with the shipped judge.

On held-out single-shape scenes of the shapes world, the judge's colour x shape accuracy on:
  render          the rendered images themselves (the judge's ceiling)
  vae_roundtrip   the renders encoded and decoded by the shipped VAE (what the latent space can carry)
  down16, down32  the renders box-downsampled to 16x16 (the latent's resolution, no VAE) or 32x32 and upsampled
                  back
  generated       the pipeline's images for the canonical captions, at several guidance scales
and how well the frozen text encoder tells the prompts apart: for caption pairs that differ only in shape, colour,
size or position, the mean cosine of the text encoder's token states at the tokens that differ (the UNet's context).

    python tools/diagnose_shapes.py [--n 200] [--guidance 2.5,5,8] [--json] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fragcli.shapes import world  # noqa: E402


def _acc(judge, images, scenes) -> dict:
    from eval_shapes import _class_stats

    pred = judge.classify(images, world.class_texts()).tolist()
    return _class_stats(pred, [s.class_index for s in scenes], prefix="x")


def _roundtrip(vae, images):
    x = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample.clamp(-1, 1)
    arr = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


SWAPS = {"shape": [(a, b) for a in world.SHAPES for b in world.SHAPES if a != b],
         "color": [(f" {a} ", f" {b} ") for a in world.COLORS for b in world.COLORS if a != b],
         "size": [("large", "small"), ("small", "large")],
         "position": [("at the top left", "at the bottom right"), ("on the left", "on the right"),
                      ("at the top right", "at the bottom left"), ("at the top", "at the bottom")]}


def text_separation(text_encoder, tokenizer, scenes) -> dict:
    """How differently the text encoder states the words the UNet must tell apart: for caption pairs that differ in
    one attribute (shape, colour, size, position), the mean cosine of the token states at the tokens that differ
    (1.0: the UNet's context does not change at all, so it cannot learn that attribute)."""
    def enc(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return ids, text_encoder(ids)[0].float()

    base = [world.canonical_caption(s) for s in scenes[:50]]
    out = {}
    for attr, swaps in SWAPS.items():
        pairs = []
        for text in base:
            for a, b in swaps:
                if a in f" {text} ":
                    pairs.append((text, text.replace(a.strip() if attr == "shape" else a, b.strip() if attr == "shape" else b, 1)))
                    break
        (ia, ha), (ib, hb) = enc([p[0] for p in pairs]), enc([p[1] for p in pairs])
        diff = ia != ib
        cos = torch.nn.functional.cosine_similarity(ha, hb, dim=-1)
        out[f"text_token_cos_{attr}_swapped"] = float(cos[diff].mean()) if diff.any() else 1.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--guidance", default="2.5,5,8")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default=None, help="a pipeline folder (default: the shipped fragcli/models/shapes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from eval_shapes import generate, load_judge_model, load_pipeline

    pipe = load_pipeline(Path(args.model)) if args.model else load_pipeline()
    judge = load_judge_model()
    scenes = world.heldout_single_scenes(args.n, seed=1)
    renders = [world.render(s) for s in scenes]
    out = {"n": args.n, "render": _acc(judge, renders, scenes),
           "vae_roundtrip": _acc(judge, _roundtrip(pipe.vae, renders), scenes),
           **{f"down{side}": _acc(judge, [r.resize((side, side), Image.BOX).resize((64, 64), Image.BILINEAR)
                                          for r in renders], scenes) for side in (32, 16)}}
    out.update(text_separation(pipe.text_encoder, pipe.tokenizer, scenes))
    prompts = [world.canonical_caption(s) for s in scenes]
    for g in (float(x) for x in args.guidance.split(",")):
        imgs = generate(pipe, prompts, [100_000 + i for i in range(args.n)], g)
        out[f"generated_g{g:g}"] = _acc(judge, imgs, scenes)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        for k, v in out.items():
            print(k, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
