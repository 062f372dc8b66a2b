"""Planning for head pruning: score heads from a profile and choose which to remove (`selection.json`).

Scores (higher = more important), aggregated over seeds and profiled steps:
- ``energy``:    E = mean ``energy_post`` (the RMS of the head's contribution after ``to_out``).
- ``entropy``:   1 - mean normalised attention entropy (focused heads rank higher; NaN entropies count as 0.5).
- ``composite``: E/m + 0.5 * S/m + 0.5 * (1 - H), where m is the median E over all heads, S the standard deviation
  of ``energy_post`` across seeds and steps (a head whose contribution varies carries prompt-specific signal)
  and H the mean normalised entropy.
Rank stability: for every seed the heads of a module are ranked by that seed's score; the standard deviation of a
head's rank across seeds, divided by (heads - 1), is its instability. Heads above ``stability_threshold`` are
protected (kept), as are heads the safety margin keeps: the effective retention is min(1, retention + margin).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError

SCORES = ("energy", "entropy", "composite")


@dataclass(frozen=True)
class SelectionParams:
    head_retention: float = 0.7
    score: str = "composite"
    per_module: bool = False
    safety_margin: float = 0.0
    stability_threshold: float = 0.25

    def check(self) -> None:
        if not 0 < self.head_retention <= 1:
            raise FragError(f"--head-retention {self.head_retention} is not in (0, 1]", "pass e.g. 0.7 (keep 70% of heads)")
        if self.score not in SCORES:
            raise FragError(f"unknown --score {self.score!r}", f"use one of: {', '.join(SCORES)}")
        if not 0 <= self.safety_margin < 1:
            raise FragError(f"--safety-margin {self.safety_margin} is not in [0, 1)", "pass e.g. 0.05")
        if not (math.isfinite(self.stability_threshold) and self.stability_threshold >= 0):
            raise FragError(f"--stability-threshold {self.stability_threshold} is not a number >= 0",
                            "pass e.g. 0.25 (1 or more protects no head)")


class SelectionParamsRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head_retention: float
    score: str
    per_module: bool
    safety_margin: float
    stability_threshold: float


class HeadSelection(BaseModel):
    """``selection.json``: the head-pruning plan, written beside the manifest by ``frag extract``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type_: str = Field("frag.selection", alias="_type")
    schema_version: int = 1
    params: SelectionParamsRecord
    removed: dict[str, list[int]] = Field(description="module -> head indices removed")
    kept: dict[str, int] = Field(description="module -> heads kept")
    scores: dict[str, list[float]] = Field(description="module -> score per head (higher = more important)")
    instability: dict[str, list[float]] = Field(description="module -> rank std across seeds / (heads - 1)")
    protected: dict[str, list[int]] = Field(description="module -> heads kept for rank instability")
    heads_total: int
    heads_removed: int
    achieved_retention: float


def _score(method: str, heads: int, h_idx: np.ndarray, e: np.ndarray, ent: np.ndarray, median_e: float) -> np.ndarray:
    """One score per head from its rows (energy_post ``e``, entropy ``ent``), see the module docstring."""
    em = np.array([e[h_idx == h].mean() for h in range(heads)])
    if method == "energy":
        return em
    hm = np.array([ent[h_idx == h].mean() for h in range(heads)])
    if method == "entropy":
        return 1 - hm
    es = np.array([e[h_idx == h].std() for h in range(heads)])
    return em / median_e + 0.5 * es / median_e + 0.5 * (1 - hm)


def score_heads(cols: dict, method: str) -> dict:
    """Per module: heads, score per head, per-seed scores (for rank stability)."""
    e = cols["energy_post"].astype(float)
    ent = np.nan_to_num(cols["entropy"].astype(float), nan=0.5)
    median_e = float(np.median(e)) or 1.0
    seeds = sorted(set(cols["seed"].tolist()))
    out = {}
    for mod in dict.fromkeys(cols["module"].tolist()):
        sel = cols["module"] == mod
        heads = int(cols["heads"][sel][0])
        h_idx, s_idx, e_m, ent_m = cols["head"][sel], cols["seed"][sel], e[sel], ent[sel]
        per_seed = [_score(method, heads, h_idx[s_idx == s], e_m[s_idx == s], ent_m[s_idx == s], median_e)
                    for s in seeds]
        out[mod] = {"heads": heads, "score": _score(method, heads, h_idx, e_m, ent_m, median_e),
                    "per_seed": np.stack(per_seed)}
    return out


