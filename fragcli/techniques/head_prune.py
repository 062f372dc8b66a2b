"""Attention-head pruning of diffusers ``Attention`` modules and Flux's ``FluxAttention``: physical (smaller
weights) or a reversible mask.

Physical pruning keeps the rows of to_q/to_k/to_v (and add_q/add_k/add_v_proj) and the input columns of
``to_out[0]`` (and ``to_add_out``) that belong to the kept heads, then sets ``heads``, ``inner_dim``,
``inner_kv_dim`` and ``sliceable_head_dim``. Flux's single-stream attention has no ``to_out``: its block's
``proj_out`` reads the concatenation [attention, MLP], so the kept heads' columns of the attention slice
(the first ``heads * head_dim`` columns) are kept with every MLP column. The result equals the original with those
heads zeroed before the output projection (the mask), which is how the tests prove it.
"""

from __future__ import annotations

from pydantic import Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.techniques.base import Applied, Plan, Technique, TechniqueConfig, TechniqueSummary

MASK_PATCH = "frag.head_mask"
ROW_PROJ = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
COL_PROJ = ("to_add_out",)


def _attention_classes() -> tuple:
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers: every attention is an ``Attention``
        return (Attention,)
    return (Attention, AttentionModuleMixin)


def _why_not(attn, single: bool) -> str | None:
    """Why frag cannot prune this attention module's heads (None: it can)."""
    if getattr(attn, "to_q", None) is None or not isinstance(getattr(attn, "heads", None), int):
        return f"{type(attn).__name__} has no to_q projection or head count"
    if getattr(attn, "to_out", None) is None and not single:
        return f"{type(attn).__name__} has no to_out and is not a single-stream block's attention"
    if getattr(attn, "kv_heads", None) not in (None, attn.heads):
        return "grouped key/value heads are not supported"
    if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
        return "its q/k/v projections are fused (unfuse them first)"
    hd = attn.to_q.out_features // attn.heads if attn.heads else 0
    for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        n = getattr(attn, norm, None)
        shape = getattr(n, "normalized_shape", None)
        if shape is not None and len(shape) and shape[0] != hd:
            return f"{norm} normalises across heads ({shape[0]} channels, a head has {hd})"
    import torch

    if not all(isinstance(getattr(attn, p, None), (torch.nn.Linear, type(None))) for p in ROW_PROJ):
        return "its projections are not plain Linear layers (already quantized or factored?)"
    return None


def _candidates(denoiser) -> tuple[dict, dict, dict]:
    """(prunable modules by name, {name: why not} for the other attention modules, single-stream blocks)."""
    from fragcli.profiling.processor import single_stream_blocks

    single = single_stream_blocks(denoiser)
    classes = _attention_classes()
    ok, why = {}, {}
    for name, m in denoiser.named_modules():
        if isinstance(m, classes):
            reason = _why_not(m, name in single)
            if reason is None:
                ok[name] = m
            else:
                why[name] = reason
    return ok, why, single


def attention_modules(denoiser) -> dict:
    """Prunable attention modules by name: diffusers ``Attention`` / ``FluxAttention`` with an output projection
    (``to_out``, or the single-stream block's ``proj_out``) and one kv head per head."""
    return _candidates(denoiser)[0]


def out_projections(denoiser_or_single, name: str, attn) -> list:
    """The Linear layers whose input columns ``[h * head_dim, (h + 1) * head_dim)`` carry head ``h``'s output:
    ``to_out[0]`` and ``to_add_out``, or the single-stream block's ``proj_out`` (its attention slice comes first)."""
    single = denoiser_or_single if isinstance(denoiser_or_single, dict) else None
    if single is None:
        from fragcli.profiling.processor import single_stream_blocks

        single = single_stream_blocks(denoiser_or_single)
    if name in single:
        return [single[name][0].proj_out]
    to_out = getattr(attn, "to_out", None)
    return [lin for lin in (to_out[0] if to_out is not None else None, getattr(attn, "to_add_out", None))
            if lin is not None]


def _refusal(name: str, why: dict) -> FragError:
    if name in why:
        return FragError(f"the heads of {name} cannot be pruned: {why[name]}", "drop it from the selection")
    return FragError(f"module {name} is not an attention module of this model",
                     "the selection belongs to another model; re-run frag extract")


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


