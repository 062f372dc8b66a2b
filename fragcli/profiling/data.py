"""A profile folder as the planners read it: its context and its Parquet tables, each checked on the way in."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from fragcli.errors import FragError
from fragcli.profiling.recorder import HEAD_COLUMNS, HEAD_TABLE, HEAD_TYPES, arrow_schema


class ProfileData:
    """``frag profile``'s folder: ``context`` (context.json) and ``table(name)`` (``<name>.parquet``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FragError(f"profile folder {self.folder} does not exist", "pass the folder that frag profile printed")
        self.context = read_context(self.folder)

    def table(self, name: str, columns: tuple[str, ...] = ()):
        """The pyarrow table ``<name>.parquet``, checked for ``columns`` and for at least one row."""
        return read_table(self.folder, name, columns)

    @cached_property
    def _heads(self) -> dict[str, Any]:
        return read_profile(self.folder)

    def head_columns(self) -> dict[str, Any]:
        """The attention-head table as numpy columns (``HEAD_COLUMNS``)."""
        return self._heads


def read_context(folder: Path) -> dict:
    """``context.json`` of a profile folder, validated as a ``ProfileContext`` (returned as its dict)."""
    from fragcli.records import ProfileContext, read_record

    return read_record(ProfileContext, Path(folder) / "context.json").dump()


def read_table(folder: Path, name: str, columns: tuple[str, ...] = ()):
    """``folder/<name>.parquet`` as a pyarrow table; missing, unreadable, column-less or empty -> FragError."""
    import pyarrow.parquet as pq

    path = Path(folder) / f"{name}.parquet"
    if not path.is_file():
        raise FragError(f"no {path.name} in {folder}", "pass the folder that frag profile wrote")
    try:
        table = pq.read_table(path)
        table.validate(full=True)  # e.g. a damaged page whose strings are no longer UTF-8
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise FragError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:120]})",
                        "re-run frag profile") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise FragError(f"{path} lacks columns {missing}", "re-run frag profile with this version of frag")
    if isinstance(columns, dict):  # declared types: (name -> pyarrow type name)
        for name, type_name in columns.items():
            got = table.schema.field(name).type
            if got != arrow_schema({name: type_name}).field(name).type:
                raise FragError(f"{path}: column {name} has type {got}, expected {type_name}",
                                "re-run frag profile (the file was edited or written by another tool)")
    if table.num_rows == 0:
        raise FragError(f"{path} has no rows", "re-run frag profile")
    return table


def read_profile(profile_dir: Path) -> dict[str, Any]:
    """The head table of ``profile_dir`` as numpy columns, checked: declared types, finite non-negative energies,
    head indices inside their module (a missing, malformed or damaged file is a FragError)."""
    import numpy as np

    table = read_table(profile_dir, HEAD_TABLE, HEAD_TYPES)
    path = Path(profile_dir) / f"{HEAD_TABLE}.parquet"
    nulls = [c for c in HEAD_COLUMNS if table.column(c).null_count]
    if nulls:
        raise FragError(f"{path}: column {nulls[0]} has empty (null) values", "re-run frag profile")
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in HEAD_COLUMNS}
    for name in ("energy_pre", "energy_post"):
        bad = ~np.isfinite(cols[name].astype(float)) | (cols[name] < 0)
        if bad.any():
            raise FragError(f"{path}: {int(bad.sum())} row(s) have a NaN, infinite or negative {name}",
                            "re-run frag profile (in fp32 if fp16 overflowed)")
        if (cols[name] > np.finfo(np.float32).max).any():  # no RMS of float32 activations; its score would overflow
            raise FragError(f"{path}: {name} above float32's largest value", "re-run frag profile")
    ent = cols["entropy"].astype(float)
    if (np.isfinite(ent) & ((ent < -1e-6) | (ent > 1 + 1e-6))).any() or np.isinf(ent).any():
        raise FragError(f"{path}: entropy outside [0, 1]", "re-run frag profile")
    heads, head = cols["heads"], cols["head"]
    if (heads < 1).any() or (head < 0).any() or (head >= heads).any():
        raise FragError(f"{path}: head indices outside their module's head count", "re-run frag profile")
    for mod in dict.fromkeys(cols["module"].tolist()):
        if len(set(heads[cols["module"] == mod].tolist())) != 1:
            raise FragError(f"{path}: module {mod} has rows with different head counts", "re-run frag profile")
    _check_complete(table, path)
    return cols


def _check_complete(table, path: Path) -> None:
    """One row per (module, head, seed, step): every module has every head at every recorded (seed, step), once
    (a missing row would be scored as NaN, a duplicate twice)."""
    groups = table.group_by(["module", "seed", "step"]).aggregate(
        [("head", "count"), ("head", "count_distinct"), ("heads", "max")])
    count, distinct, heads = (groups.column(c).to_numpy() for c in ("head_count", "head_count_distinct", "heads_max"))
    if (count != heads).any() or (distinct != heads).any():
        raise FragError(f"{path}: some (module, seed, step) lack a head's row or repeat one", "re-run frag profile")
    pairs = len(table.group_by(["seed", "step"]).aggregate([]))
    modules = len(table.group_by(["module"]).aggregate([]))
    if len(groups) != pairs * modules:
        raise FragError(f"{path}: some modules lack rows for some (seed, step)", "re-run frag profile")
