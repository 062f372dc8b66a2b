"""Attention-head pruning of diffusers ``Attention`` modules: physical (smaller weights) or a reversible mask.

Physical pruning keeps the rows of to_q/to_k/to_v (and add_q/add_k/add_v_proj) and the input columns of
``to_out[0]`` (and ``to_add_out``) that belong to the kept heads, then sets ``heads``, ``inner_dim``,
``inner_kv_dim`` and ``sliceable_head_dim``. The result equals the original with those heads zeroed before
``to_out`` (the mask), which is how the tests prove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch

MASK_PATCH = "frag.head_mask"
ROW_PROJ = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
COL_PROJ = ("to_add_out",)


@dataclass
class HeadPruneConfig:
    """Which heads to remove, per module name (relative to the denoiser); ``mode`` physical or mask."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    mode: str = "physical"


def attention_modules(denoiser) -> dict:
    """Prunable attention modules by name: diffusers ``Attention`` with ``to_out`` and one kv head per head."""
    from diffusers.models.attention_processor import Attention

    out = {}
    for name, m in denoiser.named_modules():
        if isinstance(m, Attention) and hasattr(m, "to_out") and getattr(m, "to_q", None) is not None:
            if getattr(m, "kv_heads", None) not in (None, m.heads):
                continue  # grouped kv heads: not supported yet
            if type(getattr(m, "norm_q", None)).__name__ == "LayerNorm" and m.norm_q.normalized_shape[0] != m.inner_dim // m.heads:
                continue  # norms across heads would need slicing too
            out[name] = m
    return out


def _check(name: str, attn, remove: list[int]) -> list[int]:
    bad = [h for h in remove if not 0 <= h < attn.heads]
    if bad:
        raise FragError(f"module {name} has {attn.heads} heads; cannot remove head(s) {bad}",
                        "rebuild the selection with frag extract")
    keep = [h for h in range(attn.heads) if h not in set(remove)]
    if not keep:
        raise FragError(f"the selection removes every head of {name}", "keep at least one head per module")
    return keep


def _index(keep: list[int], width: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(h * width, (h + 1) * width, device=device) for h in keep])


@torch.no_grad()
def _slice_linear(lin: torch.nn.Linear, idx: torch.Tensor, dim: int) -> None:
    lin.weight = torch.nn.Parameter(lin.weight.index_select(dim, idx).clone(), requires_grad=False)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(lin.bias.index_select(0, idx).clone(), requires_grad=False)
        lin.out_features = idx.numel()
    else:
        lin.in_features = idx.numel()


def prune_attention_heads(name: str, attn, remove: list[int]) -> None:
    """Physically remove heads ``remove`` from one ``Attention`` module, in place."""
    if not remove:
        return
    keep = _check(name, attn, remove)
    heads = attn.heads
    dev = attn.to_q.weight.device
    q_width = attn.to_q.out_features // heads
    kv_width = attn.to_k.out_features // heads
    for proj in ROW_PROJ:
        lin = getattr(attn, proj, None)
        if lin is not None:
            width = q_width if proj in ("to_q", "add_q_proj") else kv_width
            _slice_linear(lin, _index(keep, width, dev), 0)
    _slice_linear(attn.to_out[0], _index(keep, q_width, dev), 1)
    for proj in COL_PROJ:
        lin = getattr(attn, proj, None)
        if lin is not None:
            _slice_linear(lin, _index(keep, q_width, dev), 1)
    attn.heads = len(keep)
    attn.inner_dim = len(keep) * q_width
    attn.inner_kv_dim = len(keep) * kv_width
    if hasattr(attn, "sliceable_head_dim"):
        attn.sliceable_head_dim = len(keep)


def head_mask_hook(heads: int, remove: list[int]):
    """A pre-hook on ``to_out[0]`` (and ``to_add_out``) that zeroes the removed heads' channels."""
    remove = sorted(set(remove))

    def hook(module, args):
        x = args[0]
        width = x.shape[-1] // heads
        mask = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        for h in remove:
            mask[h * width : (h + 1) * width] = 0
        return (x * mask,) + tuple(args[1:])

    return hook


def install_head_mask(denoiser, removed: dict[str, list[int]]) -> Patch:
    """Logical pruning: a named, reversible, idempotent mask; the weights are untouched."""
    modules = attention_modules(denoiser)

    def install(patch: Patch) -> None:
        for name, remove in removed.items():
            if not remove:
                continue
            attn = modules.get(name)
            if attn is None:
                raise FragError(f"module {name} is not a prunable attention module of this model",
                                "the selection belongs to another model; re-run frag extract")
            _check(name, attn, remove)
            for target in (attn.to_out[0], getattr(attn, "to_add_out", None)):
                if target is not None:
                    patch.undo.append(target.register_forward_pre_hook(head_mask_hook(attn.heads, remove)).remove)

    return apply_patch(denoiser, MASK_PATCH, install, removed)


def remove_head_mask(denoiser) -> bool:
    return remove_patch(denoiser, MASK_PATCH)


def apply_head_prune(denoiser, config: HeadPruneConfig):
    """Apply ``config``: physical pruning (returns the pruned module names) or the reversible mask (returns the patch)."""
    if config.mode == "mask":
        return install_head_mask(denoiser, config.removed)
    if config.mode != "physical":
        raise ValueError(f"unknown head-prune mode {config.mode!r}")
    modules = attention_modules(denoiser)
    for name in config.removed:
        if name not in modules:
            raise FragError(f"module {name} is not a prunable attention module of this model",
                            "the selection belongs to another model; re-run frag extract")
    for name, remove in config.removed.items():
        _check(name, modules[name], remove)  # validate everything before changing anything
    for name, remove in config.removed.items():
        prune_attention_heads(name, modules[name], remove)
    return [n for n, r in config.removed.items() if r]


def heads_per_module(denoiser) -> dict[str, int]:
    return {name: m.heads for name, m in attention_modules(denoiser).items()}


def pruned_tensor_names(denoiser, modules: list[str]) -> list[str]:
    """State-dict keys of the tensors that physical pruning changes, for ``modules``."""
    names = []
    for mod in modules:
        names += [f"{mod}.{proj}.{suffix}" for proj in ROW_PROJ for suffix in ("weight", "bias")]
        names += [f"{mod}.to_out.0.weight"] + [f"{mod}.{proj}.weight" for proj in COL_PROJ]
    state = denoiser.state_dict()
    return sorted(n for n in names if n in state)
