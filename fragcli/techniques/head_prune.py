"""Attention-head pruning of diffusers ``Attention`` modules: physical (smaller weights) or a reversible mask.

Physical pruning keeps the rows of to_q/to_k/to_v (and add_q/add_k/add_v_proj) and the input columns of
``to_out[0]`` (and ``to_add_out``) that belong to the kept heads, then sets ``heads``, ``inner_dim``,
``inner_kv_dim`` and ``sliceable_head_dim``. The result equals the original with those heads zeroed before
``to_out`` (the mask), which is how the tests prove it.
"""

from __future__ import annotations

from pydantic import Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.techniques.base import Applied, Plan, Technique, TechniqueConfig, TechniqueSummary

MASK_PATCH = "frag.head_mask"
ROW_PROJ = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
COL_PROJ = ("to_add_out",)


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


def _index(keep: list[int], width: int, device):
    import torch

    return torch.cat([torch.arange(h * width, (h + 1) * width, device=device) for h in keep])


def _slice_linear(lin, idx, dim: int) -> None:
    import torch

    with torch.no_grad():
        lin.weight = torch.nn.Parameter(lin.weight.index_select(dim, idx).clone(), requires_grad=False)
        if dim == 0 and lin.bias is not None:
            lin.bias = torch.nn.Parameter(lin.bias.index_select(0, idx).clone(), requires_grad=False)
    if dim == 0:
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
        import torch

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


def _heads_removed(config) -> dict[str, list[int]]:
    return {m: sorted(r) for m, r in config.attention_heads_removed.items() if r}


def check_heads(denoiser, removed: dict[str, list[int]]) -> dict:
    """Every named module exists and keeps at least one head; returns the modules by name. Changes nothing."""
    modules = attention_modules(denoiser)
    for name, remove in removed.items():
        if name not in modules:
            raise FragError(f"module {name} is not a prunable attention module of this model",
                            "the selection belongs to another model; re-run frag extract")
        _check(name, modules[name], remove)
    return modules


def prune_heads(denoiser, removed: dict[str, list[int]]) -> list[str]:
    """Physically remove heads (plan first: every module is checked before any is changed)."""
    modules = check_heads(denoiser, removed)
    for name, remove in removed.items():
        prune_attention_heads(name, modules[name], remove)
    return [n for n, r in removed.items() if r]


def heads_per_module(denoiser) -> dict[str, int]:
    return {name: m.heads for name, m in attention_modules(denoiser).items()}


class HeadPruneConfig(TechniqueConfig):
    """Attention heads to remove, per module (names relative to the denoiser), and how they were chosen."""

    attention_heads_removed: dict[str, list[int]] = Field(default_factory=dict,
                                                          description="module -> head indices removed")
    method: str | None = Field(None, description="score the heads were ranked by (energy | entropy | composite)")
    head_retention_ratio: float | None = Field(None, description="fraction of heads asked to be kept")
    per_module: bool = False
    safety_margin: float = 0.0
    stability_threshold: float | None = None


class HeadPrune(Technique):
    """Remove the attention heads a prompt does not use (slices q/k/v rows and to_out columns)."""

    name = "head_prune"
    version = 1
    Config = HeadPruneConfig
    options = {"head_retention": 0.7, "score": "composite", "per_module": False, "safety_margin": 0.0,
               "stability_threshold": 0.25}

    def plan(self, profile, options: dict) -> Plan | None:
        from fragcli.techniques.head_selection import SelectionParams, plan, score_heads

        if options.get("head_retention") is None:
            return None  # not asked for
        opts = {**self.options, **{k: v for k, v in options.items() if k in self.options and v is not None}}
        params = SelectionParams(**opts)
        params.check()
        selection = plan(score_heads(profile.head_columns(), params.score), params)
        config = HeadPruneConfig(
            attention_heads_removed={m: r for m, r in selection["removed"].items() if r}, method=params.score,
            head_retention_ratio=params.head_retention, per_module=params.per_module,
            safety_margin=params.safety_margin, stability_threshold=params.stability_threshold)
        return Plan(config, selection, "selection.json")

    def check(self, denoiser, config: HeadPruneConfig) -> None:
        check_heads(denoiser, _heads_removed(config))

    def apply(self, denoiser, config: HeadPruneConfig) -> Applied:
        prune_heads(denoiser, _heads_removed(config))
        return Applied(self.name)

    def rebuild(self, denoiser, config: HeadPruneConfig) -> Applied:
        return self.apply(denoiser, config)  # slicing needs no value: it works on meta tensors too

    def mask(self, denoiser, config: HeadPruneConfig) -> Patch:
        return install_head_mask(denoiser, _heads_removed(config))

    def summary(self, config: HeadPruneConfig, denoiser) -> TechniqueSummary:
        """``denoiser`` is the base (unpruned) denoiser: counts are computed as if the heads were removed."""
        removed = _heads_removed(config)
        modules = attention_modules(denoiser)
        total = sum(m.heads for m in modules.values())
        n_removed = sum(len(r) for r in removed.values())
        params = nbytes = 0
        for name, remove in removed.items():
            attn = modules.get(name)
            if attn is None:
                continue
            heads = attn.heads
            for proj in (*ROW_PROJ, "to_out.0", *COL_PROJ):
                lin = attn.get_submodule(proj) if _has(attn, proj) else None
                if lin is None:
                    continue
                cols = proj == "to_out.0" or proj in COL_PROJ
                w = lin.weight
                per_head = (w.shape[1] if cols else w.shape[0]) // heads
                cut = len(remove) * per_head * (w.shape[0] if cols else w.shape[1])
                if not cols and lin.bias is not None:
                    cut += len(remove) * per_head
                params += cut
                nbytes += cut * w.element_size()
        kept = total - n_removed
        return TechniqueSummary(
            unit="attention_heads", units_total=total, units_removed=n_removed,
            removed_fraction=n_removed / total if total else 0.0, params_removed=params, bytes_saved=nbytes,
            details={"heads_total": total, "heads_kept": kept, "head_retention_ratio": kept / total if total else 1.0,
                     "attention_heads_removed": removed, "method": config.method,
                     "head_retention_asked": config.head_retention_ratio})

    def migrate_v1(self, manifest: dict) -> dict | None:
        """frag 0.1 manifests hold head pruning in ``pruning`` (and ``structure``)."""
        p = manifest.get("pruning")
        if not isinstance(p, dict):
            raise FragError("v1 manifest lacks its pruning block", "rebuild the fragment with frag extract")
        removed = p.get("heads_removed") or {}
        config = HeadPruneConfig(attention_heads_removed=removed, method=p.get("score"),
                                 head_retention_ratio=p.get("head_retention"), per_module=p.get("per_module", False),
                                 safety_margin=p.get("safety_margin", 0.0),
                                 stability_threshold=p.get("stability_threshold"))
        total, kept = p.get("heads_total"), p.get("heads_kept")
        n_removed = sum(len(r) for r in removed.values())
        params = manifest.get("params") or {}
        wb = manifest.get("weight_bytes") or {}
        summary = TechniqueSummary(
            unit="attention_heads", units_total=total, units_removed=n_removed,
            removed_fraction=n_removed / total if total else None, params_removed=params.get("removed", 0),
            bytes_saved=(wb.get("before", 0) - wb.get("after", 0)),
            details={"heads_total": total, "heads_kept": kept, "head_retention_ratio": p.get("achieved_retention"),
                     "attention_heads_removed": removed, "method": p.get("score"),
                     "head_retention_asked": p.get("head_retention")})
        return {"name": self.name, "version": 1, "config": config.to_dict(), "summary": summary.model_dump(mode="json")}


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
