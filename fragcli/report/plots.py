"""The report's plots (matplotlib, Agg, no pyplot state): head usage heatmap, quality vs retention, latency.

Each function writes one PNG and returns its path, or returns None when its input is missing (the caller notes
that); none of them ever draws made-up data.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from fragcli.paths import atomic_write_bytes


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: savefig renders PNG with the Agg canvas, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def short_module(name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` -> ``down.0.a0.t0.attn1`` (axis labels)."""
    for long, short in (("down_blocks.", "down."), ("up_blocks.", "up."), ("mid_block.", "mid."),
                        ("attentions.", "a"), ("transformer_blocks.", "t")):
        name = name.replace(long, short)
    return name


def head_usage(heads: dict[str, Any] | None, path: Path) -> Path | None:
    """Heatmap module x head of mean energy_post, normalised per module; removed heads marked with x."""
    if not heads or not heads.get("modules"):
        return None
    modules = heads["modules"]
    n_heads = max(m["heads"] for m in modules)
    grid = np.full((len(modules), n_heads), np.nan)
    for i, m in enumerate(modules):
        values = m["energy_post"] if any(v is not None for v in m["energy_post"]) else (m.get("score") or [])
        row = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
        if row.size and np.isfinite(row).any():
            top = np.nanmax(np.abs(row))
            grid[i, : row.size] = row / top if top > 0 else row
    if not np.isfinite(grid).any():
        return None
    fig = _figure(min(max(6.5, 3.5 + 0.3 * n_heads), 16), min(max(3.0, 1.5 + 0.22 * len(modules)), 40))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                   interpolation="nearest")
    for i, m in enumerate(modules):
        for h in m.get("removed") or []:
            ax.text(h, i, "x", ha="center", va="center", color="red", fontsize=8, fontweight="bold")
        for h in m.get("protected") or []:
            ax.text(h, i, "p", ha="center", va="center", color="white", fontsize=8, fontweight="bold")
    ax.set_yticks(range(len(modules)))
    ax.set_yticklabels([short_module(m["module"]) for m in modules], fontsize=6 if len(modules) > 20 else 8)
    ax.set_xticks(range(n_heads))
    ax.set_xlabel("head")
    used = "energy_post" if any(any(v is not None for v in m["energy_post"]) for m in modules) else "selection score"
    ax.set_title(f"head usage: mean {used} / module max (x = removed, p = protected)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.6)
    return _save(fig, path)


def quality_vs_retention(points: list[dict[str, Any]], clip_delta_max: float | None, path: Path) -> Path | None:
    """Aggregate CLIP delta, SSIM and LPIPS against the fraction of units removed (one line per unit of the
    techniques' summaries, e.g. attention_heads), one marker per sweep point."""
    units = list(dict.fromkeys(u for p in points for u in (p.get("removed_fraction") or {})))
    if not units:
        return None
    series = [("clip_delta_rel", "CLIP delta (rel)"), ("ssim_mean", "SSIM"), ("lpips_mean", "LPIPS")]
    present = [(k, label) for k, label in series
               if any(p.get(k) is not None and (p.get("removed_fraction") or {}) for p in points)]
    if not present:
        return None
    fig = _figure(6, 2.2 * len(present) + 0.6)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    n_points = 0
    for ax, (key, label) in zip(axes, present, strict=True):
        for unit in units:
            pts = sorted((p["removed_fraction"][unit], p[key]) for p in points
                          if unit in (p.get("removed_fraction") or {}) and p.get(key) is not None)
            n_points = max(n_points, len(pts))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=unit.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "clip_delta_rel" and clip_delta_max is not None:
            ax.axhline(-clip_delta_max, color="red", linestyle="--", linewidth=1,
                       label=f"allowed drop ({clip_delta_max:g})")
        if len(units) > 1 or key == "clip_delta_rel":
            ax.legend(fontsize=8)
    names = " / ".join(u.replace("_", " ") for u in units)
    axes[-1].set_xlabel(f"fraction of {names} removed")
    axes[0].set_title(f"quality vs retention ({n_points} point(s))")
    return _save(fig, path)


def latency(perf: dict[str, Any], path: Path) -> Path | None:
    """Bars: seconds per image, full model vs fragment, with the speedup in the title."""
    full, frag = perf.get("full_per_image_s"), perf.get("fragment_per_image_s")
    if full is None or frag is None:
        return None
    fig = _figure(4.5, 3.5)
    ax = fig.add_subplot()
    bars = ax.bar(["full", "fragment"], [full, frag], color=["#888888", "#2a7ab0"])
    ax.bar_label(bars, fmt="%.3g s")
    ax.set_ylabel("seconds per image")
    speed = perf.get("speedup")
    extra = f", {perf['variants']} variants" if perf.get("variants") else ""
    ax.set_title(f"latency: speedup {speed:.2f}x{extra}" if speed is not None else "latency")
    return _save(fig, path)
