"""Generation settings and seeded, batched image generation with timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from fragcli.errors import FragError


@dataclass(frozen=True)
class GenSettings:
    prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    negative_prompt: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def check_prompt(prompt: str) -> str:
    text = " ".join((prompt or "").split())
    if not text:
        raise FragError("the prompt is empty", 'pass a prompt, e.g. frag profile "a large red circle in the center on a blue background"')
    if any(ord(c) < 32 for c in prompt if c not in "\t\n\r"):
        raise FragError("the prompt contains control characters", "pass plain text")
    return text


MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_GUIDANCE = 100.0


def check_options(steps: int | None = None, guidance: float | None = None, width: int | None = None,
                  height: int | None = None) -> None:
    """Bound the numeric generation options before any model is loaded (None = the model's default)."""
    import math

    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise FragError(f"--steps {steps} is outside 1..{MAX_STEPS}", "pass e.g. --steps 20")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise FragError(f"--guidance {guidance} is not a number in 0..{MAX_GUIDANCE:g}", "pass e.g. --guidance 7.5")
    for label, v in (("--width", width), ("--height", height)):
        if v is not None and not (8 <= v <= MAX_SIDE and v % 8 == 0):
            raise FragError(f"{label} {v} is not a multiple of 8 in 8..{MAX_SIDE}",
                            f"pass a multiple of 8 such as {min(MAX_SIDE, max(8, v // 8 * 8))}")


def resolve_settings(model, prompt: str, steps: int | None = None, guidance: float | None = None,
                     width: int | None = None, height: int | None = None, negative_prompt: str = "") -> GenSettings:
    """Fill unset options from the model's defaults (its ``frag.json``), else from the pipeline's config."""
    check_options(steps, guidance, width, height)
    d = model.defaults
    pipe = model.pipe
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(getattr(model.denoiser, "config", None), "sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    steps = steps if steps is not None else int(d.get("default_steps", 30))
    guidance = guidance if guidance is not None else float(d.get("default_guidance", 7.5))
    width = width if width is not None else int(d.get("width", sample * scale))
    height = height if height is not None else int(d.get("height", sample * scale))
    check_options(steps, guidance, width, height)
    train_steps = getattr(getattr(pipe.scheduler, "config", None), "num_train_timesteps", None)
    if isinstance(train_steps, int) and steps > train_steps:
        raise FragError(f"--steps {steps} is more than this scheduler's {train_steps} training timesteps",
                        f"pass --steps {train_steps} or fewer")
    for label, v in (("--width", width), ("--height", height)):
        if v < 8 or v % 8:
            raise FragError(f"{label} {v} is not a positive multiple of 8", f"pass a multiple of 8 such as {max(8, v // 8 * 8)}")
    if guidance < 0:
        raise FragError(f"--guidance {guidance} is negative", "pass 0 (no guidance) or more")
    warn_if_truncated(pipe, prompt)
    return GenSettings(check_prompt(prompt), steps, float(guidance), width, height, negative_prompt or "")


def warn_if_truncated(pipe, prompt: str) -> int | None:
    """Warn when the prompt is longer than the text encoder's window (the pipeline would cut it silently);
    returns the token count, or None when the pipeline has no tokenizer frag can ask."""
    tok = getattr(pipe, "tokenizer", None)
    limit = getattr(tok, "model_max_length", None)
    if tok is None or not isinstance(limit, int) or limit > 100_000:
        return None
    n = len(tok(prompt, truncation=False).input_ids)
    if n > limit:
        from fragcli.console import warn

        warn(f"the prompt is {n} tokens; the text encoder reads the first {limit}, the rest is ignored")
    return n


def generator_for(seed: int, device: str):
    import torch

    gen_device = "cpu" if device == "mps" else device
    return torch.Generator(gen_device).manual_seed(int(seed))


def call_options(pipe) -> dict:
    """Keyword arguments that make every pipeline generate what was asked: resolution binning off (PixArt would
    render 64x64 at 256x256 and resize)."""
    import inspect

    pipe = getattr(pipe, "_pipe", pipe)  # a peer's wrapper (fragcli.peers.PeerPipe): the pipeline it calls
    params = inspect.signature(type(pipe).__call__).parameters
    return {"use_resolution_binning": False} if "use_resolution_binning" in params else {}


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def run_batch(pipe, s: GenSettings, seeds: list[int], device: str, prompt: str | None = None,
              on_step: Callable[[], None] | None = None):
    """One pipeline call for ``seeds`` (one generator per image, so an image does not depend on its batch).

    ``on_step`` is called after every denoiser call. Without a negative prompt none is passed, so each pipeline
    uses its own default (SDXL: zeroed negative embeddings, ``force_zeros_for_empty_prompt``; PixArt: ``""``).
    """
    import torch

    kwargs = call_options(pipe)
    if s.negative_prompt:
        kwargs["negative_prompt"] = [s.negative_prompt] * len(seeds)
    handle = None
    if on_step is not None:
        den = denoiser_of(pipe)
        if den is not None:
            handle = den.register_forward_hook(lambda _module, _args, _out: on_step())
    n = len(seeds)
    try:
        with torch.inference_mode():
            out = pipe(
                prompt=[prompt or s.prompt] * n,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                width=s.width,
                height=s.height,
                generator=[generator_for(seed, device) for seed in seeds],
                output_type="pil",
                **kwargs,
            )
    finally:
        if handle is not None:
            handle.remove()
    return out.images


@dataclass
class GenResult:
    images: dict  # seed -> PIL image
    seconds: dict  # seed -> seconds (a batch's time split evenly over its images)
    total_s: float

    @property
    def images_per_min(self) -> float:
        return 60.0 * len(self.images) / self.total_s if self.total_s > 0 else float("nan")


def generate(pipe, s: GenSettings, seeds: list[int], device: str, batch_size: int = 1, prompt: str | None = None,
             advance: Callable[[int], None] | None = None) -> GenResult:
    """Generate one image per seed in batches; ``advance(n)`` is called after every denoising step of a batch."""
    images, seconds = {}, {}
    start = time.perf_counter()
    for i in range(0, len(seeds), batch_size):
        batch = seeds[i : i + batch_size]
        t0 = time.perf_counter()
        step = (lambda n=len(batch): advance(n)) if advance else None
        for seed, img in zip(batch, run_batch(pipe, s, batch, device, prompt, step), strict=True):
            images[seed] = img
        dt = time.perf_counter() - t0
        seconds.update({seed: dt / len(batch) for seed in batch})
    return GenResult(images, seconds, time.perf_counter() - start)
