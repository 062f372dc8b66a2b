#!/usr/bin/env python
"""Train the built-in "shapes-flux" model: a standard diffusers ``FluxPipeline`` on the shapes world, on CPU.

The pipeline: ``FluxTransformer2DModel`` (dual-stream and single-stream blocks, distilled guidance embedding),
``FlowMatchEulerDiscreteScheduler``, shapes v2's VAE (32x32x4 latent; Flux packs it 2x2 into 256 tokens of 16
channels) and shapes v2's CLIP text tower (the pooled tower), plus a small ``T5EncoderModel`` (the sequence tower)
trained here. Stages (``--stage``, comma-separated, or ``all``):

  t5           a small T5 encoder (offline Unigram tokenizer, ``fragcli.models.tokenizer.build_t5_tokenizer``) trained
               to predict every attribute a full caption names (multi-hot, from the mean state of its real tokens) as
               v2's CLIP text tower was; it runs, as in the pipeline, on 512 tokens without an attention mask, and a
               second loss keeps its 512 - n pad states alike (so training can compress them, see below)
  latents      renders the training scenes, encodes them with the shipped shapes VAE (posterior means), records the
               latent mean and std (the VAE's ``shift_factor`` and ``scaling_factor`` in this pipeline) and the object
               masks on the latent grid (object-weighted loss)
  transformer  flow matching (x_t = (1 - s) x0 + s e, target e - x0, s logit-normal), object pixels weighted
               (``--object-weight``), 10% caption dropout, EMA, fixed steps and seeds; from ``--guide-start`` of the
               steps on, half of each batch learns distilled guidance (FLUX.1-dev style, "model guidance"): target
               e - x0 + (g - 1) (v(x_t, c) - v(x_t, "")) with the model's own stop-gradient predictions, g ~ U[1,
               ``--guide-max``] fed to the guidance embedding; checkpoints (model, EMA, optimizer, step, torch/numpy/
               python RNG states) every ``--ckpt-every`` steps
  assemble     the ``FluxPipeline`` (fp16 safetensors) -> ``tools/out/shapes_flux/pipeline`` (``--install``:
               ``fragcli/models/shapes_flux``, the shipped model)
  eval         guidance sweep (1 = no guidance) + ``tools/eval_shapes.py``; writes ``frag.json``,
               ``training_report.json`` (every setting, CPU minutes per stage, learning curve, evaluation) and the grid
               (``--install``: ``docs/shapes_flux_grid.png``)

Pad compression (training only, exact when the pads are alike): the pipeline pads T5 to 512 tokens and passes no mask,
so 480-odd pad tokens sit in every joint attention. Flux gives every text token the same rotary position, so identical
pads stay identical through every block, and attention over m identical keys equals attention over one of them with
log(m) added to its logit. Training therefore keeps the real tokens plus one pad (their mean state) weighted by an
additive attention mask: ~290 tokens instead of 768 per sample, 3-4x less compute. The model is evaluated through the
unchanged pipeline (512 pads), so any residual error shows in the evaluation.

Rerunning the same command resumes: finished stages (same settings) are skipped and the transformer stage continues
from its last checkpoint, ending with the same weights as an uninterrupted run (tests/test_train_shapes_flux.py).

    make train-shapes-flux                                             # -> tools/out/shapes_flux/pipeline + report
    python tools/train_shapes_flux.py --stage assemble,eval --install  # ship it (fragcli/models/shapes_flux)

CPU time (``time.process_time``) is recorded per stage; the machine is shared, wall time is not the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from train_ckpt import Checkpoint, load_tensors, save_tensors  # noqa: E402

from fragcli.shapes import world  # noqa: E402

SHAPES_DIR = ROOT / "fragcli" / "models" / "shapes"  # shapes v2: its VAE, CLIP text tower and tokenizer are reused
SHIPPED_DIR = ROOT / "fragcli" / "models" / "shapes_flux"
GRID = ROOT / "docs" / "shapes_flux_grid.png"
T5_LEN = 512  # FluxPipeline's default max_sequence_length: what every caller that passes none gets
LATENT = 32  # the shapes VAE's latent side at 64x64
P_SINGLE = 0.75  # share of one-shape scenes (as shapes v2)

console = Console(stderr=True)
_LOG: str | None = None
# settings that do not change the result (excluded from the resume key)
NEUTRAL = {"stage", "log", "install", "out", "stop_at_step", "eval_prompts", "eval_zero_shot", "eval_families",
           "sweep_prompts", "guidance_sweep", "fresh", "probe_every", "probe_prompts", "probe_guidance", "ckpt_every",
           "default_steps"}
# the settings each stage's result depends on (None: every setting not in NEUTRAL)
STAGE_KEYS = {"t5": ("seed", "threads", "n_images", "t5_dim", "t5_layers", "t5_steps", "t5_batch", "t5_lr",
                     "t5_pad_weight"),
              "latents": ("seed", "threads", "n_images", "pool"), "transformer": None}
STAGE_KEYS["captions"] = STAGE_KEYS["t5"] + ("pool",)


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    console.print(line, markup=False, highlight=False)
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False, refresh_per_second=1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """Paths and settings of one training run (``--out``, default ``tools/out/shapes_flux``)."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.out)
        self.pipe_dir = SHIPPED_DIR if args.install else self.work / "pipeline"

    def key(self, *names: str) -> str:
        """A hash of the settings that decide a stage's result (resume only continues a run with the same key)."""
        s = {k: v for k, v in sorted(vars(self.args).items()) if k not in NEUTRAL and (not names or k in names)}
        return hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage_path(self, name: str) -> Path:
        return self.work / f"stage-{name}.json"

    def read_stage(self, name: str) -> dict | None:
        p = self.stage_path(name)
        return json.loads(p.read_text()) if p.is_file() else None

    def write_stage(self, name: str, info: dict) -> None:
        atomic_write_text(self.stage_path(name), json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


# ---- architecture -------------------------------------------------------------------------------------------------
def t5_config(args, vocab: int) -> dict:
    return dict(vocab_size=vocab, d_model=args.t5_dim, d_kv=args.t5_dim // 4, d_ff=4 * args.t5_dim,
                num_layers=args.t5_layers, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1, feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def transformer_config(args, text_dim: int, pooled_dim: int) -> dict:
    hd = args.head_dim
    a = hd // 4 // 2 * 2
    b = (hd - a) // 2 // 2 * 2
    rope = [a, b, hd - a - b]  # Flux's 3 rotary axes (index, row, column); each even
    return dict(patch_size=1, in_channels=16, out_channels=16, num_layers=args.dual_blocks,
                num_single_layers=args.single_blocks, attention_head_dim=hd, num_attention_heads=args.heads,
                joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, axes_dims_rope=rope,
                guidance_embeds=True)


SCHED_CFG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


# ---- attributes (as tools/train_shapes.py's text stage) ----------------------------------------------------------
ATTRIBUTE_VALUES = ([("shape", v) for v in world.SHAPES] + [("color", v) for v in world.COLOR_NAMES]
                    + [("size", v) for v in world.SIZES] + [("position", v) for v in world.POSITION_NAMES]
                    + [("background", v) for v in world.COLOR_NAMES])


def attribute_target(scene) -> torch.Tensor:
    have = {("background", scene.background)}
    for o in scene.objects:
        have |= {("shape", o.shape), ("color", o.color), ("size", o.size), ("position", o.position)}
    return torch.tensor([float(a in have) for a in ATTRIBUTE_VALUES])


def object_mask(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels whose colour is far from the background's (the rule of eval_shapes' layout measure)."""
    return np.abs(image.astype(np.float32) - np.array(world.COLORS[background], dtype=np.float32)).sum(-1) > 90


def to_unit(batch_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def word_corpus() -> list[str]:
    """Every wording of a seeded sample of scenes (training and held-out templates), for the T5 vocabulary."""
    r = random.Random(0)
    scenes = world.sample_scenes(3000, 0, p_single=0.6)
    lines = [c for s in scenes[:600] for c in world.captions(s)]
    lines += [world.random_training_caption(s, r) for s in scenes]
    return lines


def build_word_tokenizer(folder: Path, model_max_length: int = T5_LEN):
    """A T5-style fast tokenizer (``</s>``-terminated, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) whose pieces are the
    shapes world's words. The generic offline Unigram tokenizer (``fragcli.models.tokenizer.build_t5_tokenizer``)
    splits most words into letters ("r", "e", "d"): a small T5 did not learn the attributes from those in 200 steps
    (loss stayed at the prior, 0.44). Words outside the vocabulary become ``<unk>``."""
    from transformers import T5TokenizerFast

    if not (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        words = sorted({w for line in word_corpus() for w in line.lower().split()})
        # a Unigram model (what T5 tokenizers are) whose pieces are whole words, then punctuation: a word is one
        # piece; a word with punctuation attached splits off the punctuation; anything else is <unk>
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
        pieces += [(c, -3.0) for c in ",.;:!?'\"-()"] + [("\u2581", -4.0)]
        tok = Tokenizer(models.Unigram(pieces, unk_id=2))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                               extra_ids=0, model_max_length=model_max_length)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fast.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return T5TokenizerFast.from_pretrained(str(folder), model_max_length=model_max_length)


def load_tokenizers(run: Run):
    from transformers import CLIPTokenizer

    clip_tok = CLIPTokenizer.from_pretrained(str(SHAPES_DIR / "tokenizer"))
    t5_tok = build_word_tokenizer(run.work / "tokenizer_2")
    return clip_tok, t5_tok


def load_clip():
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(str(SHAPES_DIR / "text_encoder"), torch_dtype=torch.float32,
                                         use_safetensors=True).eval().requires_grad_(False)


def load_t5(run: Run):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(run.work / "text_encoder_2"), torch_dtype=torch.float32,
                                          use_safetensors=True).eval().requires_grad_(False)


# ---- stage: t5 ----------------------------------------------------------------------------------------------------
def stage_t5(run: Run) -> dict:
    from transformers import T5Config, T5EncoderModel

    args = run.args
    seed_all(args.seed + 1)
    _, t5_tok = load_tokenizers(run)
    scenes = world.sample_scenes(args.n_images, args.seed + 1, split="train", p_single=P_SINGLE)
    model = T5EncoderModel(T5Config(**t5_config(args, len(t5_tok)))).train()
    head = torch.nn.Linear(args.t5_dim, len(ATTRIBUTE_VALUES))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=args.t5_lr, weight_decay=0.01)
    r = random.Random(args.seed + 11)
    losses, pad_dev = [], []
    with progress() as prog:
        task = prog.add_task("T5 tower", total=args.t5_steps, info="")
        for step in range(args.t5_steps):
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step, args.t5_steps, args.t5_lr, 20)
            idx = [r.randrange(len(scenes)) for _ in range(args.t5_batch)]
            texts = [world.random_training_caption(scenes[i], r, p_partial=0.0) for i in idx]  # full wordings
            ids = t5_tok(texts, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt").input_ids
            h = model(ids)[0]  # no attention mask, as FluxPipeline runs it
            real = (ids != t5_tok.pad_token_id).unsqueeze(-1).float()
            mean = (h * real).sum(1) / real.sum(1)
            target = torch.stack([attribute_target(scenes[i]) for i in idx])
            attr = F.binary_cross_entropy_with_logits(head(mean), target)
            pads = 1 - real
            pad_mean = (h * pads).sum(1, keepdim=True) / pads.sum(1, keepdim=True)
            dev = (((h - pad_mean) ** 2).sum(-1, keepdim=True) * pads).sum((1, 2)) / pads.sum((1, 2))
            dev = (dev / (pad_mean.squeeze(1) ** 2).sum(-1).clamp(min=1e-6)).mean()  # relative spread of the pads
            loss = attr + args.t5_pad_weight * dev
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(attr.detach()))
            pad_dev.append(float(dev.detach()))
            if step % 10 == 0 or step == args.t5_steps - 1:
                prog.update(task, completed=step + 1, info=f"attr {np.mean(losses[-20:]):.3f} pads {np.mean(pad_dev[-20:]):.4f}")
                if step % 50 == 0 or step == args.t5_steps - 1:
                    log(f"t5 step {step} attribute loss {np.mean(losses[-20:]):.4f} pad spread {np.mean(pad_dev[-20:]):.5f}")
    model.eval()
    acc = attribute_accuracy(model, head, t5_tok, args.seed)
    model.save_pretrained(run.work / "text_encoder_2", safe_serialization=True)
    log(f"t5: held-out attribute accuracy {acc}")
    return {"steps": args.t5_steps, "batch": args.t5_batch, "lr": args.t5_lr, "pad_weight": args.t5_pad_weight,
            "config": t5_config(args, len(t5_tok)), "params": sum(p.numel() for p in model.parameters()),
            "heldout_attribute_accuracy": acc, "loss_first": float(np.mean(losses[:20])),
            "loss_last": float(np.mean(losses[-20:])), "pad_spread_last": float(np.mean(pad_dev[-20:])),
            "loss_curve": [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)]}


@torch.no_grad()
def attribute_accuracy(model, head, tok, seed: int, n: int = 200) -> dict:
    """Per attribute kind, the share of held-out canonical captions whose every value is predicted right."""
    scenes = world.heldout_single_scenes(n, seed=seed + 5)
    texts = [world.canonical_caption(s) for s in scenes]
    ids = tok(texts, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt").input_ids
    h = model(ids)[0]
    real = (ids != tok.pad_token_id).unsqueeze(-1).float()
    pred = head((h * real).sum(1) / real.sum(1)) > 0
    truth = torch.stack([attribute_target(s) for s in scenes]) > 0.5
    out = {}
    for kind in ("shape", "color", "size", "position", "background"):
        cols = [i for i, (k, _) in enumerate(ATTRIBUTE_VALUES) if k == kind]
        out[kind] = float((pred[:, cols] == truth[:, cols]).all(1).float().mean())
    return out


# ---- stage: latents ---------------------------------------------------------------------------------------------
def load_vae(run: Run | None = None):
    """The shipped shapes VAE (fp32), with this pipeline's shift and scale when the latents stage has run."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(SHAPES_DIR / "vae"), torch_dtype=torch.float32, use_safetensors=True)
    info = run.read_stage("latents") if run is not None else None
    if info:
        vae.register_to_config(shift_factor=info["shift_factor"], scaling_factor=info["scaling_factor"])
    return vae.eval().requires_grad_(False)


def used_scenes(args) -> int:
    """The caption pool uses scenes 0 .. min(n_images, pool) - 1 (one wording each, more if pool > n_images)."""
    return min(args.n_images, args.pool)


def stage_latents(run: Run) -> dict:
    args = run.args
    scenes = world.sample_scenes(args.n_images, args.seed + 1, split="train", p_single=P_SINGLE)[:used_scenes(args)]
    vae = load_vae()
    lat, masks = [], []
    with progress() as prog, torch.no_grad():
        task = prog.add_task("render + encode", total=len(scenes), info="")
        for i in range(0, len(scenes), 250):
            chunk = scenes[i:i + 250]
            arr = np.stack([world.render_array(s) for s in chunk])
            lat.append(vae.encode(to_unit(arr)).latent_dist.mean.half())
            m = torch.from_numpy(np.stack([object_mask(a, s.background) for a, s in zip(arr, chunk, strict=True)]))
            masks.append(F.max_pool2d(m[:, None].float(), world.SIZE // LATENT).to(torch.uint8))
            prog.update(task, completed=i + len(chunk))
    lat, masks = torch.cat(lat), torch.cat(masks)
    mean, std = float(lat.float().mean()), float(lat.float().std())
    save_tensors(run.work / "latents.safetensors", {"latents": lat, "masks": masks})
    log(f"latents: {tuple(lat.shape)}, mean {mean:.4f} std {std:.4f}; object share {float(masks.float().mean()):.3f}")
    return {"n": len(scenes), "shift_factor": mean, "scaling_factor": 1.0 / std, "latent_std": std,
            "object_share": float(masks.float().mean())}


# ---- stage: captions (the encoded caption pool) --------------------------------------------------------------------
def stage_captions(run: Run) -> dict:
    """``--pool`` (scene, wording) pairs drawn once (seeded) and encoded by the frozen towers: the pooled CLIP vector
    and the T5 states of the first ``Lcap`` positions plus the mean of the other pads. The frozen T5 on 512 tokens
    costs about as much as a transformer step, so it runs once per caption here, not once per sample."""
    args = run.args
    scenes = world.sample_scenes(args.n_images, args.seed + 1, split="train", p_single=P_SINGLE)
    text = TextCond(run)
    r = random.Random(args.seed + 12)
    idx = [i % len(scenes) for i in range(args.pool)]  # every scene, one random wording each (more if pool > n)
    texts = [world.random_training_caption(scenes[i], r) for i in idx]
    n_tok = [len(t) for t in text.t5_tok(texts).input_ids]
    lcap = max(n_tok)
    pooled, states, pads, n_real = [], [], [], []
    with progress() as prog:
        task = prog.add_task("encode captions", total=len(texts), info=f"{lcap} T5 tokens at most")
        for i in range(0, len(texts), 64):
            p, st, n = text.encode(texts[i:i + 64])
            pooled.append(p.half())
            states.append(st[:, :lcap].half())
            pads.append(st[:, lcap:].mean(1).half())
            n_real.append(n)
            prog.update(task, completed=i + len(p))
    save_tensors(run.work / "captions.safetensors",
                 {"scene": torch.tensor(idx), "pooled": torch.cat(pooled), "states": torch.cat(states),
                  "pad": torch.cat(pads), "n_real": torch.cat(n_real)}, {"texts": texts})
    log(f"captions: {len(texts)} encoded, up to {lcap} T5 tokens")
    return {"pool": len(texts), "max_tokens": lcap, "mean_tokens": float(np.mean(n_tok))}


# ---- text conditioning, pad compression --------------------------------------------------------------------------
class TextCond:
    """Pooled CLIP + T5 states of captions, as FluxPipeline computes them, with the T5 pads compressed to one."""

    def __init__(self, run: Run):
        self.clip_tok, self.t5_tok = load_tokenizers(run)
        self.clip, self.t5 = load_clip(), load_t5(run)

    @torch.no_grad()
    def encode(self, texts: list[str]):
        cids = self.clip_tok(texts, padding="max_length", max_length=self.clip_tok.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        pooled = self.clip(cids, output_hidden_states=False).pooler_output
        tids = self.t5_tok(texts, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt").input_ids
        states = self.t5(tids)[0]
        n_real = (tids != self.t5_tok.pad_token_id).sum(1)
        return pooled, states, n_real


def compress(states: torch.Tensor, n_real: torch.Tensor, n_image: int):
    """(B, 512, D) T5 states -> (B, L + 1, D): the first L = max real length tokens, then the mean of the remaining
    pads; and the additive attention mask (B, L + 1 + n_image) giving that pad the weight of 512 - L identical keys."""
    length = int(n_real.max())
    rest = states.shape[1] - length
    if rest <= 0:
        return states, None
    ctx = torch.cat([states[:, :length], states[:, length:].mean(1, keepdim=True)], 1)
    bias = torch.zeros(states.shape[0], length + 1 + n_image)
    bias[:, length] = math.log(rest)
    return ctx, bias


def pool_batch(pool: dict, cap: torch.Tensor, drop: torch.Tensor, empty, n_image: int, length: int | None = None):
    """Context, attention bias and pooled vectors of pool captions ``cap`` (``drop``: the empty caption instead),
    compressed to the batch's longest caption (or ``length``) plus one pad weighted as the other 512 - L pads."""
    e_pooled, e_states, _ = empty
    n_real = torch.where(drop, 1, pool["n_real"][cap])
    length = length or int(n_real.max())
    lcap = pool["states"].shape[1]
    states = pool["states"][cap, :length].float()
    pad = pool["pad"][cap].float()
    states = torch.where(drop[:, None, None], e_states[:, :length], states)
    pad = torch.where(drop[:, None], e_states[:, lcap:].mean(1), pad)
    ctx = torch.cat([states, pad[:, None]], 1)
    bias = torch.zeros(len(cap), length + 1 + n_image)
    bias[:, length] = math.log(T5_LEN - length)
    pooled = torch.where(drop[:, None], e_pooled, pool["pooled"][cap].float())
    return ctx, bias, pooled


def image_ids(n: int = LATENT // 2) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, n, n, "cpu", torch.float32)


def pack(x: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def denoise(model, xt, sigma, guidance, pooled, ctx, bias, img_ids):
    txt_ids = torch.zeros(ctx.shape[1], 3)
    kw = {"attention_mask": bias} if bias is not None else None
    return model(hidden_states=xt, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                 encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=kw,
                 return_dict=False)[0]


# ---- stage: transformer --------------------------------------------------------------------------------------------
def build_pipeline(run: Run, transformer, text: TextCond | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    text = text or TextCond(run)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHED_CFG), vae=load_vae(run),
                        text_encoder=text.clip, tokenizer=text.clip_tok, text_encoder_2=text.t5,
                        tokenizer_2=text.t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def probe_accuracy(pipe, n: int, guidance: float, steps: int) -> dict:
    import eval_shapes

    res = eval_shapes.generation_accuracy(pipe, eval_shapes.load_judge_model(), n=n, guidance=guidance, seed=2,
                                          steps=steps)
    return {k: res[f"generation_{k}"] for k in ("accuracy", "color_accuracy", "shape_accuracy")}


def new_transformer(args, text: TextCond):
    from diffusers import FluxTransformer2DModel

    cfg = transformer_config(args, text.t5.config.d_model, text.clip.config.hidden_size)
    return FluxTransformer2DModel(**cfg), cfg


def stage_transformer(run: Run) -> dict:
    return train_transformer(run, hi=False)


def stage_transformer_hi(run: Run) -> dict:
    """Continues the transformer (model, EMA, optimizer) with half of each batch at high noise, sigma ~ U[``--hi-low``,
    1]. The first sampling step is at sigma = 1, where the logit-normal sampling of the main stage hardly trains
    (P(sigma > 0.95) ~ 0.5%): after it, one-step x0 predictions were right at sigma <= 0.8 but noise-textured at
    sigma = 1, and so were the sampled images."""
    return train_transformer(run, hi=True)


def train_transformer(run: Run, hi: bool) -> dict:
    args = run.args
    seed_all(args.seed + (4 if hi else 3))
    info = run.read_stage("latents")
    data, _ = load_tensors(run.work / "latents.safetensors")
    if info is None or len(data["latents"]) != used_scenes(args):
        raise SystemExit("the latent cache does not match --n-images; rerun --stage latents")
    x0_all = pack((data["latents"].float() - info["shift_factor"]) * info["scaling_factor"])
    w = 1.0 + args.object_weight * F.max_pool2d(data["masks"].float(), 3, stride=1, padding=1)
    w = w / w.mean(dim=(1, 2, 3), keepdim=True)
    w_all = pack(w.expand(-1, 4, -1, -1).contiguous())
    del data, w
    text = TextCond(run)
    pool, pool_meta = load_tensors(run.work / "captions.safetensors")
    pool["texts"] = pool_meta["texts"]
    if len(pool["texts"]) != args.pool:
        raise SystemExit("the caption pool does not match --pool; rerun --stage captions")
    torch.manual_seed(args.seed + 30)
    model, cfg = new_transformer(args, text)
    model.train()
    ema = new_transformer(args, text)[0].eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    r = random.Random(args.seed + (41 if hi else 31))
    g = torch.Generator().manual_seed(args.seed + (42 if hi else 32))
    ids = image_ids()
    empty = text.encode([""])
    start, losses, curve, cpu_before = 0, [], [], 0.0
    total, peak, warmup, ema_decay = ((args.hi_steps, args.hi_lr, 20, args.hi_ema) if hi
                                      else (args.steps, args.lr, 100, args.ema))
    ckpt = Checkpoint(run.work / ("transformer_hi_ckpt.safetensors" if hi else "transformer_ckpt.safetensors"),
                      run.key(*transformer_key_names(run.args, hi)))
    modules = {"model": model, "ema": ema, "opt": opt}
    if hi and not ckpt.path.is_file():  # start from the main stage's end state (weights and optimizer only)
        try:
            main = Checkpoint(run.work / "transformer_ckpt.safetensors",
                              run.key(*transformer_key_names(run.args, False))).load()
        except SystemExit:
            main = None
        if main is None or main["step"] != args.steps:
            raise SystemExit("run --stage transformer (to its last step, with these settings) first")
        Checkpoint.restore(main, modules, global_rngs=False)
        del main
    state = ckpt.load()  # None, or our own checkpoint (safetensors: weights, optimizer, RNG states; no pickle)
    if state is not None:
        Checkpoint.restore(state, modules, generators={"g": g}, pyrngs={"r": r})
        extra = state["extra"]
        start, losses, curve, cpu_before = state["step"], extra["losses"], extra["curve"], extra["cpu"]
        npr = extra["np_rng"]
        np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]))
        log(f"resumed {'transformer_hi' if hi else 'the transformer'} at step {start} ({cpu_before / 60:.1f} CPU-min before)")
    c0 = time.process_time()

    def save_ckpt(step: int) -> None:
        npr = np.random.get_state()
        ckpt.save(step, modules, generators={"g": g}, pyrngs={"r": r},
                  extra={"losses": losses, "curve": curve, "cpu": cpu_before + time.process_time() - c0,
                         "np_rng": [npr[0], npr[1].tolist(), int(npr[2]), int(npr[3]), float(npr[4])]})

    guide_from = 0 if hi else int(args.guide_start * args.steps)
    name = "transformer_hi" if hi else "transformer"
    step = start - 1
    with progress() as prog:
        task = prog.add_task(name, total=total, completed=start, info="")
        for step in range(start, total):
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step, total, peak, warmup)
            b = args.batch
            cap = torch.tensor([r.randrange(args.pool) for _ in range(b)])
            drop = torch.tensor([r.random() < args.cfg_dropout for _ in range(b)])  # caption dropout: ""
            idx = pool["scene"][cap]
            ctx, bias, pooled = pool_batch(pool, cap, drop, empty, ids.shape[0])
            x0, wt = x0_all[idx], w_all[idx]
            noise = torch.randn(x0.shape, generator=g)
            u = torch.randn(b, generator=g) * args.logit_std
            sigma = torch.sigmoid(u)
            uni = torch.rand(b, generator=g)
            sigma = torch.where(torch.rand(b, generator=g) < 0.1, uni, sigma)  # 10% uniform: the ends are sampled
            if hi:  # half of the batch at high noise, up to sigma = 1 (the first sampling step)
                high = args.hi_low + (1 - args.hi_low) * torch.rand(b, generator=g)
                sigma = torch.where(torch.arange(b) % 2 == 1, high, sigma)
            xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
            target = noise - x0
            gscale = torch.ones(b)
            if step >= guide_from and args.guide_max > 1:
                k = b // 2  # the first half of the batch learns the guided target
                gscale[:k] = 1 + (args.guide_max - 1) * torch.rand(k, generator=g)
                with torch.no_grad():
                    e_ctx, _, _ = pool_batch(pool, cap[:k], torch.ones(k, dtype=torch.bool), empty, ids.shape[0],
                                             length=ctx.shape[1] - 1)
                    both = denoise(model, torch.cat([xt[:k], xt[:k]]), torch.cat([sigma[:k], sigma[:k]]),
                                   torch.ones(2 * k), torch.cat([pooled[:k], empty[0].expand(k, -1)]),
                                   torch.cat([ctx[:k], e_ctx]),
                                   None if bias is None else torch.cat([bias[:k], bias[:k]]), ids)
                    target[:k] += (gscale[:k, None, None] - 1) * (both[:k] - both[k:])
            pred = denoise(model, xt, sigma, gscale, pooled, ctx, bias, ids)
            loss = ((pred - target) ** 2 * wt).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            decay = ema_decay if hi else min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == total - 1:
                prog.update(task, completed=step + 1, info=f"loss {np.mean(losses[-50:]):.4f}")
                if step % 50 == 0 or step == total - 1:
                    cpu = cpu_before + time.process_time() - c0
                    log(f"{name} step {step} loss {np.mean(losses[-50:]):.5f} lr {opt.param_groups[0]['lr']:.2e} "
                        f"({cpu / max(1, step + 1):.2f} CPU-s/step, {cpu / 60:.1f} CPU-min)")
            if args.probe_every and (step + 1) % args.probe_every == 0 and step + 1 < total:
                state = torch.random.get_rng_state()  # the probe must not move the training RNG
                gp = args.probe_guidance if step >= guide_from else 1.0  # the guidance embedding is learned from then
                with torch.no_grad():
                    acc = probe_accuracy(build_pipeline(run, ema, text), args.probe_prompts, gp, args.default_steps)
                torch.random.set_rng_state(state)
                curve.append({"step": step + 1, "guidance": gp, **acc})
                log(f"{name} step {step + 1}: probe {acc}")
            if (step + 1) % args.ckpt_every == 0:
                save_ckpt(step + 1)
            if args.stop_at_step and step + 1 >= args.stop_at_step:
                log(f"stopping at step {step + 1} (--stop-at-step): rerun the same command to resume")
                raise SystemExit(3)
    done = step + 1
    save_ckpt(done)
    ema.save_pretrained(run.work / name, safe_serialization=True)
    cpu = cpu_before + time.process_time() - c0
    extra = {"high_noise": {"share": 0.5, "sigma_low": args.hi_low}} if hi else {}
    return {**extra, "steps": done, "batch": args.batch, "lr": peak, "ema": ema_decay, "cfg_dropout": args.cfg_dropout,
            "object_weight": args.object_weight, "logit_normal_std": args.logit_std, "guide_start_step": guide_from,
            "guide_max": args.guide_max, "config": cfg, "params": sum(p.numel() for p in model.parameters()),
            "resumed_at_step": start or None, "cpu_seconds_total": cpu,
            "probe": {"prompts": args.probe_prompts, "guidance": args.probe_guidance, "steps": args.default_steps},
            "probe_curve": curve, "loss_first": float(np.mean(losses[:50])), "loss_last": float(np.mean(losses[-50:])),
            "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]}


def transformer_key_names(args, hi: bool) -> tuple[str, ...]:
    """The main stage does not depend on the --hi-* settings (so the high-noise stage can be changed alone)."""
    return tuple(k for k in vars(args) if k not in NEUTRAL and (hi or not k.startswith("hi_")))


# ---- stage: assemble ------------------------------------------------------------------------------------------------
def stage_assemble(run: Run) -> dict:
    from diffusers import FluxTransformer2DModel

    name = "transformer_hi" if run.args.hi_steps > 0 else "transformer"
    transformer = FluxTransformer2DModel.from_pretrained(str(run.work / name), torch_dtype=torch.float32,
                                                         use_safetensors=True)
    pipe = build_pipeline(run, transformer)
    pipe.to(torch.float16)
    dest = run.pipe_dir
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.rglob("*.safetensors"):
        os.chmod(f, 0o644)  # transformers writes 0600; the package ships them to every user
    for name in ("frag.json", "training_report.json"):
        if (dest / name).is_file():
            shutil.copy2(dest / name, tmp / name)
    if not (tmp / "frag.json").is_file():
        atomic_write_text(tmp / "frag.json", json.dumps(frag_json(run.args, 3.0), indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"pipeline saved to {dest} ({size / 1e6:.1f} MB)")
    return {"bytes": size, "path": str(dest)}


def frag_json(args, guidance: float) -> dict:
    return {"name": "shapes-flux", "default_steps": args.default_steps, "default_guidance": guidance, "width": 64,
            "height": 64, "judge": "shapes_judge"}


# ---- stage: eval ----------------------------------------------------------------------------------------------------
def stage_eval(run: Run) -> dict:
    import eval_shapes

    args = run.args
    dest = run.pipe_dir
    pipe = eval_shapes.load_pipeline(dest)
    judge = eval_shapes.load_judge_model()
    sweep = {}
    for gs in args.guidance_sweep:
        res = eval_shapes.generation_accuracy(pipe, judge, n=args.sweep_prompts, guidance=gs, seed=1000,
                                              steps=args.default_steps)
        sweep[str(gs)] = {k: res[f"generation_{k}"] for k in ("accuracy", "shape_accuracy", "color_accuracy")}
        log(f"guidance {gs}: {sweep[str(gs)]} on {args.sweep_prompts} prompts")
    best = max(args.guidance_sweep, key=lambda x: (sweep[str(x)]["accuracy"], -x))
    atomic_write_text(dest / "frag.json", json.dumps(frag_json(args, float(best)), indent=2) + "\n")
    ev = eval_shapes.evaluate(pipe, judge, guidance=float(best), n_zero_shot=args.eval_zero_shot,
                              n_prompts=args.eval_prompts, n_families=args.eval_families, steps=args.default_steps)
    ev["guidance_sweep"] = sweep
    grid = GRID if args.install else dest / "shapes_flux_grid.png"
    ev["grid"] = {"path": str(grid.relative_to(ROOT)) if grid.is_relative_to(ROOT) else str(grid),
                  "prompts": eval_shapes.save_grid(pipe, grid, guidance=float(best), steps=args.default_steps)}
    log(f"eval: {json.dumps({k: v for k, v in ev.items() if not isinstance(v, (dict, list))})}")
    return {"evaluation": ev, "default_guidance": best}


def write_report(run: Run) -> None:
    import eval_shapes

    stages = {n: run.read_stage(n) for n in ("t5", "latents", "captions", "transformer", "transformer_hi", "assemble",
                                             "eval")}
    cpu_min = {k: round(v["cpu_seconds"] / 60, 2) for k, v in stages.items() if v and "cpu_seconds" in v}
    ev = (stages.get("eval") or {}).get("evaluation", {})
    sweep = ev.get("guidance_sweep", {})
    report = {
        "_type": "frag.shapes_flux_training", "schema_version": 1, "seed": run.args.seed,
        "versions": {"torch": torch.__version__, **eval_shapes.versions()},
        "architecture": {"transformer": (stages.get("transformer") or {}).get("config"),
                         "t5": (stages.get("t5") or {}).get("config"), "scheduler": SCHED_CFG,
                         "vae": "shapes v2 (fragcli/models/shapes/vae), shift/scale from the latents stage",
                         "clip": "shapes v2 text tower (fragcli/models/shapes/text_encoder), frozen, pooled output",
                         "t5_max_sequence_length": T5_LEN},
        "decisions": {
            "guidance": ("distilled guidance embedding (FLUX.1-dev style), learned in training with model guidance "
                         "(the model's own stop-gradient cond/uncond predictions; no teacher, ~+17% compute); the "
                         "eval sweep compares it with guidance 1 (no guidance, schnell style): "
                         + json.dumps({k: v.get("accuracy") for k, v in sweep.items()})),
            "t5": ("a small T5 trained from scratch on attribute prediction (as v2's CLIP text tower), ~3 CPU-min; "
                   "cheaper than a tower trained jointly with the transformer (v2 found joint text training "
                   "collapses the token states) and it keeps the standard pipeline (T5 states feed the joint "
                   "attention, the CLIP pooled vector the modulation)"),
            "pad_compression": "training keeps the real T5 tokens + one pad weighted log(512 - L); eval uses the "
                               "unchanged pipeline (512 tokens)",
        },
        "stages": stages, "cpu_minutes": cpu_min,
        "training_cpu_minutes": round(sum(v for k, v in cpu_min.items() if k in ("t5", "latents", "captions", "transformer",
                                                                         "transformer_hi")), 2),
        "settings": {k: v for k, v in sorted(vars(run.args).items())},
        "sizes": {"pipeline_bytes": sum(f.stat().st_size for f in run.pipe_dir.rglob("*") if f.is_file())},
        "evaluation": ev, "default_guidance": (stages.get("eval") or {}).get("default_guidance"),
        "default_steps": run.args.default_steps,
    }
    atomic_write_text(run.pipe_dir / "training_report.json",
                      json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    log(f"report -> {run.pipe_dir / 'training_report.json'}")


STAGES = {"t5": stage_t5, "latents": stage_latents, "captions": stage_captions, "transformer": stage_transformer,
          "transformer_hi": stage_transformer_hi, "assemble": stage_assemble, "eval": stage_eval}
GROUPS = {"all": ["t5", "latents", "captions", "transformer", "transformer_hi", "assemble", "eval"],
          "train": ["t5", "latents", "captions", "transformer", "transformer_hi"],
          "finish": ["assemble", "eval"]}
# stages whose result depends on an earlier one (a finished stage is redone when its inputs changed)
ALWAYS_RUN = {"assemble", "eval"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", help="t5|latents|transformer|assemble|eval, comma-separated, or all|train|finish")
    p.add_argument("--out", default=str(ROOT / "tools" / "out" / "shapes_flux"), help="working folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine 2 threads cost 2.5x the CPU time per step)")
    p.add_argument("--log", default=None, help="append log lines to this file")
    p.add_argument("--fresh", action="store_true", help="discard finished stages and checkpoints in --out first")
    p.add_argument("--n-images", type=int, default=12288)
    p.add_argument("--t5-dim", type=int, default=64)
    p.add_argument("--t5-layers", type=int, default=1)
    p.add_argument("--t5-steps", type=int, default=300)
    p.add_argument("--t5-batch", type=int, default=32)
    p.add_argument("--t5-lr", type=float, default=1e-2)
    p.add_argument("--t5-pad-weight", type=float, default=1.0, help="weight of the pad-spread loss (pads alike)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--pool", type=int, default=6144, help="encoded (scene, wording) pairs the transformer trains on")
    p.add_argument("--dual-blocks", type=int, default=2)
    p.add_argument("--single-blocks", type=int, default=4)
    p.add_argument("--steps", type=int, default=800, help="transformer training steps")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=4.0, help="extra loss weight on object pixels (0: plain)")
    p.add_argument("--logit-std", type=float, default=1.0, help="std of the logit-normal noise-level sampling")
    p.add_argument("--guide-start", type=float, default=0.5, help="share of the steps before guidance is learned")
    p.add_argument("--guide-max", type=float, default=5.0, help="largest distilled guidance scale (1: none)")
    p.add_argument("--hi-steps", type=int, default=150, help="steps of the high-noise stage (0: none)")
    p.add_argument("--hi-lr", type=float, default=2e-4)
    p.add_argument("--hi-low", type=float, default=0.8, help="the high-noise half of a batch: sigma ~ U[this, 1]")
    p.add_argument("--hi-ema", type=float, default=0.99)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--stop-at-step", type=int, default=0, help="exit after this step (tests: a simulated interruption)")
    p.add_argument("--probe-every", type=int, default=400, help="steps between learning-curve probes (0: none)")
    p.add_argument("--probe-prompts", type=int, default=40)
    p.add_argument("--probe-guidance", type=float, default=3.0)
    p.add_argument("--default-steps", type=int, default=8, help="the pipeline's default inference steps")
    p.add_argument("--guidance-sweep", type=float, nargs="+", default=[1.0, 2.0, 3.5])
    p.add_argument("--sweep-prompts", type=int, default=40)
    p.add_argument("--eval-zero-shot", type=int, default=400)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-families", type=int, default=30)
    p.add_argument("--install", action="store_true",
                   help="assemble into fragcli/models/shapes_flux and docs/shapes_flux_grid.png (the shipped model)")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    global _LOG
    _LOG = args.log
    torch.set_num_threads(args.threads)
    names = []
    for part in args.stage.split(","):
        names += GROUPS.get(part.strip(), [part.strip()])
    for n in names:
        if n not in STAGES:
            p.error(f"unknown stage {n!r}")
    run = Run(args)
    if args.fresh and run.work.is_dir():
        for f in list(run.work.glob("stage-*.json")) + [run.work / "transformer_ckpt.safetensors"]:
            f.unlink(missing_ok=True)
    run.work.mkdir(parents=True, exist_ok=True)
    log(f"stages {names}; seed {args.seed}; threads {args.threads}; out {run.work}")
    for n in names:
        done = run.read_stage(n)
        key = run.key(*(STAGE_KEYS.get(n) or (transformer_key_names(args, n == "transformer_hi")
                                               if n.startswith("transformer") else ())))
        if n not in ALWAYS_RUN and done and done.get("key") == key:
            log(f"stage {n}: already done with these settings ({done['cpu_seconds'] / 60:.1f} CPU-min); skipped")
            continue
        t0, c0 = time.time(), time.process_time()
        info = STAGES[n](run)
        wall, cpu = time.time() - t0, time.process_time() - c0
        if "cpu_seconds_total" in info:  # a resumed stage: CPU time of every session
            cpu = info["cpu_seconds_total"]
        info.update(key=key, wall_seconds=wall, cpu_seconds=cpu, threads=args.threads)
        run.write_stage(n, info)
        log(f"stage {n}: {wall:.0f}s wall, {cpu / 60:.1f} CPU-min")
    if "eval" in names:
        write_report(run)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
