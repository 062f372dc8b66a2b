"""Small seeded random-weight pipelines of every architecture users run, built from configs offline:
``tiny-sdxl`` (UNet with text-time embedding, two CLIP encoders), ``tiny-sd3`` (MMDiT joint attention, CLIP x2 + T5),
``tiny-flux`` (dual- and single-stream blocks, distilled guidance, CLIP + T5) and ``tiny-pixart`` (PixArt-Sigma DiT,
T5). They exercise the real loading code (saved as diffusers folders, reloaded by ``from_pretrained``) and every
architecture quirk frag handles; their images are noise. The T5 tokenizer is trained offline on a seeded corpus
(``fragcli.models.tokenizer.build_t5_tokenizer``).
"""

from __future__ import annotations

HIDDEN = 32  # text hidden size of every tiny text encoder


def _clip(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=HIDDEN, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[32, 64], latent_channels=latent_channels,
                         norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64, **kw)


def _seeded(build):
    import torch

    torch.manual_seed(0)
    return build()


def build_tiny_sdxl():
    """SDXL's layout: a UNet with ``text_time`` added embeddings and linear projections, two text encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from fragcli.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    unet = _seeded(lambda: UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * HIDDEN, attention_head_dim=(2, 4), norm_num_groups=16, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=HIDDEN + 6 * 8))
    return StableDiffusionXLPipeline(
        vae=_seeded(_vae), text_encoder=_seeded(_clip), text_encoder_2=_seeded(lambda: _clip(True)), tokenizer=tok,
        tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))


def build_tiny_sd3():
    """SD3's MMDiT: joint attention over image and text tokens (the last block is context-pre-only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from fragcli.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    tok, t5tok = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = _seeded(lambda: SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=HIDDEN, caption_projection_dim=HIDDEN, pooled_projection_dim=2 * HIDDEN, out_channels=4))
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=_seeded(lambda: _vae(shift_factor=0.0609, scaling_factor=1.5035)),
        text_encoder=_seeded(lambda: _clip(True)), tokenizer=tok, text_encoder_2=_seeded(lambda: _clip(True)),
        tokenizer_2=tok, text_encoder_3=_seeded(lambda: _t5(t5tok)), tokenizer_3=t5tok,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def build_tiny_flux():
    """Flux: dual-stream blocks, single-stream blocks (attention folded into ``proj_out``), guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from fragcli.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    tok, t5tok = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True))
    return FluxPipeline(
        transformer=transformer, vae=_seeded(lambda: _vae(shift_factor=0.1159, scaling_factor=0.3611)),
        text_encoder=_seeded(_clip), tokenizer=tok, text_encoder_2=_seeded(lambda: _t5(t5tok)), tokenizer_2=t5tok,
        scheduler=FlowMatchEulerDiscreteScheduler())


def build_tiny_pixart():
    """PixArt-Sigma: a DiT with self- and cross-attention and adaLN-single, T5 text encoder."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from fragcli.models.tokenizer import build_t5_tokenizer

    t5tok = build_t5_tokenizer()
    transformer = _seeded(lambda: PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
        caption_channels=HIDDEN, in_channels=4, cross_attention_dim=HIDDEN, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6))
    return PixArtSigmaPipeline(transformer=transformer, vae=_seeded(_vae), text_encoder=_seeded(lambda: _t5(t5tok)),
                               tokenizer=t5tok, scheduler=DPMSolverMultistepScheduler())


ARCH_BUILDERS = {"tiny-sdxl": build_tiny_sdxl, "tiny-sd3": build_tiny_sd3, "tiny-flux": build_tiny_flux,
                 "tiny-pixart": build_tiny_pixart}
ARCH_DEFAULTS = {  # 64x64, 4 steps; Flux's guidance is its distilled guidance embedding (no CFG batch)
    "tiny-sdxl": {"default_steps": 4, "default_guidance": 5.0, "width": 64, "height": 64},
    "tiny-sd3": {"default_steps": 4, "default_guidance": 5.0, "width": 64, "height": 64},
    "tiny-flux": {"default_steps": 4, "default_guidance": 3.5, "width": 64, "height": 64},
    "tiny-pixart": {"default_steps": 4, "default_guidance": 4.5, "width": 64, "height": 64},
}
