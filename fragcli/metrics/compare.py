"""Comparing a fragment's images with the full model's: per-image metrics, aggregates, a side-by-side grid."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from fragcli.errors import FragError
from fragcli.metrics.base import Unavailable, broadcast_texts, check_pair, rgb
from fragcli.metrics.clip import ClipScorer
from fragcli.metrics.perceptual import LpipsMetric
from fragcli.metrics.simple import phash_distance, ssim
from fragcli.paths import atomic_write_bytes


@dataclass
class MetricSet:
    """The optional metrics that could be built, and why the others could not."""

    clip: ClipScorer | None = None
    lpips: LpipsMetric | None = None
    unavailable: dict[str, str] = field(default_factory=dict)


def load_metrics(clip_model: str | None = None, clip_weights: Path | str | None = None,
                 lpips_weights: Path | str | None = None, judge: Any = None, device: str = "cpu") -> MetricSet:
    """Build CLIP (from ``judge``, else open_clip ``clip_model`` + ``clip_weights``) and LPIPS where possible."""
    out = MetricSet()
    try:
        if judge is not None and clip_weights is None:
            out.clip = ClipScorer.from_judge(judge)
        elif clip_weights is not None and not clip_model:
            raise FragError("--clip-weights given without --clip-model", "pass --clip-model NAME (e.g. ViT-B-32)")
        else:
            out.clip = ClipScorer.from_open_clip(clip_model or "", clip_weights, device=device)
    except Unavailable as exc:
        out.unavailable["clip"] = exc.reason
    try:
        out.lpips = LpipsMetric.load(lpips_weights, device=device)
    except Unavailable as exc:
        out.unavailable["lpips"] = exc.reason
    return out


# ----------------------------------------------------------------------------------------------- comparisons


class Comparison(NamedTuple):
    """``per_image``: one dict per pair; ``unavailable``: ``{metric: reason}`` for metrics left as None."""

    per_image: list[dict[str, Any]]
    unavailable: dict[str, str]


def clip_delta_rel(clip_full: float | None, clip_fragment: float | None) -> float | None:
    """(fragment - full) / |full|; negative = the fragment scores lower. None when either is missing or full is 0."""
    if clip_full is None or clip_fragment is None or clip_full == 0:
        return None
    return (clip_fragment - clip_full) / abs(clip_full)


def compare_images(full: Sequence[Image.Image], frag: Sequence[Image.Image], texts: Sequence[str] | str,
                   clip: ClipScorer | None, lpips_metric: LpipsMetric | None,
                   unavailable: dict[str, str] | None = None) -> Comparison:
    """Compare image i of ``full`` with image i of ``frag``.

    Each dict: ``clip_full, clip_fragment, clip_delta_rel, lpips, ssim, phash_distance`` (None = unavailable;
    the reason is in ``Comparison.unavailable``). ``texts``: one prompt, or one per image.
    """
    if len(full) != len(frag):
        raise FragError(f"{len(full)} full-model images but {len(frag)} fragment images",
                        "compare the same seeds with both models")
    texts = broadcast_texts(texts, len(full))
    reasons = dict(unavailable or {})
    if clip is None:
        reasons.setdefault("clip", "no CLIP weights: pass --clip-weights PATH")
    if lpips_metric is None:
        reasons.setdefault("lpips", "LPIPS backbone not loaded: pass --lpips-weights PATH")
    clip_full = clip.score(full, texts) if clip is not None else [None] * len(full)
    clip_frag = clip.score(frag, texts) if clip is not None else [None] * len(full)
    dists = lpips_metric.distances(full, frag) if lpips_metric is not None else [None] * len(full)
    rows = []
    for i, (a, b) in enumerate(zip(full, frag, strict=True)):
        rows.append({
            "clip_full": clip_full[i],
            "clip_fragment": clip_frag[i],
            "clip_delta_rel": clip_delta_rel(clip_full[i], clip_frag[i]),
            "lpips": dists[i],
            "ssim": ssim(a, b),
            "phash_distance": phash_distance(a, b),
        })
    return Comparison(rows, {k: reasons[k] for k in sorted(reasons) if k in ("clip", "lpips")})


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(nums) / len(nums) if nums else None


def aggregate(per_image: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The ``aggregate`` block of validation.json; ``clip_delta_rel`` is computed from the two means."""
    full = _mean([r.get("clip_full") for r in per_image])
    frag = _mean([r.get("clip_fragment") for r in per_image])
    passed = [bool(r["passed"]) for r in per_image if r.get("passed") is not None]
    return {
        "clip_full_mean": full,
        "clip_fragment_mean": frag,
        "clip_delta_rel": clip_delta_rel(full, frag),
        "lpips_mean": _mean([r.get("lpips") for r in per_image]),
        "ssim_mean": _mean([r.get("ssim") for r in per_image]),
        "phash_mean": _mean([r.get("phash_distance") for r in per_image]),
        "pass_rate": (sum(passed) / len(passed)) if passed else None,
    }


# ------------------------------------------------------------------------------------------------------ grid


def side_by_side_grid(full: Sequence[Image.Image], frag: Sequence[Image.Image], path: Path | str,
                      labels: Sequence[str] | None = None, amplify: float = 4.0) -> Path:
    """Write a PNG: one row per seed, columns full | fragment | |full - fragment| x ``amplify``; returns ``path``."""
    if not full or len(full) != len(frag):
        raise FragError(f"cannot draw a grid of {len(full)} full and {len(frag)} fragment images",
                        "pass the same non-zero number of images for both")
    w = max(im.width for im in full)
    h = max(im.height for im in full)
    header = 14
    label_w = 0 if labels is None else 60
    grid = Image.new("RGB", (label_w + 3 * w, header + h * len(full)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(("full", "fragment", f"|diff| x{amplify:g}")):
        draw.text((label_w + col * w + 2, 1), title, fill="black")
    for row, (a, b) in enumerate(zip(full, frag, strict=True)):
        check_pair(a, b)
        a, b = rgb(a), rgb(b)
        diff = np.asarray(ImageChops.difference(a, b), dtype=np.float32) * amplify
        diff_img = Image.fromarray(np.clip(diff, 0, 255).astype(np.uint8))
        y = header + row * h
        for col, im in enumerate((a, b, diff_img)):
            grid.paste(im, (label_w + col * w, y))
        if labels is not None:
            draw.text((2, y + 2), str(labels[row])[:10], fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
