"""Tiny transformer denoisers (the configs of ``fragcli.models.tiny_archs``, no pipeline, no tokenizer) and seeded
inputs for them: Flux (dual- and single-stream), SD3 (joint blocks), PixArt (self/cross blocks)."""

from __future__ import annotations

import torch

HIDDEN = 32


def flux(layers: int = 2, single: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=layers, num_single_layers=single,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()


def sd3(layers: int = 2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=HIDDEN, caption_projection_dim=HIDDEN, pooled_projection_dim=2 * HIDDEN,
        out_channels=4).eval()


def pixart(layers: int = 2):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=layers, patch_size=2, attention_head_dim=8, num_attention_heads=4,
        caption_channels=HIDDEN, in_channels=4, cross_attention_dim=HIDDEN, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6).eval()


BUILD = {"flux": flux, "sd3": sd3, "pixart": pixart}


def inputs(kind: str, t: float = 500.0, batch: int = 2, seed: int = 0, sample=None) -> dict:
    """Keyword inputs of one denoiser call at timestep ``t`` (seeded; ``sample`` replaces the latent)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flux":
        tokens, text = 16, 6  # a 4x4 latent grid of packed tokens
        x = torch.randn(batch, tokens, 16, generator=g) if sample is None else sample
        img_ids = torch.stack(torch.meshgrid(torch.zeros(4), torch.arange(4.0), indexing="ij"), -1)
        img_ids = torch.cat([torch.zeros(4, 4, 1), img_ids], -1)[..., :3].reshape(-1, 3)
        img_ids[:, 1] = torch.arange(tokens) // 4
        img_ids[:, 2] = torch.arange(tokens) % 4
        return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, text, HIDDEN, generator=g),
                "pooled_projections": torch.randn(batch, HIDDEN, generator=g),
                "timestep": torch.full((batch,), t / 1000), "guidance": torch.full((batch,), 3.5),
                "img_ids": img_ids, "txt_ids": torch.zeros(text, 3), "return_dict": False}
    if kind == "sd3":
        x = torch.randn(batch, 4, 8, 8, generator=g) if sample is None else sample
        return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, 6, HIDDEN, generator=g),
                "pooled_projections": torch.randn(batch, 2 * HIDDEN, generator=g),
                "timestep": torch.full((batch,), t), "return_dict": False}
    x = torch.randn(batch, 4, 8, 8, generator=g) if sample is None else sample
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, 6, HIDDEN, generator=g),
            "timestep": torch.full((batch,), t),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}


def run(model, kind: str, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind, **kw))[0]
