"""Techniques: each one file (a versioned config + a ``Technique``), registered here once.

Nothing outside this package knows a technique by name: frag iterates ``REGISTRY`` and calls the protocol of
``fragcli.techniques.base`` (plan / check / apply / rebuild / mask / collectors / summary), and
``fragcli.techniques.stack`` applies an ordered list of configs plan-then-apply.

>>> from fragcli.techniques import REGISTRY
>>> technique = REGISTRY.get("head_prune")
>>> config = technique.Config(attention_heads_removed={"mid_block.attentions.0.transformer_blocks.0.attn1": [3]})
>>> technique.apply(unet, config)
"""

from __future__ import annotations

from fragcli.techniques.base import (
    Applied,
    Collector,
    Plan,
    Registry,
    Technique,
    TechniqueConfig,
    TechniqueSummary,
)
from fragcli.techniques.block_cache import BlockCache
from fragcli.techniques.cross_attn_gate import CrossAttnGate
from fragcli.techniques.ffn_prune import FfnPrune
from fragcli.techniques.guidance_cut import GuidanceCut
from fragcli.techniques.head_prune import HeadPrune, HeadPruneConfig
from fragcli.techniques.low_rank import LowRank
from fragcli.techniques.prompt_embeds import PromptEmbeds
from fragcli.techniques.quantize import Quantize
from fragcli.techniques.step_cache import StepCache

REGISTRY = Registry()  # registration order is stack order: prune, then factor, then quantize what is retained
REGISTRY.register(HeadPrune())
REGISTRY.register(FfnPrune())
REGISTRY.register(LowRank())
REGISTRY.register(Quantize())
REGISTRY.register(PromptEmbeds())
REGISTRY.register(GuidanceCut())  # before the step cache: it must see the halved batch
REGISTRY.register(CrossAttnGate())
REGISTRY.register(StepCache())
REGISTRY.register(BlockCache())  # transformer denoisers' counterpart of the step cache


def register(technique: Technique) -> Technique:
    """Add a technique (one call per technique file); its name must be new."""
    return REGISTRY.register(technique)


def apply_technique(denoiser, config: TechniqueConfig) -> Applied:
    """Apply one config with the technique registered for its type (checked first; a refusal changes nothing)."""
    technique = REGISTRY.for_config(config)
    technique.check(denoiser, config)
    return technique.apply(denoiser, config)


__all__ = ["REGISTRY", "Applied", "Collector", "HeadPrune", "HeadPruneConfig", "Plan", "Registry", "Technique",
           "TechniqueConfig", "TechniqueSummary", "apply_technique", "register"]
