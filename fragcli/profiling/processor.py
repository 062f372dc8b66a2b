"""The profiling attention processor: `AttnProcessor2_0`'s computation, plus per-head statistics.

Per head h (output of attention before ``to_out``: x_h, tokens x head_dim) it records
- ``energy_pre``  = RMS(x_h) over batch x tokens x head_dim;
- ``energy_post`` = RMS(x_h W_h^T) over batch x tokens x out_dim, W_h the head's input columns of ``to_out[0]``
  (computed exactly as sqrt(mean(x_h G_h x_h^T)/out_dim) with G_h = W_h^T W_h, cheaper than the product);
- ``entropy``     = attention entropy / log(keys), averaged over sampled (or all) query rows and the batch.
Modules whose processor is not the default one are profiled for energy only, by a hook on ``to_out[0]`` (for joint
attention, SD3 / Flux, that is the image tokens' output; kind ``joint``).
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


def _energy_hook(name: str, attn, recorder: Recorder):
    """For processors frag does not mirror: energies from the input of ``to_out[0]`` (no entropy)."""

    def hook(module, args):
        if recorder.active:
            x = args[0]
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            pre, post = head_energies(x.detach(), attn.heads, module.weight)
            kind = attention_kind(attn)
            recorder.add_heads(name, kind, pre.tolist(), post.tolist(), [float("nan")] * attn.heads)

    return hook


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
    """Install the profiling processors (idempotent); ``remove_profiler`` restores the original processors.
    Attention without ``to_out`` (Flux's single-stream blocks, whose output projection is shared with the MLP) is
    not profiled per head yet."""

    def install(patch: Patch) -> None:
        procs = {}
        for name, module in denoiser.named_modules():
            if not _is_attention(module) or getattr(module, "to_out", None) is None:
                continue
            if _mirrored(module.processor):
                procs[name] = ProfilingAttnProcessor(name, recorder, module.processor)
            else:
                handle = module.to_out[0].register_forward_pre_hook(_energy_hook(name, module, recorder))
                patch.undo.append(handle.remove)
        from fragcli.patches import swap_processors

        swap_processors(denoiser, patch, procs)

    return apply_patch(denoiser, PATCH, install, recorder)


def remove_profiler(denoiser) -> bool:
    return remove_patch(denoiser, PATCH)
