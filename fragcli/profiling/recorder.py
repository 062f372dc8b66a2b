"""Where profiling rows accumulate (one columnar table per collector), and which seed/step is current.

Columns are declared once, as (name, pyarrow type name) pairs: the attention-head table by the head-pruning
technique's collector (``HEAD_TYPES``), the block table by the profiler itself (``BLOCK_TYPES``), and any other
table by the technique whose collector fills it. ``arrow_schema`` turns a declaration into a pyarrow schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEAD_TYPES = {"module": "string", "block": "string", "kind": "string", "head": "int32", "heads": "int32",
              "seed": "int64", "step": "int32", "timestep": "float64", "energy_pre": "float64",
              "energy_post": "float64", "entropy": "float64"}
BLOCK_TYPES = {"block": "string", "block_type": "string", "seed": "int64", "step": "int32", "timestep": "float64",
               "rel_update": "float64", "cos_prev": "float64"}
HEAD_COLUMNS = tuple(HEAD_TYPES)
BLOCK_COLUMNS = tuple(BLOCK_TYPES)
HEAD_TABLE, BLOCK_TABLE = "profile", "blocks"


def arrow_schema(columns):
    """``[(name, type name), ...]`` (or a dict) -> ``pyarrow.Schema``."""
    import pyarrow as pa

    items = columns.items() if isinstance(columns, dict) else columns
    return pa.schema([(name, getattr(pa, type_name)()) for name, type_name in items])


def top_block(module_name: str) -> str:
    """``down_blocks.1.attentions.0...`` -> ``down_blocks.1``; ``mid_block...`` -> ``mid_block``."""
    parts = module_name.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


@dataclass
class Recorder:
    """Shared state of one profiling run: the current seed/step, whether this step is profiled, and the rows."""

    profiled_steps: set[int] = field(default_factory=set)
    sample_rows: int | None = 256  # query rows for entropy; None = exact
    seed: int = 0
    step: int = -1
    timestep: float = float("nan")
    enabled: bool = True
    columns: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # table -> declared columns
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # table -> column -> values
    first_context: object = None  # encoder_hidden_states of the first denoiser call (for the embedding hash)
    scheduler: object = None  # the pipeline's scheduler, for collectors that turn predictions into x0

    def __post_init__(self) -> None:
        self.declare(HEAD_TABLE, list(HEAD_TYPES.items()))
        self.declare(BLOCK_TABLE, list(BLOCK_TYPES.items()))

    def declare(self, table: str, columns: list[tuple[str, str]]) -> None:
        """Declare ``table``'s columns (again with the same columns is a no-op; different ones are refused)."""
        columns = [tuple(c) for c in columns]
        if table in self.columns:
            if self.columns[table] != columns:
                raise ValueError(f"profile table {table!r} is declared twice with different columns")
            return
        self.columns[table] = columns
        self.tables[table] = {name: [] for name, _ in columns}

    @property
    def heads(self) -> dict[str, list]:
        return self.tables[HEAD_TABLE]

    @property
    def blocks(self) -> dict[str, list]:
        return self.tables[BLOCK_TABLE]

    @property
    def active(self) -> bool:
        return self.enabled and self.step in self.profiled_steps

    def start_seed(self, seed: int) -> None:
        self.seed, self.step = seed, -1

    def add_rows(self, table: str, rows: dict[str, list]) -> None:
        """Append equal-length columns to ``table`` (seed/step/timestep are filled in when not given)."""
        cols = self.tables[table]
        n = len(next(iter(rows.values())))
        for key, value in (("seed", self.seed), ("step", self.step), ("timestep", self.timestep)):
            if key in cols and key not in rows:
                rows[key] = [value] * n
        missing = set(cols) - set(rows)
        if missing:
            raise ValueError(f"rows for profile table {table!r} lack columns {sorted(missing)}")
        for key, values in rows.items():
            cols[key] += list(values)

    def add_heads(self, module: str, kind: str, energy_pre, energy_post, entropy) -> None:
        n = len(energy_pre)
        self.add_rows(HEAD_TABLE, {
            "module": [module] * n, "block": [top_block(module)] * n, "kind": [kind] * n, "head": list(range(n)),
            "heads": [n] * n, "energy_pre": [float(x) for x in energy_pre],
            "energy_post": [float(x) for x in energy_post], "entropy": [float(x) for x in entropy]})

    def add_block(self, block: str, block_type: str, rel_update: float, cos_prev: float) -> None:
        self.add_rows(BLOCK_TABLE, {"block": [block], "block_type": [block_type], "rel_update": [rel_update],
                                    "cos_prev": [cos_prev]})
