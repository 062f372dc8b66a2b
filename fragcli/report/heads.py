"""Per-head importance for the report: mean energy/entropy per (module, head) from profile.parquet, joined with
the fragment's selection (which heads were kept, removed or protected)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fragcli.errors import FragError
from fragcli.hypotheses import Source

REQUIRED = ("module", "block", "kind", "head", "heads", "energy_pre", "energy_post", "entropy")
MAX_HEADS = 4096  # per attention module; more is a damaged file (the report would allocate per head)


def _clean(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _typed(table, path: Path):
    """The columns the report reads, cast to their types (liberally: int64 heads, float32 energies pass); a
    column that cannot be cast, an empty (null) key or a head count outside 1..MAX_HEADS is a FragError."""
    import pyarrow as pa
    import pyarrow.compute as pc

    types = {"module": pa.string(), "block": pa.string(), "kind": pa.string(), "head": pa.int64(),
             "heads": pa.int64(), "energy_pre": pa.float64(), "energy_post": pa.float64(), "entropy": pa.float64()}
    try:
        table = table.select(list(REQUIRED)).cast(pa.schema([(c, types[c]) for c in REQUIRED]))
    except (pa.ArrowException, ValueError) as exc:  # ArrowInvalid for a value that does not cast, or a duplicate
        raise FragError(f"{path.name} has a column of the wrong type ({str(exc).splitlines()[0][:80]})",
                        "re-run frag profile") from None
    nulls = [c for c in ("module", "block", "kind", "head", "heads") if table[c].null_count]
    if nulls:
        raise FragError(f"{path.name}: column {nulls[0]} has empty (null) values", "re-run frag profile")
    if len(table) and not 1 <= pc.min(table["heads"]).as_py() <= pc.max(table["heads"]).as_py() <= MAX_HEADS:
        raise FragError(f"{path.name}: a head count is outside 1..{MAX_HEADS}", "re-run frag profile")
    return table


def _profile_stats(path: Path) -> list[dict[str, Any]]:
    """One entry per module in network order, each with per-head means over seeds x steps."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        table.validate(full=True)  # e.g. a damaged page whose strings are no longer UTF-8
    except Exception as exc:
        raise FragError(f"cannot read {path.name} ({type(exc).__name__})", "re-run frag profile") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise FragError(f"{path.name} lacks column(s) {', '.join(missing)}", "re-run frag profile with this frag")
    table = _typed(table, path)
    entropy = table["entropy"]
    table = table.set_column(table.column_names.index("entropy"), "entropy",
                             pc.if_else(pc.is_nan(entropy), None, entropy))  # NaN = not profiled: skip it
    per_head = table.group_by(["module", "head"]).aggregate(
        [("energy_post", "mean"), ("energy_pre", "mean"), ("entropy", "mean")]).to_pylist()
    per_module = table.group_by(["module", "block", "kind"]).aggregate([("heads", "max")]).to_pylist()
    order = pc.unique(table["module"]).to_pylist()  # first appearance = network order
    info = {m["module"]: m for m in per_module}
    modules: dict[str, dict[str, Any]] = {}
    for name in order:
        n = int(info[name]["heads_max"])
        modules[name] = {"module": name, "block": info[name]["block"], "kind": info[name]["kind"], "heads": n,
                         "energy_post": [None] * n, "energy_pre": [None] * n, "entropy": [None] * n}
    for row in per_head:
        m, h = modules[row["module"]], int(row["head"])
        if 0 <= h < m["heads"]:
            m["energy_post"][h] = _clean(row["energy_post_mean"])
            m["energy_pre"][h] = _clean(row["energy_pre_mean"])
            m["entropy"][h] = _clean(row["entropy_mean"])
    return list(modules.values())


def _selection_only(selection: dict[str, Any]) -> list[dict[str, Any]]:
    modules = []
    for name, scores in (selection.get("scores") or {}).items():
        n = len(scores)
        modules.append({"module": name, "block": None, "kind": None, "heads": n,
                        "energy_post": [None] * n, "energy_pre": [None] * n, "entropy": [None] * n})
    return modules


def head_importance(profile_parquet: Path | None, selection: Source | None, profile: Source | None,
                    model: dict[str, Any]) -> dict[str, Any] | None:
    """The ``head_importance.json`` document, or None when neither a profile nor a selection exists."""
    if profile_parquet is None and selection is None:
        return None
    sel = selection.data if selection else {}
    modules = _profile_stats(profile_parquet) if profile_parquet else _selection_only(sel)
    removed_all = sel.get("removed") or {}
    protected_all = sel.get("protected") or {}
    scores_all = sel.get("scores") or {}
    total = removed_total = 0
    for m in modules:
        removed = sorted(int(h) for h in removed_all.get(m["module"], []))
        protected = sorted(int(h) for h in protected_all.get(m["module"], []))
        scores = scores_all.get(m["module"])
        m["removed"] = removed
        m["protected"] = protected
        m["score"] = [_clean(s) for s in scores] if isinstance(scores, list) and len(scores) == m["heads"] else None
        if selection is not None:
            m["status"] = ["removed" if h in removed else "protected" if h in protected else "kept"
                           for h in range(m["heads"])]
            m["kept"] = m["heads"] - len(removed)
        else:
            m["status"], m["kept"] = None, None
        total += m["heads"]
        removed_total += len(removed)
    return {
        "_type": "frag.head_importance",
        "schema_version": 1,
        "model": model,
        "sources": {"profile": profile.path if profile else None, "selection": selection.path if selection else None},
        "statistic": "mean over seeds x profiled steps; entropy normalised by log(keys), null where not profiled",
        "modules": modules,
        "totals": {"modules": len(modules), "heads": total, "removed": removed_total if selection else None,
                   "removed_fraction": (removed_total / total) if (selection and total) else None},
    }
