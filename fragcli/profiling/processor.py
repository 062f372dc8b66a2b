"""The profiling attention processor: `AttnProcessor2_0`'s computation, plus per-head statistics.

Per head h (output of attention before ``to_out``: x_h, tokens x head_dim) it records
- ``energy_pre``  = RMS(x_h) over batch x tokens x head_dim;
- ``energy_post`` = RMS(x_h W_h^T) over batch x tokens x out_dim, W_h the head's input columns of ``to_out[0]``
  (computed exactly as sqrt(mean(x_h G_h x_h^T)/out_dim) with G_h = W_h^T W_h, cheaper than the product);
- ``entropy``     = attention entropy / log(keys), averaged over sampled (or all) query rows and the batch.
Modules whose processor is not the default one (joint attention of SD3 / Flux, kind ``joint``; Flux's single-stream
attention) keep their own processor: energies come from a pre-hook on ``to_out[0]`` (for joint attention, the image
tokens' output), or, for Flux's single-stream blocks (no ``to_out``: the block's ``proj_out`` reads the concatenation
[attention, MLP]), from the attention's output and the attention's column slice of ``proj_out``; the entropy comes
from the query and key rows the processor hands to ``torch.nn.functional.scaled_dot_product_attention`` (intercepted
while that module runs, sampled rows as above; the processor's computation is untouched, none of it is copied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.profiling.recorder import Recorder

PATCH = "frag.profile"


def head_gram(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """G_h = W_h^T W_h per head of ``to_out[0]``'s weight: (heads, head_dim, head_dim)."""
    w = weight.float().reshape(weight.shape[0], heads, weight.shape[1] // heads)  # (out, heads, hd)
    return torch.einsum("ohd,ohe->hde", w, w)


def head_energies(x: torch.Tensor, heads: int, weight: torch.Tensor,
                  gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (batch, tokens, heads*head_dim) before ``to_out``; returns (energy_pre, energy_post) per head
    (``gram``: ``head_gram(weight, heads)``, when the caller keeps it between calls)."""
    b, s, inner = x.shape
    hd = inner // heads
    xh = x.float().reshape(b * s, heads, hd)
    pre = xh.pow(2).mean(dim=(0, 2)).sqrt()
    gram = head_gram(weight, heads) if gram is None else gram
    xt = xh.transpose(0, 1)  # (heads, n, hd)
    quad = (torch.bmm(xt, gram) * xt).sum(dim=(1, 2))
    post = (quad.clamp_min(0) / (b * s * weight.shape[0])).sqrt()
    return pre, post


def head_entropy(query, key, mask, sample_rows: int | None) -> torch.Tensor:
    """Normalised attention entropy per head. query/key: (batch, heads, tokens, head_dim); mask additive or bool."""
    n_q, n_k = query.shape[2], key.shape[2]
    if n_k <= 1:
        return torch.zeros(query.shape[1])
    if sample_rows is not None and n_q > sample_rows:
        idx = torch.linspace(0, n_q - 1, sample_rows, device=query.device).round().long()
        query = query[:, :, idx]
        if mask is not None and mask.shape[-2] == n_q:
            mask = mask[..., idx, :]
    scale = 1.0 / math.sqrt(query.shape[-1])
    total = torch.zeros(query.shape[1], device=query.device, dtype=torch.float32)
    rows = 0
    for start in range(0, query.shape[2], 1024):
        q = query[:, :, start : start + 1024].float()
        logits = q @ key.float().transpose(-1, -2) * scale
        if mask is not None:
            m = mask[..., start : start + 1024, :] if mask.shape[-2] == query.shape[2] else mask
            if m.dtype == torch.bool:
                logits = logits.masked_fill(~m, float("-inf"))
            else:
                logits = logits + m.float()
        p = torch.softmax(logits, dim=-1)
        ent = -torch.special.xlogy(p, p).sum(-1)  # (b, h, rows); 0 log 0 = 0 for masked keys
        total += ent.sum(dim=(0, 2))
        rows += ent.shape[0] * ent.shape[2]
    return (total / rows / math.log(n_k)).cpu()


class ProfilingAttnProcessor:
    """Computes exactly what ``AttnProcessor2_0`` computes; on profiled steps also records per-head statistics."""

    def __init__(self, name: str, recorder: Recorder, fallback):
        self.name, self.recorder, self.fallback = name, recorder, fallback
        self._gram: tuple[tuple, torch.Tensor] | None = None  # (the weight's identity and version, its gram)

    def gram(self, attn) -> torch.Tensor:
        """``to_out[0]``'s per-head gram, computed once per weight (recomputed when the weight changes)."""
        w = attn.to_out[0].weight
        key = (w.data_ptr(), w._version, tuple(w.shape), attn.heads)
        if self._gram is None or self._gram[0] != key:
            self._gram = (key, head_gram(w.detach(), attn.heads))
        return self._gram[1]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.recorder.active:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        kind = "self" if encoder_hidden_states is None else "cross"
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        with torch.no_grad():
            pre, post = head_energies(hidden_states, attn.heads, attn.to_out[0].weight, self.gram(attn))
            ent = head_entropy(query, key, attention_mask, self.recorder.sample_rows)
            self.recorder.add_heads(self.name, kind, pre.tolist(), post.tolist(), ent.tolist())

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _mirrored(processor) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0)


def _energy_hook(name: str, attn, recorder: Recorder, captured: dict):
    """For processors frag does not mirror: energies from the input of ``to_out[0]``, entropy from the intercepted
    attention call (NaN when the processor does not call torch's SDPA)."""

    def hook(module, args):
        if recorder.active:
            x = args[0]
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            pre, post = head_energies(x.detach(), attn.heads, module.weight)
            _record(name, attn, recorder, captured, pre, post)

    return hook


def _record(name, attn, recorder: Recorder, captured: dict, pre, post, kind: str | None = None) -> None:
    ent = captured.pop(name, None)
    if ent is None or len(ent) != attn.heads:
        ent = [float("nan")] * attn.heads
    recorder.add_heads(name, kind or attention_kind(attn), pre.tolist(), post.tolist(), list(ent))


def _single_stream_hook(name: str, attn, proj_out, recorder: Recorder, captured: dict):
    """Flux single-stream attention (no ``to_out``): a forward hook on the attention module; its output is the
    attention part of ``proj_out``'s input, whose weight columns ``[:heads * head_dim]`` are the heads' output."""

    def hook(module, args, output):
        if recorder.active:
            x = output[0] if isinstance(output, tuple) else output
            x = x.reshape(x.shape[0], -1, x.shape[-1]).detach()
            pre, post = head_energies(x, attn.heads, proj_out.weight[:, : x.shape[-1]].detach())
            _record(name, attn, recorder, captured, pre, post, "joint")  # text and image tokens in one sequence

    return hook


def single_stream_blocks(denoiser) -> dict[str, tuple]:
    """Blocks whose attention has no ``to_out`` and whose ``proj_out`` reads [attention, MLP] (Flux's single-stream
    blocks): attention module name -> (block, attention)."""
    out = {}
    for name, block in denoiser.named_modules():
        attn, proj_out, mlp = (getattr(block, a, None) for a in ("attn", "proj_out", "proj_mlp"))
        if attn is None or proj_out is None or mlp is None or getattr(attn, "to_out", None) is not None:
            continue
        if getattr(attn, "to_q", None) is None:
            continue
        if proj_out.in_features == attn.to_q.out_features + mlp.out_features:
            out[f"{name}.attn" if name else "attn"] = (block, attn)
    return out


def _install_capture(patch: Patch, recorder: Recorder, captured: dict, watched: dict) -> None:
    """Intercept torch's SDPA while a watched attention module runs on a profiled step: the normalised entropy
    per head of the (query, key) it is called with goes to ``captured[name]``. Restored by the patch's undo."""
    current: list[str | None] = [None]
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        name = current[0]
        if name is not None and query.dim() == 4 and key.dim() == 4 and query.shape[1] == key.shape[1]:
            with torch.no_grad():
                captured[name] = head_entropy(query.detach(), key.detach(), attn_mask, recorder.sample_rows).tolist()
        return original(query, key, value, attn_mask, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    patch.undo.append(lambda: setattr(torch.nn.functional, "scaled_dot_product_attention", original))
    for name, module in watched.items():
        def pre(mod, args, name=name):
            current[0] = name if recorder.active else None

        def post(mod, args, output):
            current[0] = None

        patch.undo.append(module.register_forward_pre_hook(pre).remove)
        patch.undo.append(module.register_forward_hook(post).remove)


def attention_kind(attn) -> str:
    """``joint`` for attention over image and context tokens together (SD3's MMDiT, Flux's dual-stream blocks:
    they project the context with ``add_q_proj``), else ``cross`` or ``self``."""
    if getattr(attn, "add_q_proj", None) is not None:
        return "joint"
    return "cross" if getattr(attn, "is_cross_attention", False) else "self"


def _is_attention(module) -> bool:
    """diffusers' ``Attention`` and the newer per-model attention classes (``FluxAttention``, ...)."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers: every attention is an ``Attention``
        AttentionModuleMixin = Attention
    return isinstance(module, (Attention, AttentionModuleMixin))


def install_profiler(denoiser, recorder: Recorder) -> Patch:
    """Install the profiling processors and hooks (idempotent); ``remove_profiler`` restores the original ones."""

    def install(patch: Patch) -> None:
        procs, watched, captured = {}, {}, {}
        single = single_stream_blocks(denoiser)
        for name, module in denoiser.named_modules():
            if not _is_attention(module):
                continue
            if name in single:
                block, attn = single[name]
                hook = _single_stream_hook(name, attn, block.proj_out, recorder, captured)
                patch.undo.append(attn.register_forward_hook(hook).remove)
                watched[name] = attn
            elif getattr(module, "to_out", None) is None:
                continue
            elif _mirrored(module.processor):
                procs[name] = ProfilingAttnProcessor(name, recorder, module.processor)
            else:
                handle = module.to_out[0].register_forward_pre_hook(_energy_hook(name, module, recorder, captured))
                patch.undo.append(handle.remove)
                watched[name] = module
        if watched:
            _install_capture(patch, recorder, captured, watched)
        patch.undo.append(captured.clear)
        from fragcli.patches import swap_processors

        swap_processors(denoiser, patch, procs)

    return apply_patch(denoiser, PATCH, install, recorder)


def remove_profiler(denoiser) -> bool:
    return remove_patch(denoiser, PATCH)
