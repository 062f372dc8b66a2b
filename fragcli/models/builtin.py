"""Built-in models: `tiny` (configs + seeded random weights, cached on disk), `tiny-sdxl`, `tiny-sd3`, `tiny-flux`,
`tiny-pixart` (the same for the other architectures, ``tiny_archs``) and `random:sd15` (the real SD 1.5 architecture
with seeded random weights, built in memory, for speed and memory measurements only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fragcli.errors import FragError
from fragcli.paths import atomic_write_json, model_cache_dir, staged_dir

SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    defaults: dict
    on_disk: bool  # generated once and cached under the model cache, or built in memory each time


BUILTINS = {
    "tiny": Builtin(
        "tiny", "tiny SD-architecture pipeline, seeded random weights (mechanical tests)",
        {"default_steps": 10, "default_guidance": 7.5, "width": 64, "height": 64}, True,
    ),
    "random:sd15": Builtin(
        "random:sd15", "Stable Diffusion 1.5 architecture, seeded random weights (speed/memory only)",
        {"default_steps": 20, "default_guidance": 7.5, "width": 512, "height": 512}, False,
    ),
}


def _text_encoder(hidden: int, inter: int, layers: int, heads: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=hidden,
    )
    return CLIPTextModel(cfg)


def build_tiny():
    """The `tiny` pipeline: UNet (32, 64) with cross-attention in every block, 8 heads per module."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from fragcli.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=[32, 64], latent_channels=4, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = _text_encoder(32, 37, 2, 4)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random_sd15():
    """Stable Diffusion 1.5's architecture (UNet 859.5M parameters) with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from fragcli.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512,
    )
    torch.manual_seed(0)
    text_encoder = _text_encoder(768, 3072, 12, 12)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


BUILDERS = {"tiny": build_tiny, "random:sd15": build_random_sd15}


def _register_archs() -> None:
    from fragcli.models.tiny_archs import ARCH_BUILDERS, ARCH_DEFAULTS

    for name, builder in ARCH_BUILDERS.items():
        BUILTINS[name] = Builtin(name, f"{builder.__doc__.splitlines()[0]} (tiny, seeded random weights)",
                                 ARCH_DEFAULTS[name], True)
        BUILDERS[name] = builder


_register_archs()


def builtin_folder(name: str) -> Path:
    """The on-disk diffusers folder of an on-disk built-in, generating it once (atomically) if needed."""
    folder = model_cache_dir() / name.replace(":", "-")
    if (folder / "model_index.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FragError(f"cannot build the built-in model {name} in {folder.parent} ({exc.strerror})",
                        "set FRAG_MODEL_CACHE (or FRAG_HOME) to a writable folder") from None
    with staged_dir(folder) as tmp:
        pipe = BUILDERS[name]()
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "frag.json", {"name": name, **BUILTINS[name].defaults})
    return folder


def read_frag_json(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "frag.json").read_text())
    except (OSError, ValueError):
        return {}
