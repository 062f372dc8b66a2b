"""Compression techniques: one config dataclass + one ``apply_*`` function each, dispatched through a registry.

>>> from fragcli.techniques import apply_technique, HeadPruneConfig
>>> apply_technique(unet, HeadPruneConfig(removed={"mid_block.attentions.0.transformer_blocks.0.attn1": [3]}))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fragcli.techniques.head_prune import HeadPruneConfig, apply_head_prune


@dataclass(frozen=True)
class Technique:
    name: str
    config: type
    apply: Callable


REGISTRY: dict[type, Technique] = {}


def register(name: str, config: type, apply: Callable) -> None:
    REGISTRY[config] = Technique(name, config, apply)


def apply_technique(denoiser, config):
    """Apply ``config`` to ``denoiser`` with the technique registered for its type."""
    try:
        technique = REGISTRY[type(config)]
    except KeyError:
        raise TypeError(f"no technique registered for {type(config).__name__}") from None
    return technique.apply(denoiser, config)


register("head_prune", HeadPruneConfig, apply_head_prune)

__all__ = ["HeadPruneConfig", "apply_head_prune", "apply_technique", "register", "REGISTRY", "Technique"]