def prune_attention_heads(name: str, attn, remove: list[int], outs: list | None = None) -> None:
    """Physically remove heads ``remove`` from one attention module, in place (``outs``: its output projections,
    ``out_projections``; default ``to_out[0]`` and ``to_add_out``)."""
    import torch

    if not remove:
        return
    keep = _check(name, attn, remove)
    heads = attn.heads
    dev = attn.to_q.weight.device
    q_width = attn.to_q.out_features // heads
    kv_width = attn.to_k.out_features // heads
    if outs is None:
        outs = out_projections({}, name, attn)
    for proj in ROW_PROJ:
        lin = getattr(attn, proj, None)
        if lin is not None:
            width = q_width if proj in ("to_q", "add_q_proj") else kv_width
            _slice_linear(lin, _index(keep, width, dev), 0)
    inner = heads * q_width
    for lin in outs:
        d = lin.weight.device
        idx = _index(keep, q_width, d)
        if lin.in_features > inner:  # a single-stream proj_out: every MLP column stays
            idx = torch.cat([idx, torch.arange(inner, lin.in_features, device=d)])
            packed = getattr(lin, "_tp_packed_row_blocks", None)
            if isinstance(packed, list) and len(packed) == 2:
                lin._tp_packed_row_blocks = [len(keep) * q_width, packed[1]]
        _slice_linear(lin, idx, 1)
    attn.heads = len(keep)
    attn.inner_dim = len(keep) * q_width
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = len(keep) * kv_width
    if hasattr(attn, "sliceable_head_dim"):
        attn.sliceable_head_dim = len(keep)


def head_mask_hook(heads: int, remove: list[int], width: int | None = None):
    """A pre-hook on ``to_out[0]`` (and ``to_add_out``, or a single-stream ``proj_out``: pass the head ``width``,
    the attention slice comes first) that zeroes the removed heads' channels."""
    remove = sorted(set(remove))

    def hook(module, args):
        x = args[0]
        w = width or x.shape[-1] // heads
        import torch

        mask = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        for h in remove:
            mask[h * w : (h + 1) * w] = 0
        return (x * mask,) + tuple(args[1:])

    return hook


def install_head_mask(denoiser, removed: dict[str, list[int]]) -> Patch:
    """Logical pruning: a named, reversible, idempotent mask; the weights are untouched."""
    modules, why, single = _candidates(denoiser)

    def install(patch: Patch) -> None:
        for name, remove in removed.items():
            if not remove:
                continue
            attn = modules.get(name)
            if attn is None:
                raise _refusal(name, why)
            _check(name, attn, remove)
            width = attn.to_q.out_features // attn.heads
            for target in out_projections(single, name, attn):
                hook = head_mask_hook(attn.heads, remove, width)
                patch.undo.append(target.register_forward_pre_hook(hook).remove)

    return apply_patch(denoiser, MASK_PATCH, install, removed)


def remove_head_mask(denoiser) -> bool:
    return remove_patch(denoiser, MASK_PATCH)


def _heads_removed(config) -> dict[str, list[int]]:
    return {m: sorted(r) for m, r in config.attention_heads_removed.items() if r}


def check_heads(denoiser, removed: dict[str, list[int]]) -> dict:
    """Every named module exists and keeps at least one head; returns the modules by name. Changes nothing."""
    modules, why, _ = _candidates(denoiser)
    for name, remove in removed.items():
        if name not in modules:
            raise _refusal(name, why)
        _check(name, modules[name], remove)
    return modules


def prune_heads(denoiser, removed: dict[str, list[int]]) -> list[str]:
    """Physically remove heads (plan first: every module is checked before any is changed)."""
    modules = check_heads(denoiser, removed)
    from fragcli.profiling.processor import single_stream_blocks

    single = single_stream_blocks(denoiser)
    for name, remove in removed.items():
        prune_attention_heads(name, modules[name], remove, out_projections(single, name, modules[name]))
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
        modules, _, single = _candidates(denoiser)
        total = sum(m.heads for m in modules.values())
        n_removed = sum(len(r) for r in removed.values())
        params = nbytes = 0
        for name, remove in removed.items():
            attn = modules.get(name)
            if attn is None:
                continue
            heads = attn.heads
            width = attn.to_q.out_features // heads
            rows = [(getattr(attn, p, None), False) for p in ROW_PROJ]
            for lin, cols in [*rows, *((o, True) for o in out_projections(single, name, attn))]:
                if lin is None:
                    continue
                w = lin.weight
                per_head = width if cols else w.shape[0] // heads
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
