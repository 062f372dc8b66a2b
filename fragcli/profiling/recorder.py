"""Where profiling rows accumulate (columnar lists), and which seed/step is current."""

from __future__ import annotations

from dataclasses import dataclass, field

HEAD_COLUMNS = ("module", "block", "kind", "head", "heads", "seed", "step", "timestep",
                "energy_pre", "energy_post", "entropy")
BLOCK_COLUMNS = ("block", "block_type", "seed", "step", "timestep", "rel_update", "cos_prev")


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
    heads: dict[str, list] = field(default_factory=lambda: {c: [] for c in HEAD_COLUMNS})
    blocks: dict[str, list] = field(default_factory=lambda: {c: [] for c in BLOCK_COLUMNS})
    first_context: object = None  # encoder_hidden_states of the first denoiser call (for the embedding hash)

    @property
    def active(self) -> bool:
        return self.enabled and self.step in self.profiled_steps

    def start_seed(self, seed: int) -> None:
        self.seed, self.step = seed, -1

    def add_heads(self, module: str, kind: str, energy_pre, energy_post, entropy) -> None:
        n = len(energy_pre)
        cols = self.heads
        cols["module"] += [module] * n
        cols["block"] += [top_block(module)] * n
        cols["kind"] += [kind] * n
        cols["head"] += list(range(n))
        cols["heads"] += [n] * n
        cols["seed"] += [self.seed] * n
        cols["step"] += [self.step] * n
        cols["timestep"] += [self.timestep] * n
        cols["energy_pre"] += [float(x) for x in energy_pre]
        cols["energy_post"] += [float(x) for x in energy_post]
        cols["entropy"] += [float(x) for x in entropy]

    def add_block(self, block: str, block_type: str, rel_update: float, cos_prev: float) -> None:
        cols = self.blocks
        for key, value in (("block", block), ("block_type", block_type), ("seed", self.seed), ("step", self.step),
                           ("timestep", self.timestep), ("rel_update", rel_update), ("cos_prev", cos_prev)):
            cols[key].append(value)
