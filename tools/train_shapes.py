#!/usr/bin/env python
"""Train the built-in "shapes" text-to-image model (v2 recipe) and its judge, reproducibly, on CPU.

Stages (``--stage``, comma-separated, or a group below):
  text          a small transformers ``CLIPModel`` (ViT image tower + text tower) trained contrastively, plus a
                multi-hot prediction of every attribute a full caption names (shapes, colours, sizes, positions,
                background) from the text tower's mean token state (``--text-attr-weight``); the text tower becomes
                the pipeline's frozen ``CLIPTextModel``
  vae           a small ``AutoencoderKL`` (64x64x3 -> 32x32x4) trained on random 32-pixel crops; records the
                judge's accuracy on held-out renders after the round trip; caches the latents of the training
                images and sets ``scaling_factor`` = 1 / latent std
  vaedec        optional: fine-tunes the VAE decoder only (encoder, hence the latent space, frozen)
  unet          a ``UNet2DConditionModel`` (cross-attention in 5 blocks, 4 heads per module, the pooled caption
                added to the time embedding) on the latents, v-prediction, cosine schedule, min-SNR-style weighting,
                object pixels weighted (``--object-weight``), 10% caption dropout (CFG), EMA; fixed step count; a learning-curve probe every ``--probe-every``
                steps
  assemble      the ``StableDiffusionPipeline`` (fp16 safetensors) -> ``tools/out/shapes/pipeline``
                (``--install``: ``fragcli/models/shapes``, the shipped model)
  eval          guidance sweep + ``tools/eval_shapes.py``; writes ``frag.json``, ``training_report.json`` (every
                setting, wall and CPU time per stage, the evaluation) and the grid (``--install``:
                ``docs/shapes_grid.png``)
  judge         an independent open_clip CLIP (ModifiedResNet image tower) -> ``fragcli/models/shapes_judge``
  judge_refine  continues the judge (600 more steps on fresh scenes, lr 5e-4)

Groups: ``all`` = text,vae,unet,assemble,eval (``make train-shapes``: one process, 2 threads, fixed seeds and
steps); ``pipeline`` = text,vae,unet; ``finish`` = assemble,eval; ``judges`` = judge,judge_refine
(``make train-judge``: the judge is the measuring instrument and is not retrained with the model).

    make train-shapes                                              # -> tools/out/shapes/pipeline + its report
    python tools/train_shapes.py --stage finish --install         # replace the shipped model with it

Intermediate files live in ``tools/out/shapes`` (git-ignored); every stage writes ``stage-<name>.json`` there.

Interruptions: the training stages (text, vae, vaedec, unet) write a checkpoint every ``--ckpt-every`` steps
(safetensors: weights, EMA, optimizer, torch generator states; the Python RNG states, losses and CPU time in its
metadata; ``tools/train_ckpt.py``), and the eval keeps each finished measurement. Rerunning the same command resumes
from there, skips stages already finished with the same settings, and ends with the same weights as an uninterrupted
run (``tests/test_train_resume.py``); a checkpoint made with other settings is refused (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from train_ckpt import Checkpoint, fingerprint  # noqa: E402

from fragcli.shapes import world  # noqa: E402

SHIPPED_DIR = ROOT / "fragcli" / "models" / "shapes"
PIPE_DIR = SHIPPED_DIR  # where assemble/eval write: tools/out/shapes/pipeline unless --install (set in main)
JUDGE_DIR = ROOT / "fragcli" / "models" / "shapes_judge"
WORK = ROOT / "tools" / "out" / "shapes"

# ---- architecture and schedule (the defaults are the shipped model) -----------------------------------------
TEXT_HIDDEN = 64
TEXT_CFG = dict(vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, hidden_act="quick_gelu")
VISION_CFG = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, hidden_act="quick_gelu")
# v2: a 32x32x4 latent (one downsampling). At 16x16 the VAE round trip kept the shape for 71% of held-out renders
# and a 16x16 box filter for 62%; at 32x32 a box filter keeps 94.5% (tools/diagnose_shapes.py).
VAE_CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
               latent_channels=4, norm_num_groups=16, sample_size=64, mid_block_add_attention=False)
UNET_CFG = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,  # diffusers: attention_head_dim = heads
                norm_num_groups=16,
                # v2: the attention-pooled text states are also added to the time embedding (diffusers'
                # TextTimeEmbedding), so every ResNet block is conditioned on the caption, not only the attention
                addition_embed_type="text", addition_embed_type_num_heads=4)
SCHED_CFG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
P_SINGLE = 0.75  # share of one-shape scenes in the training set (the rest have two shapes)
JUDGE_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},  # ModifiedResNet
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}

console = Console(stderr=True)
_LOG = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    console.print(line, markup=False, highlight=False)
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False, refresh_per_second=2)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def write_stage(name: str, info: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = WORK / f"stage-{name}.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, WORK / f"stage-{name}.json")


def read_stage(name: str) -> dict | None:
    return read_stage_at(WORK, name)


def read_stage_at(work: Path, name: str) -> dict | None:
    p = Path(work) / f"stage-{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ---- resumable stages --------------------------------------------------------------------------------------------
# The settings that decide each stage's result, and the stages it builds on: a stage's fingerprint hashes both, so a
# checkpoint or a finished stage is reused only by a run that would have produced the same thing.
STAGE_KEYS = {
    "text": ("seed", "n_images", "text_steps", "text_batch", "text_lr", "text_attr_weight"),
    "vae": ("seed", "n_images", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_kl"),
    "vaedec": ("seed", "n_images", "vae_batch", "vaedec_steps", "vaedec_lr", "vaedec_noise", "vaedec_max_minutes"),
    "unet": ("seed", "n_images", "unet_steps", "unet_batch", "unet_lr", "text_joint_lr_scale", "ema", "min_snr",
             "cfg_dropout", "object_weight", "probe_every", "probe_prompts", "probe_guidance"),
    "eval": ("guidance_sweep", "sweep_prompts", "eval_zero_shot", "eval_prompts", "eval_families"),
}
STAGE_DEPS = {"vaedec": ("vae",), "unet": ("text", "vae"), "eval": ("unet",)}
RESUMABLE = ("text", "vae", "vaedec", "unet")  # loop stages: checkpointed, skipped once finished
_STAGE_CPU0 = 0.0  # process_time() when the current stage (this attempt) started


class SimulatedKill(BaseException):
    """Raised by ``--interrupt-after STAGE:STEP`` (tests): the run stops as a kill would, between checkpoints."""


def stage_fingerprint(name: str, args) -> str:
    settings = vars(args)
    deps = [stage_fingerprint(d, args) for d in STAGE_DEPS.get(name, ())]
    return fingerprint({**{k: settings[k] for k in STAGE_KEYS[name]}, "_deps": deps}, [*STAGE_KEYS[name], "_deps"])


def stage_checkpoint(name: str, args) -> Checkpoint:
    return Checkpoint(WORK / f"{name}_ckpt.safetensors", stage_fingerprint(name, args))


def cpu_so_far(before: float) -> float:
    return before + time.process_time() - _STAGE_CPU0


def maybe_interrupt(args, name: str, steps_done: int) -> None:
    if args.interrupt_after == f"{name}:{steps_done}":
        log(f"simulated kill after {name} step {steps_done}")
        raise SimulatedKill(args.interrupt_after)


def resume(ck: Checkpoint, name: str, modules: dict, **rngs) -> tuple[int, list, float, float, dict]:
    """Restore a stage from its checkpoint: (first step, losses, wall and CPU seconds so far, the rest of its extra)."""
    state = ck.load()
    if state is None:
        return 0, [], 0.0, 0.0, {}
    Checkpoint.restore(state, modules, **rngs)
    extra = state["extra"]
    log(f"{name}: resumed at step {state['step']}")
    return state["step"], extra["losses"], extra["seconds"], extra["cpu_seconds"], extra


def loop_checkpoint(args, name: str, steps_done: int, total: int) -> bool:
    return steps_done % args.ckpt_every == 0 and steps_done < total


# ---- data -------------------------------------------------------------------------------------------------------
def make_dataset(n: int, seed: int) -> tuple[list[world.Scene], np.ndarray]:
    """``n`` train-split scenes (seeded) and their renders as uint8 (n, 64, 64, 3)."""
    t0 = time.time()
    scenes = world.sample_scenes(n, seed, split="train", p_single=P_SINGLE)
    arr = np.stack([world.render_array(s) for s in scenes])
    log(f"rendered {n} train scenes (seed {seed}) in {time.time() - t0:.1f}s")
    return scenes, arr


def to_unit(batch_u8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, texts: list[str]):
    """Symmetric InfoNCE where identical caption strings in a batch are all positives."""
    logits = scale * img @ txt.T
    ids = {}
    lab = torch.tensor([ids.setdefault(t, len(ids)) for t in texts])
    pos = (lab[:, None] == lab[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


ATTRIBUTE_VALUES = ([("shape", v) for v in world.SHAPES] + [("color", v) for v in world.COLOR_NAMES]
                    + [("size", v) for v in world.SIZES] + [("position", v) for v in world.POSITION_NAMES]
                    + [("background", v) for v in world.COLOR_NAMES])


def attribute_target(scene: world.Scene) -> torch.Tensor:
    """Multi-hot over ATTRIBUTE_VALUES: which shapes, colours, sizes, positions and background the scene has."""
    have = {("background", scene.background)}
    for o in scene.objects:
        have |= {("shape", o.shape), ("color", o.color), ("size", o.size), ("position", o.position)}
    return torch.tensor([float(a in have) for a in ATTRIBUTE_VALUES])


# ---- stage: text ----------------------------------------------------------------------------------------------
def stage_text(args) -> None:
    from transformers import CLIPConfig, CLIPModel

    from fragcli.models.tokenizer import build_clip_tokenizer

    seed_all(args.seed + 1)
    scenes, images = make_dataset(args.n_images, args.seed + 1)
    tok = build_clip_tokenizer(WORK / "tokenizer")
    cfg = CLIPConfig(text_config=TEXT_CFG, vision_config=VISION_CFG, projection_dim=64)
    model = CLIPModel(cfg).train()
    attr_head = torch.nn.Linear(TEXT_HIDDEN, len(ATTRIBUTE_VALUES))
    opt = torch.optim.AdamW(list(model.parameters()) + list(attr_head.parameters()), lr=args.text_lr,
                            weight_decay=0.05)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    r = random.Random(args.seed + 11)
    t0, ck = time.time(), stage_checkpoint("text", args)
    modules = {"model": model, "attr_head": attr_head, "opt": opt}
    start, losses, before, cpu_before, _ = resume(ck, "text", modules, pyrngs={"r": r})
    with progress() as prog:
        task = prog.add_task("text CLIP", total=args.text_steps, completed=start, info="")
        for step in range(start, args.text_steps):
            set_lr(opt, lr_at(step, args.text_steps, args.text_lr, 30))
            idx = [r.randrange(len(scenes)) for _ in range(args.text_batch)]
            full = [r.random() >= 0.25 for _ in idx]  # full wordings name every attribute; partial ones do not
            texts = [world.random_training_caption(scenes[i], r, p_partial=0.0 if f else 1.0)
                     for i, f in zip(idx, full, strict=True)]
            enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            px = (to_unit(images[idx]) * 0.5 + 0.5 - mean) / 0.5
            out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px)
            img = F.normalize(out.image_embeds, dim=-1)
            txt = F.normalize(out.text_embeds, dim=-1)
            loss = multi_positive_clip_loss(img, txt, model.logit_scale.exp().clamp(max=100), texts)
            if args.text_attr_weight:
                # v2: the contrastive loss alone taught the tower colour only: at the word that differs its token
                # states had cosine 0.91 for a shape swap, 0.98 for a position swap (its ViT hardly sees shapes), so the
                # UNet could not learn shape or position. Every attribute a full wording names (shapes, colours,
                # sizes, positions, background) is also predicted from the mean token state (multi-hot).
                sel = [k for k, f in enumerate(full) if f]
                m = enc.attention_mask[sel].unsqueeze(-1).float()
                h = (out.text_model_output.last_hidden_state[sel] * m).sum(1) / m.sum(1)
                target = torch.stack([attribute_target(scenes[idx[k]]) for k in sel])
                loss = loss + args.text_attr_weight * F.binary_cross_entropy_with_logits(attr_head(h), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == args.text_steps - 1:
                avg = float(np.mean(losses[-20:]))
                prog.update(task, completed=step + 1, info=f"loss {avg:.3f}")
                if step % 50 == 0 or step == args.text_steps - 1:
                    log(f"text step {step} loss {avg:.4f}")
            if loop_checkpoint(args, "text", step + 1, args.text_steps):
                ck.save(step + 1, modules, pyrngs={"r": r},
                        extra={"losses": losses, "seconds": before + time.time() - t0, "cpu_seconds": cpu_so_far(cpu_before)})
            maybe_interrupt(args, "text", step + 1)
    elapsed = before + time.time() - t0
    out_dir = WORK / "text_clip"
    model.save_pretrained(out_dir, safe_serialization=True)
    import diagnose_shapes

    separation = (diagnose_shapes.text_separation(load_text_encoder(), tok, world.heldout_single_scenes(50, seed=1))
                  if not args.skip_diagnostics else None)
    log(f"text token separation: {separation}")
    write_stage("text", {"steps": args.text_steps, "batch": args.text_batch, "lr": args.text_lr, "seconds": elapsed,
                         "resumed_at_step": start or None, "resumed_cpu_seconds": cpu_before, "resumed_seconds": before,
                         "attribute_loss_weight": args.text_attr_weight, "token_separation": separation,
                         "loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-20:])),
                         "loss_curve": [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)],
                         "params_text": sum(p.numel() for p in model.text_model.parameters()),
                         "params_total": sum(p.numel() for p in model.parameters())})
    log(f"text stage done in {elapsed:.0f}s -> {out_dir}")


def load_text_encoder():
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

    clip = CLIPModel.from_pretrained(WORK / "text_clip")
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval().requires_grad_(False)


# ---- stage: vae -------------------------------------------------------------------------------------------------
def stage_vae(args) -> None:
    from diffusers import AutoencoderKL

    seed_all(args.seed + 2)
    _, images = make_dataset(args.n_images, args.seed + 1)  # the same images as the text stage
    vae = AutoencoderKL(**VAE_CFG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 21)
    t0, ck = time.time(), stage_checkpoint("vae", args)
    modules = {"vae": vae, "opt": opt}
    start, losses, before, cpu_before, _ = resume(ck, "vae", modules, generators={"g": g})
    with progress() as prog:
        task = prog.add_task("VAE", total=args.vae_steps, completed=start, info="")
        for step in range(start, args.vae_steps):
            set_lr(opt, lr_at(step, args.vae_steps, args.vae_lr, 50, floor=0.02))
            idx = torch.randint(0, len(images), (args.vae_batch,), generator=g).numpy()
            x = to_unit(images[idx])
            if args.vae_crop < world.SIZE:  # the VAE is fully convolutional: train on random crops (4x cheaper)
                i, j = torch.randint(0, world.SIZE - args.vae_crop + 1, (2,), generator=g).tolist()
                x = x[:, :, i:i + args.vae_crop, j:j + args.vae_crop]
            post = vae.encode(x).latent_dist
            z = post.sample(generator=g)
            y = vae.decode(z).sample
            rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
            kl = post.kl().mean()
            loss = rec + args.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(rec.detach()))
            if step % 10 == 0 or step == args.vae_steps - 1:
                avg = float(np.mean(losses[-20:]))
                prog.update(task, completed=step + 1, info=f"rec {avg:.4f} kl {float(kl.detach()):.0f}")
                if step % 50 == 0 or step == args.vae_steps - 1:
                    log(f"vae step {step} rec {avg:.5f} kl {float(kl.detach()):.1f}")
            if loop_checkpoint(args, "vae", step + 1, args.vae_steps):
                ck.save(step + 1, modules, generators={"g": g},
                        extra={"losses": losses, "seconds": before + time.time() - t0, "cpu_seconds": cpu_so_far(cpu_before)})
            maybe_interrupt(args, "vae", step + 1)
    elapsed = before + time.time() - t0
    vae.eval()
    # latents of the whole training set (posterior means) and the scaling factor
    lat = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            lat.append(vae.encode(to_unit(images[i:i + 256])).latent_dist.mean)
    lat = torch.cat(lat)
    std = float(lat.std())
    scaling = 1.0 / std
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        x = to_unit(images[:256])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        rec_mse = float(F.mse_loss(y, x))
    vae.save_pretrained(WORK / "vae", safe_serialization=True)
    save_latents(lat)
    roundtrip = vae_roundtrip_accuracy(vae) if not args.skip_diagnostics else None
    log(f"vae round trip (judge, 200 held-out scenes): {roundtrip}")
    write_stage("vae", {"resumed_at_step": start or None, "resumed_cpu_seconds": cpu_before, "resumed_seconds": before,
                        "steps": args.vae_steps, "batch": args.vae_batch, "crop": args.vae_crop, "lr": args.vae_lr, "kl_weight": args.vae_kl,
                        "seconds": elapsed, "rec_first": float(np.mean(losses[:20])),
                        "rec_last": float(np.mean(losses[-20:])), "recon_mse_eval": rec_mse,
                        "judge_roundtrip": roundtrip, "latent_mean": float(lat.mean()), "latent_std": std, "scaling_factor": scaling,
                        "loss_curve": [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)],
                        "params": sum(p.numel() for p in vae.parameters())})
    log(f"vae stage done in {elapsed:.0f}s; recon MSE {rec_mse:.5f}; latent std {std:.3f}")


def save_latents(lat: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = WORK / "latents.safetensors.tmp"
    save_file({"latents": lat.half().contiguous()}, str(tmp))
    os.replace(tmp, WORK / "latents.safetensors")


def load_latents() -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(WORK / "latents.safetensors"))["latents"].float()


def vae_roundtrip_accuracy(vae, n: int = 200) -> dict:
    """The judge's accuracy on held-out renders passed through the VAE: the ceiling of what the latent space carries
    (the v2 VAE at 800 whole-image steps kept the colour of only 66% of them; the UNet cannot do better)."""
    import diagnose_shapes
    import eval_shapes

    scenes = world.heldout_single_scenes(n, seed=1)
    images = diagnose_shapes._roundtrip(vae, [world.render(s) for s in scenes])
    return diagnose_shapes._acc(eval_shapes.load_judge_model(), images, scenes)


# ---- stage: vaedec (decoder fine-tuning; the encoder, hence the latent space, stays frozen) ----------------------
def stage_vaedec(args) -> None:
    from diffusers import AutoencoderKL

    seed_all(args.seed + 5)
    _, images = make_dataset(args.n_images, args.seed + 1)
    vae = AutoencoderKL.from_pretrained(WORK / "vae")
    latents = load_latents()
    if len(latents) != len(images):
        raise SystemExit("latent cache does not match --n-images; rerun --stage vae")
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=args.vaedec_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 51)
    std = float(latents.std())
    losses, t0 = [], time.time()
    with progress() as prog:
        task = prog.add_task("VAE decoder", total=args.vaedec_steps, info="")
        for step in range(args.vaedec_steps):
            set_lr(opt, lr_at(step, args.vaedec_steps, args.vaedec_lr, 20, floor=0.02))
            idx = torch.randint(0, len(images), (args.vae_batch,), generator=g)
            x = to_unit(images[idx.numpy()])
            z = latents[idx]
            z = z + args.vaedec_noise * std * torch.randn(z.shape, generator=g)  # robust to imperfect latents
            y = vae.decode(z).sample
            rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
            opt.zero_grad(set_to_none=True)
            rec.backward()
            opt.step()
            losses.append(float(rec.detach()))
            if step % 10 == 0 or step == args.vaedec_steps - 1:
                avg = float(np.mean(losses[-20:]))
                prog.update(task, completed=step + 1, info=f"rec {avg:.4f}")
                if step % 100 == 0 or step == args.vaedec_steps - 1:
                    log(f"vaedec step {step} rec {avg:.5f}")
            if args.vaedec_max_minutes and time.time() - t0 > 60 * args.vaedec_max_minutes:
                log(f"vaedec: time limit reached at step {step + 1}; stopping")
                break
    elapsed = time.time() - t0
    vae.eval()
    with torch.no_grad():
        x = to_unit(images[:256])
        y = vae.decode(latents[:256]).sample.clamp(-1, 1)
        rec_mse = float(F.mse_loss(y, x))
    vae.save_pretrained(WORK / "vae", safe_serialization=True)
    write_stage("vaedec", {"steps": step + 1, "batch": args.vae_batch, "lr": args.vaedec_lr,
                           "latent_noise": args.vaedec_noise, "seconds": elapsed,
                           "rec_first": float(np.mean(losses[:20])), "rec_last": float(np.mean(losses[-20:])),
                           "recon_mse_eval": rec_mse,
                           "loss_curve": [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)]})
    log(f"vaedec stage done in {elapsed:.0f}s; recon MSE {rec_mse:.5f}")


# ---- stage: unet -----------------------------------------------------------------------------------------------
def _pipeline(unet, text_encoder, vae, tok):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SCHED_CFG), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def probe_accuracy(pipe, n: int, guidance: float) -> dict:
    """Generation accuracy of the current weights on ``n`` held-out prompts (the learning curve in the report)."""
    import eval_shapes

    judge = eval_shapes.load_judge_model()
    res = eval_shapes.generation_accuracy(pipe, judge, n=n, guidance=guidance, seed=2)
    return {k: res[f"generation_{k}"] for k in ("accuracy", "color_accuracy", "shape_accuracy")}


def stage_unet(args) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from fragcli.models.tokenizer import build_clip_tokenizer

    seed_all(args.seed + 3)
    scenes = world.sample_scenes(args.n_images, args.seed + 1, split="train", p_single=P_SINGLE)
    vae_info = read_stage("vae")
    if vae_info is None:
        raise SystemExit("run --stage vae first")
    scaling = vae_info["scaling_factor"]
    latents = load_latents() * scaling
    if len(latents) != len(scenes):
        raise SystemExit("latent cache does not match --n-images; rerun --stage vae")
    weight_map = object_weight_maps(scenes, args.object_weight) if args.object_weight > 0 else None
    tok = build_clip_tokenizer(WORK / "tokenizer")
    # v2: the text encoder (initialised from the contrastive text tower) trains jointly with the UNet, as in the
    # original latent-diffusion text-to-image models: the frozen contrastive tower barely encoded the shape word
    # (token-state cosine 0.97 between captions differing only in shape), so the UNet could not learn shapes.
    joint = args.text_joint_lr_scale > 0
    te = load_text_encoder().train(joint).requires_grad_(joint)
    te_ema = load_text_encoder()
    sched = DDIMScheduler(**SCHED_CFG)
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    unet = UNet2DConditionModel(**UNET_CFG).train()
    ema = UNet2DConditionModel(**UNET_CFG).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr_scale": 1.0},
                             {"params": list(te.parameters()), "lr_scale": args.text_joint_lr_scale}],
                            lr=args.unet_lr, weight_decay=0.01)
    r = random.Random(args.seed + 31)
    g = torch.Generator().manual_seed(args.seed + 32)
    ck = stage_checkpoint("unet", args)
    modules = {"unet": unet, "ema": ema, "te": te, "te_ema": te_ema, "opt": opt}
    start, losses, elapsed_before, cpu_before, extra = resume(ck, "unet", modules, generators={"g": g}, pyrngs={"r": r})
    curve = extra.get("curve", [])
    vae = AutoencoderKL.from_pretrained(WORK / "vae").eval()
    pairs = ((ema, unet), (te_ema, te)) if joint else ((ema, unet),)

    def save_ckpt(step, elapsed):
        ck.save(step, modules, generators={"g": g}, pyrngs={"r": r},
                extra={"losses": losses, "curve": curve, "seconds": elapsed, "cpu_seconds": cpu_so_far(cpu_before)})

    t0 = time.time()
    step = start
    with progress() as prog:
        task = prog.add_task("UNet + text", total=args.unet_steps, completed=start, info="")
        for step in range(start, args.unet_steps):
            lr = lr_at(step, args.unet_steps, args.unet_lr, 100, floor=0.05)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            idx = [r.randrange(len(scenes)) for _ in range(args.unet_batch)]
            texts = [world.random_training_caption(scenes[i], r) for i in idx]
            texts = ["" if r.random() < args.cfg_dropout else t for t in texts]  # caption dropout (CFG)
            ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            with torch.set_grad_enabled(joint):
                cond = te(ids)[0]
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
            xt = sched.add_noise(x0, noise, t)
            target = sched.get_velocity(x0, noise, t)
            pred = unet(xt, t, cond).sample
            # min-SNR-gamma in x0 terms with weight min(1 + SNR, gamma): v-loss weight min(1, gamma / (1 + SNR)).
            # (the common min(SNR, gamma) / (SNR + 1) starves the near-zero-SNR steps of the cosine schedule,
            # which decide the global layout and colours)
            w = torch.clamp(args.min_snr / (snr[t] + 1), max=1.0)
            err = F.mse_loss(pred, target, reduction="none")
            if weight_map is not None:  # object pixels weigh more (the shape is 5-13% of the image)
                err = err * weight_map[idx]
            loss = (w * err.mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for avg_model, model in pairs:
                    for pe, p in zip(avg_model.parameters(), model.parameters(), strict=True):
                        pe.lerp_(p, 1 - decay)
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == args.unet_steps - 1:
                avg = float(np.mean(losses[-50:]))
                prog.update(task, completed=step + 1, info=f"loss {avg:.4f}")
                if step % 100 == 0 or step == args.unet_steps - 1:
                    log(f"unet step {step} loss {avg:.5f} ({(time.time() - t0) / max(1, step + 1 - start):.2f}s/step)")
            if args.probe_every and (step + 1) % args.probe_every == 0 and step + 1 < args.unet_steps:
                with torch.no_grad():
                    acc = probe_accuracy(_pipeline(ema, te_ema, vae, tok), args.probe_prompts, args.probe_guidance)
                curve.append({"step": step + 1, **acc})
                log(f"unet step {step + 1}: probe {acc}")
            if loop_checkpoint(args, "unet", step + 1, args.unet_steps):
                save_ckpt(step + 1, elapsed_before + time.time() - t0)
            maybe_interrupt(args, "unet", step + 1)
    done = step + 1
    elapsed = elapsed_before + time.time() - t0
    ema.save_pretrained(WORK / "unet", safe_serialization=True)
    te_ema.save_pretrained(WORK / "text_encoder", safe_serialization=True)
    write_stage("unet", {"steps": done, "batch": args.unet_batch, "lr": args.unet_lr,
                         "text_lr_scale": args.text_joint_lr_scale, "ema": args.ema, "min_snr_gamma": args.min_snr,
                         "cfg_dropout": args.cfg_dropout, "object_weight": args.object_weight, "seconds": elapsed, "resumed_at_step": start or None,
                         "resumed_cpu_seconds": cpu_before, "resumed_seconds": elapsed_before,
                         "loss_weighting": "v-MSE x min(1, gamma / (1 + SNR))", "probe_curve": curve,
                         "probe": {"prompts": args.probe_prompts, "guidance": args.probe_guidance},
                         "loss_first": float(np.mean(losses[:50])), "loss_last": float(np.mean(losses[-50:])),
                         "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
                         "params": sum(p.numel() for p in unet.parameters()),
                         "params_text": sum(p.numel() for p in te.parameters())})
    log(f"unet stage done: {done} steps in {elapsed:.0f}s")


def object_weight_maps(scenes, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights (n, 1, 32, 32): 1 + ``weight`` on and next to the objects (render masks,
    max-pooled to the latent grid and dilated by one latent pixel), normalised to mean 1 per image."""
    t0 = time.time()
    masks = np.stack([_object_mask(world.render_array(s), s.background) for s in scenes]).astype(np.float32)
    m = torch.from_numpy(masks)[:, None]
    m = F.max_pool2d(m, world.SIZE // UNET_CFG["sample_size"])
    m = F.max_pool2d(m, 3, stride=1, padding=1)
    w = 1.0 + weight * m
    w = w / w.mean(dim=(1, 2, 3), keepdim=True)
    log(f"object weight maps for {len(scenes)} scenes in {time.time() - t0:.1f}s (object share {float(m.mean()):.3f})")
    return w


def _object_mask(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels whose colour is far from the background's (the same rule as eval_shapes' layout measure)."""
    return np.abs(image.astype(np.float32) - np.array(world.COLORS[background], dtype=np.float32)).sum(-1) > 90


# ---- stage: assemble ----------------------------------------------------------------------------------------------
def stage_assemble(args) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from fragcli.models.tokenizer import build_clip_tokenizer

    pipe = _pipeline(UNet2DConditionModel.from_pretrained(WORK / "unet"),
                     CLIPTextModel.from_pretrained(WORK / "text_encoder"), AutoencoderKL.from_pretrained(WORK / "vae"),
                     build_clip_tokenizer(WORK / "tokenizer"))
    pipe.to(torch.float16)
    tmp = PIPE_DIR.with_name(".shapes.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # keep files that are not part of the pipeline itself (frag.json, training report, grid)
    for name in ("frag.json", "training_report.json", "shapes_grid.png"):
        if (PIPE_DIR / name).is_file():
            shutil.copy2(PIPE_DIR / name, tmp / name)
    if not (tmp / "frag.json").is_file():
        (tmp / "frag.json").write_text(json.dumps(frag_json(5.0), indent=2) + "\n")
    shutil.rmtree(PIPE_DIR, ignore_errors=True)
    os.replace(tmp, PIPE_DIR)
    size = sum(f.stat().st_size for f in PIPE_DIR.rglob("*") if f.is_file())
    write_stage("assemble", {"bytes": size})
    log(f"pipeline saved to {PIPE_DIR} ({size / 1e6:.1f} MB)")


def frag_json(guidance: float) -> dict:
    return {"name": "shapes", "default_steps": 20, "default_guidance": guidance, "width": 64, "height": 64,
            "judge": "shapes_judge"}


# ---- stage: judge --------------------------------------------------------------------------------------------------
def stage_judge(args) -> None:
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    seed_all(args.seed + 4)
    prev = read_stage("judge") if args.judge_resume else None
    round_ = prev.get("rounds", 1) if prev else 0  # continued rounds draw fresh scenes and batches
    scenes, images = make_dataset(args.judge_images, args.seed + 4 + 100 * round_)
    model = CLIP(**JUDGE_MODEL_CFG).train()
    if prev is not None:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(JUDGE_DIR / "open_clip_model.safetensors")).items()})
        log(f"judge: continuing from the shipped weights (round {round_ + 1}, {prev['steps']} steps so far)")
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=JUDGE_MODEL_CFG["text_cfg"]["context_length"])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.judge_lr, weight_decay=0.05)
    r = random.Random(args.seed + 41 + 100 * round_)
    g = torch.Generator().manual_seed(args.seed + 42 + 100 * round_)
    blur_k = torch.tensor([1.0, 2.0, 1.0])
    blur_k = (blur_k[:, None] * blur_k[None, :] / 16).expand(3, 1, 3, 3)
    losses, t0 = [], time.time()
    with progress() as prog:
        task = prog.add_task("judge", total=args.judge_steps, info="")
        for step in range(args.judge_steps):
            set_lr(opt, lr_at(step, args.judge_steps, args.judge_lr, 50))
            idx = [r.randrange(len(scenes)) for _ in range(args.judge_batch)]
            texts = [world.random_training_caption(scenes[i], r, p_partial=0.4) for i in idx]
            x = to_unit(images[idx]) * 0.5 + 0.5
            # augmentation: some images blurred and noised (generated images are softer than renders)
            m = (torch.rand(len(idx), 1, 1, 1, generator=g) < 0.35).float()
            x = m * F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur_k, groups=3) + (1 - m) * x
            x = (x + 0.03 * torch.rand(len(idx), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)
            x = (x - mean) / std
            feats_i, feats_t, scale = model(x, tokenizer(texts))
            loss = multi_positive_clip_loss(feats_i, feats_t, scale.clamp(max=100), texts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == args.judge_steps - 1:
                avg = float(np.mean(losses[-20:]))
                prog.update(task, completed=step + 1, info=f"loss {avg:.3f}")
                if step % 50 == 0 or step == args.judge_steps - 1:
                    log(f"judge step {step} loss {avg:.4f}")
            if args.judge_max_minutes and time.time() - t0 > 60 * args.judge_max_minutes:
                log(f"judge: time limit reached at step {step + 1}; stopping")
                break
    elapsed = time.time() - t0
    tmp = JUDGE_DIR.with_name(".shapes_judge.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "open_clip_model.safetensors"), metadata={"format": "pt"})
    os.chmod(tmp / "open_clip_model.safetensors", 0o644)
    cfg = {"model_cfg": JUDGE_MODEL_CFG,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                              "interpolation": "bicubic", "resize_mode": "shortest", "size": 64},
           "frag": {"name": "shapes_judge", "trained_on": "fragcli.shapes world (train split)",
                    "seed": args.seed + 4, "rounds": round_ + 1}}
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(JUDGE_DIR, ignore_errors=True)
    os.replace(tmp, JUDGE_DIR)
    curve = [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)]
    write_stage("judge", {"steps": step + 1 + (prev or {}).get("steps", 0), "batch": args.judge_batch,
                          "lr": args.judge_lr, "seconds": elapsed + (prev or {}).get("seconds", 0.0),
                          "rounds": round_ + 1, "round_steps": (prev or {}).get("round_steps", [(prev or {}).get("steps")] if prev else []) + [step + 1],
                          "loss_first": (prev or {}).get("loss_first", float(np.mean(losses[:20]))),
                          "loss_last": float(np.mean(losses[-20:])),
                          "loss_curve": (prev or {}).get("loss_curve", []) + curve,
                          "params": sum(p.numel() for p in model.parameters()),
                          "bytes": (JUDGE_DIR / "open_clip_model.safetensors").stat().st_size})
    log(f"judge stage done in {elapsed:.0f}s -> {JUDGE_DIR}")


# ---- stage: eval ---------------------------------------------------------------------------------------------------
def stage_eval(args) -> None:
    import eval_shapes

    t0, c0 = time.time(), time.process_time()
    pipe = eval_shapes.load_pipeline(PIPE_DIR)
    judge = eval_shapes.load_judge_model()
    # the eval's checkpoint: each finished measurement is kept (keyed by the fingerprint of the weights' stages and
    # the eval settings), so an interrupted eval redoes only what it had not finished
    part_path, fp = WORK / "eval_partial.json", stage_fingerprint("eval", args)
    part = json.loads(part_path.read_text()) if part_path.is_file() else {}
    part = part if part.get("fingerprint") == fp else {"fingerprint": fp}

    def keep(key, value):
        part[key] = value
        tmp = part_path.with_name(part_path.name + ".tmp")
        tmp.write_text(json.dumps(part, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, part_path)

    sweep = dict(part.get("sweep", {}))
    for gs in args.guidance_sweep:
        if str(gs) in sweep:
            log(f"guidance {gs}: generation accuracy {sweep[str(gs)]:.3f} (kept from the interrupted eval)")
            continue
        res = eval_shapes.generation_accuracy(pipe, judge, n=args.sweep_prompts, guidance=gs, seed=1000)
        sweep[str(gs)] = res["generation_accuracy"]
        keep("sweep", sweep)
        log(f"guidance {gs}: generation accuracy {res['generation_accuracy']:.3f} on {args.sweep_prompts} prompts")
    best = max(args.guidance_sweep, key=lambda x: (sweep[str(x)], -abs(x - 5.0)))
    (PIPE_DIR / "frag.json").write_text(json.dumps(frag_json(float(best)), indent=2) + "\n")
    ev = part.get("evaluation")
    if ev is None:
        ev = eval_shapes.evaluate(pipe, judge, guidance=float(best), n_zero_shot=args.eval_zero_shot,
                                  n_prompts=args.eval_prompts, n_families=args.eval_families)
        keep("evaluation", ev)
    ev["guidance_sweep"] = sweep
    grid = ROOT / "docs" / "shapes_grid.png" if PIPE_DIR == SHIPPED_DIR else PIPE_DIR / "shapes_grid.png"
    ev["grid"] = {"path": str(grid.relative_to(ROOT)),
                  "prompts": eval_shapes.save_grid(pipe, grid, guidance=float(best))}
    stages = {name: read_stage(name) for name in ("text", "vae", "vaedec", "unet", "assemble", "judge", "judge_refine")}
    cpu_min = {k: round(v["cpu_seconds"] / 60, 2) for k, v in stages.items() if v and "cpu_seconds" in v}
    sizes = {
        "pipeline_bytes": sum(f.stat().st_size for f in PIPE_DIR.rglob("*") if f.is_file()),
        "judge_bytes": sum(f.stat().st_size for f in JUDGE_DIR.rglob("*") if f.is_file()),
    }
    report = {"_type": "frag.shapes_training", "schema_version": 1, "seed": args.seed,
              "versions": {"torch": torch.__version__, **eval_shapes.versions()},
              "architecture": {"text": TEXT_CFG, "vision": VISION_CFG, "vae": VAE_CFG, "unet": UNET_CFG,
                               "scheduler": SCHED_CFG, "judge": JUDGE_MODEL_CFG},
              "stages": stages, "timings_s": {k: (v or {}).get("wall_seconds") for k, v in stages.items()},
              "cpu_minutes": cpu_min, "settings": {k: v for k, v in sorted(vars(args).items())},
              "pipeline_cpu_minutes": round(sum(v for k, v in cpu_min.items() if not k.startswith("judge"))
                                            + (time.process_time() - c0) / 60, 2),
              "eval_seconds": time.time() - t0, "sizes": sizes, "evaluation": ev, "default_guidance": best}
    (PIPE_DIR / "training_report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    log(f"eval done in {time.time() - t0:.0f}s: {json.dumps({k: v for k, v in ev.items() if not isinstance(v, (dict, list))})}")


def stage_judge_refine(args) -> None:
    refine = argparse.Namespace(**vars(args))
    refine.judge_resume, refine.judge_steps, refine.judge_lr = True, args.judge_refine_steps, args.judge_refine_lr
    stage_judge(refine)


STAGES = {"text": stage_text, "vae": stage_vae, "vaedec": stage_vaedec, "unet": stage_unet, "assemble": stage_assemble,
          "judge": stage_judge, "judge_refine": stage_judge_refine, "eval": stage_eval}
GROUPS = {"all": ["text", "vae", "unet", "assemble", "eval"], "pipeline": ["text", "vae", "unet"],
          "finish": ["assemble", "eval"], "judges": ["judge", "judge_refine"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all",
                   help="text|vae|vaedec|unet|judge|judge_refine|assemble|eval, comma-separated, or all|pipeline|side|finish")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log", default=None, help="append log lines to this file")
    p.add_argument("--n-images", type=int, default=40000)
    p.add_argument("--text-steps", type=int, default=400)
    p.add_argument("--text-batch", type=int, default=256)
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32, help="train the VAE on random crops of this side (64: whole)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--vaedec-steps", type=int, default=1500)
    p.add_argument("--vaedec-lr", type=float, default=5e-4)
    p.add_argument("--vaedec-noise", type=float, default=0.05, help="latent noise (x latent std) while fine-tuning")
    p.add_argument("--vaedec-max-minutes", type=float, default=11.0)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--text-joint-lr-scale", type=float, default=0.0,
                   help="train the text encoder with the UNet at this share of --unet-lr (0: frozen; 0.5 collapsed it:"
                        " token-state cosine 0.99 between shape-swapped captions)")
    p.add_argument("--text-attr-weight", type=float, default=5.0,
                   help="weight of the shape/colour classification loss on the text tower's mean token state")
    p.add_argument("--probe-every", type=int, default=2000, help="unet steps between learning-curve probes (0: none)")
    p.add_argument("--probe-prompts", type=int, default=40)
    p.add_argument("--probe-guidance", type=float, default=4.0)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=4.0,
                   help="extra loss weight on object pixels (render masks on the latent grid; 0: plain loss)")
    p.add_argument("--resume", action="store_true", help="(the default now) resume every stage from its checkpoint")
    p.add_argument("--fresh", action="store_true",
                   help="forget the checkpoints and finished stages of the stages asked for, and train them anew")
    p.add_argument("--work", default=None, help="folder for intermediate files and checkpoints (tools/out/shapes)")
    p.add_argument("--ckpt-every", type=int, default=200, help="optimisation steps between checkpoints (every stage)")
    p.add_argument("--interrupt-after", default=None, metavar="STAGE:STEP",
                   help="tests: stop as a kill would after that step of that stage (then rerun to resume)")
    p.add_argument("--skip-diagnostics", action="store_true",
                   help="tests: skip the text-separation and VAE round-trip measurements (they need the judge)")
    p.add_argument("--judge-images", type=int, default=40000)
    p.add_argument("--judge-steps", type=int, default=800)
    p.add_argument("--judge-batch", type=int, default=256)
    p.add_argument("--judge-lr", type=float, default=1e-3)
    p.add_argument("--judge-max-minutes", type=float, default=20.0)
    p.add_argument("--judge-resume", action="store_true",
                   help="continue training the shipped judge for --judge-steps more steps (fresh scenes, new schedule)")
    p.add_argument("--judge-refine-steps", type=int, default=600)
    p.add_argument("--judge-refine-lr", type=float, default=5e-4)
    p.add_argument("--guidance-sweep", type=float, nargs="+", default=[2.5, 4.0, 6.0])
    p.add_argument("--sweep-prompts", type=int, default=60)
    p.add_argument("--eval-zero-shot", type=int, default=400)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-families", type=int, default=30)
    p.add_argument("--install", action="store_true",
                   help="assemble into fragcli/models/shapes (the shipped model) and docs/shapes_grid.png; without it"
                        " the pipeline, its report and grid go to tools/out/shapes/pipeline")
    args = p.parse_args(argv)
    global _LOG, PIPE_DIR, WORK, _STAGE_CPU0
    _LOG = args.log
    if args.work:
        WORK = Path(args.work).resolve()
    PIPE_DIR = SHIPPED_DIR if args.install else WORK / "pipeline"
    torch.set_num_threads(args.threads)
    names = []
    for part in args.stage.split(","):
        names += GROUPS.get(part.strip(), [part.strip()])
    for n in names:
        if n not in STAGES:
            p.error(f"unknown stage {n!r}")
    WORK.mkdir(parents=True, exist_ok=True)
    log(f"stages {names}; seed {args.seed}; threads {args.threads}; work {WORK}")
    if args.fresh:
        for n in names:
            for f in (WORK / f"{n}_ckpt.safetensors", WORK / f"stage-{n}.json", WORK / f"{n}_partial.json"):
                f.unlink(missing_ok=True)
    for n in names:
        done = read_stage(n) or {}
        if n in RESUMABLE and done.get("fingerprint") == stage_fingerprint(n, args):
            log(f"stage {n}: already finished with these settings (kept; --fresh to redo)")
            continue
        t0 = time.time()
        _STAGE_CPU0 = c0 = time.process_time()
        STAGES[n](args)
        info = read_stage(n) or {}
        wall = time.time() - t0 + info.get("resumed_seconds", 0.0)
        cpu = time.process_time() - c0 + info.get("resumed_cpu_seconds", 0.0)
        info.update(wall_seconds=wall, cpu_seconds=cpu, threads=args.threads,
                    settings={k: v for k, v in sorted(vars(args).items())})
        if n in STAGE_KEYS:
            info["fingerprint"] = stage_fingerprint(n, args)
        write_stage(n, info)
        (WORK / f"{n}_ckpt.safetensors").unlink(missing_ok=True)  # the stage's outputs are written: not needed
        log(f"stage {n}: {wall:.0f}s wall, {cpu / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