def instability(per_seed: np.ndarray) -> np.ndarray:
    """Std of each head's within-module rank across seeds, divided by (heads - 1); 0 with one seed."""
    heads = per_seed.shape[1]
    if per_seed.shape[0] < 2 or heads < 2:
        return np.zeros(heads)
    ranks = per_seed.argsort(axis=1).argsort(axis=1)
    return ranks.std(axis=0) / (heads - 1)


def lowest_units(scores: dict, size: str, retention: float, per_module: bool,
                 protected: dict[str, set[int] | list[int]]) -> dict[str, list[int]]:
    """The units (heads, channels) to remove: lowest ``score`` first, ``protected`` ones kept, every module keeps at
    least one. ``per_module``: ``retention`` in each module; else one global ranking. ``scores[m][size]`` = units."""
    removed: dict[str, list[int]] = {m: [] for m in scores}
    if per_module:
        for m, v in scores.items():
            n_remove = min(int(math.floor(v[size] * (1 - retention) + 1e-9)), v[size] - 1)
            order = [int(u) for u in np.argsort(v["score"], kind="stable") if int(u) not in protected[m]]
            removed[m] = sorted(order[:n_remove])
        return removed
    n_remove = int(math.floor(sum(v[size] for v in scores.values()) * (1 - retention) + 1e-9))
    cands = sorted((float(v["score"][u]), m, u) for m, v in scores.items() for u in range(v[size])
                   if u not in protected[m])
    left = {m: v[size] for m, v in scores.items()}
    for _, m, u in cands:
        if n_remove <= 0:
            break
        if left[m] > 1:
            removed[m].append(u)
            left[m] -= 1
            n_remove -= 1
    return {m: sorted(r) for m, r in removed.items()}


def plan(scores: dict, p: SelectionParams) -> dict:
    """Choose the heads to remove; every module keeps at least one head."""
    p.check()
    keep_frac = min(1.0, p.head_retention + p.safety_margin)
    unstable = {m: instability(v["per_seed"]) for m, v in scores.items()}
    protected = {m: [int(h) for h in np.flatnonzero(u > p.stability_threshold)] for m, u in unstable.items()}
    removed = lowest_units(scores, "heads", keep_frac, p.per_module, protected)
    total = sum(v["heads"] for v in scores.values())
    n_removed = sum(len(r) for r in removed.values())
    selection = {
        "_type": "frag.selection",
        "schema_version": 1,
        "params": asdict(p),
        "removed": {m: r for m, r in removed.items()},
        "kept": {m: scores[m]["heads"] - len(r) for m, r in removed.items()},
        "scores": {m: [round(float(x), 8) for x in v["score"]] for m, v in scores.items()},
        "instability": {m: [round(float(x), 6) for x in u] for m, u in unstable.items()},
        "protected": protected,
        "heads_total": total,
        "heads_removed": n_removed,
        "achieved_retention": 1 - n_removed / total if total else 1.0,
    }
    check_selection(selection, scores)
    HeadSelection.model_validate(selection)
    return selection


def check_selection(selection: dict, scores: dict | None = None) -> None:
    """No module left with zero heads; indices valid; retention never below what was asked."""
    for m, r in selection["removed"].items():
        heads = scores[m]["heads"] if scores else selection["kept"][m] + len(r)
        if len(set(r)) != len(r) or any(not 0 <= h < heads for h in r):
            raise FragError(f"selection for {m} has invalid head indices {r}", "re-run frag extract")
        if heads - len(r) < 1:
            raise FragError(f"selection leaves {m} with zero heads", "keep at least one head per module")
    asked = selection["params"]["head_retention"]
    if selection["achieved_retention"] + 1e-9 < asked:
        raise FragError("selection removes more heads than asked", "re-run frag extract")
