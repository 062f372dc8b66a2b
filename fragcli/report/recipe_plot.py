"""``recipe.png``: the recipe search's candidates, size and time against quality loss (matplotlib, Agg, no pyplot).

Left: resident MiB vs quality loss; right: seconds per image vs quality loss. Passing candidates are green dots,
failing ones red crosses, the Pareto front a dashed line, the full model a black star, the chosen candidate
labelled. Refused and skipped candidates were not measured and are not drawn (recipe.json lists them).
"""

from __future__ import annotations

from pathlib import Path

from fragcli.recipe import quality_loss
from fragcli.report.plots import _figure, _save

MIB = 1024 * 1024
_LOSS_LABEL = {"clip_drop": "CLIP-score drop (-clip_delta_rel)", "ssim_loss": "1 - SSIM"}


def recipe_plot(record, path: Path) -> Path | None:
    """Draw ``record`` (a ``RecipeRecord``) into ``path``; None (nothing written) when no candidate was measured."""
    metric = record.pareto_metric
    pts = [c for c in record.candidates
           if c.status in ("passed", "failed") and quality_loss(c.quality, metric) is not None]
    if not pts:
        return None
    fig = _figure(11, 4.2)
    panels = (("resident_bytes", "pareto", "resident weights (MiB)", MIB, record.full.resident_bytes),
              ("seconds_per_image", "pareto_speed", "seconds per image", 1.0, record.full.seconds_per_image))
    gate = record.thresholds.get("clip_delta_max") if metric == "clip_drop" else \
        (1.0 - record.thresholds["ssim_min"] if "ssim_min" in record.thresholds else None)
    for i, (attr, front, label, scale, full) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for status, style in (("passed", {"marker": "o", "color": "tab:green"}),
                              ("failed", {"marker": "x", "color": "tab:red"})):
            xs = [getattr(c, attr) / scale for c in pts if c.status == status]
            ys = [quality_loss(c.quality, metric) for c in pts if c.status == status]
            if xs:
                ax.scatter(xs, ys, label=status, s=36, **style)
        line = sorted((getattr(c, attr) / scale, quality_loss(c.quality, metric))
                      for c in pts if getattr(c, front))
        if len(line) > 1:
            ax.plot([x for x, _ in line], [y for _, y in line], "--", color="gray", lw=1, label="Pareto front")
        if full is not None:
            ax.scatter([full / scale], [0.0], marker="*", s=120, color="black", label="full model")
        if gate is not None:
            ax.axhline(gate, color="tab:red", lw=0.8, ls=":", label=f"gate {gate:g}")
        chosen = next((c for c in pts if c.id == record.chosen), None)
        if chosen is not None:
            x, y = getattr(chosen, attr) / scale, quality_loss(chosen.quality, metric)
            ax.scatter([x], [y], s=160, facecolors="none", edgecolors="tab:blue", linewidths=1.5)
            ax.annotate(f"chosen: {chosen.id}", (x, y), textcoords="offset points", xytext=(6, 8), fontsize=8,
                        color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel(_LOSS_LABEL[metric])
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    verdict = f"chosen {record.chosen}" if record.chosen else "no candidate passed"
    fig.suptitle(f"recipe search, objective {record.objective}: {len(pts)} measured of {len(record.candidates)} "
                 f"on {len(record.seeds)} seeds, {verdict}", fontsize=10)
    return _save(fig, Path(path))
