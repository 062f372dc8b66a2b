"""Peak memory of one side of a benchmark (the full model or the fragment), measured in a fresh process.

RSS never shrinks much once a process has held a model, so a process that has loaded both sides cannot say what
either needs alone: ``probe(request)`` runs ``python -m fragcli.memory_probe REQUEST.json RESULT.json`` (one
torch thread), which

1. loads the side (full: ``load_model``; fragment: ``open_fragment``, which streams the base model where it can)
   and records the load peak (VmHWM: the RSS high-water mark since the process started, imports included);
2. frees what it can (``gc.collect``, glibc ``malloc_trim(0)``) and, for each VAE decode mode (plain,
   ``vae.enable_tiling()``, ``vae.enable_slicing()``: diffusers' own), resets the high-water mark (Linux: "5" into
   /proc/self/clear_refs), decodes latents of the bench's size and reads the mark again;
3. picks the decode mode (``auto``: the one that lowers the decode peak, if any), frees, resets the mark, records
   the current RSS, generates the bench's settings for a few seeds and reads the mark: the peak while generating.

On CUDA the same windows are also measured as ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. Where the mark cannot be reset the record says so (``peak_kind``
"rss_hwm_since_start": every peak then includes the load).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragcli.errors import FragError

DecodeMode = Literal["plain", "tiled", "sliced"]
DECODE_MODES: tuple[str, ...] = ("plain", "tiled", "sliced")
DECODE_CHOICES: tuple[str, ...] = (*DECODE_MODES, "auto")
LOWER_BY = 0.05  # a decode mode "lowers the peak" when it applies and its rise is at least 5% and at least
MIN_GAIN = 4 * 2**20  # 4 MiB below plain's (below that, RSS noise: allocator arenas, page granularity)
ROUNDS = 2  # decodes per mode


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProbeRequest(_Strict):
    """What a probe process loads and generates (written to REQUEST.json by the bench)."""

    side: Literal["full", "fragment"]
    model: str = Field(description="the base model spec")
    fragment: str | None = Field(None, description="the fragment folder (side 'fragment')")
    device: str
    dtype: str
    prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    negative_prompt: str = ""
    seeds: list[int]
    batch_size: int = 1
    decode: Literal["plain", "tiled", "sliced", "auto"] = "plain"


class DecodeTry(_Strict):
    """One VAE decode of latents of the bench's size, in one mode, in the probe process."""

    applies: bool = Field(description="the mode changes what diffusers does at this size: tiling only when the "
                                      "latents exceed the VAE's tile (tile_latent_min_size), slicing only for a "
                                      "batch of more than one")
    peak_bytes: int | None = Field(description="RSS high-water mark during the decode")
    rise_bytes: int | None = Field(description="peak_bytes - RSS just before the decode")
    cuda_peak_bytes: int | None = Field(None, description="torch.cuda.max_memory_allocated during the decode")
    cuda_rise_bytes: int | None = Field(None, description="cuda_peak_bytes - CUDA allocated bytes before it")
    seconds: float = Field(description="wall seconds of the decode")


class DecodeMemory(_Strict):
    """VAE decode peaks: plain against diffusers' tiling and slicing, at the bench's resolution and batch."""

    latent_shape: list[int] = Field(description="[batch, channels, height, width] of the decoded latents")
    tile_latent_min_size: int | None = Field(None, description="the VAE's tile size in latent pixels (tiling "
                                                               "splits only larger latents)")
    tries: dict[str, DecodeTry] = Field(description=f"plain | tiled | sliced -> its decode (after one warm-up "
                                                    f"decode; the lowest of {ROUNDS} tries, taken in turn)")
    lowest: DecodeMode = Field(description="the mode with the lowest decode rise (CUDA: allocated-bytes rise) among "
                                           f"those that apply and lower plain's by at least {LOWER_BY:.0%} and "
                                           f"{MIN_GAIN // 2**20} MiB; 'plain' when none does")
    used: DecodeMode = Field(description="the mode the probe then generated with (the request's; 'auto' = lowest)")
    unavailable: str | None = Field(None, description="why a mode could not be tried (e.g. no VAE)")


class ProbeResult(_Strict):
    """One side's memory, measured in a fresh process (``python -m fragcli.memory_probe``)."""

    side: Literal["full", "fragment"]
    pid: int = Field(description="the probe process's id (a fresh process, not the bench's)")
    device: str
    dtype: str
    threads: int = Field(description="torch CPU threads in the probe process")
    peak_kind: Literal["rss_hwm", "rss_hwm_since_start"] = Field(
        description="rss_hwm: VmHWM reset before each window (Linux clear_refs); rss_hwm_since_start: the mark "
                    "could not be reset, every peak includes what came before")
    hwm_reset: bool = Field(description="the RSS high-water mark could be reset")
    malloc_trim: bool = Field(description="glibc malloc_trim(0) ran before each window")
    rss_after_import_bytes: int | None = Field(description="RSS once python, torch and frag are imported, nothing "
                                                           "loaded")
    load_peak_bytes: int | None = Field(description="VmHWM after loading the side (imports included)")
    load_cuda_peak_bytes: int | None = Field(None, description="CUDA max allocated while loading")
    rss_before_generate_bytes: int | None = Field(description="current RSS just before generating (after freeing)")
    generate_peak_bytes: int | None = Field(description="VmHWM while generating the seeds (the process's peak)")
    generate_rise_bytes: int | None = Field(description="generate_peak_bytes - rss_before_generate_bytes")
    cuda_before_generate_bytes: int | None = Field(None, description="CUDA allocated bytes just before generating")
    generate_cuda_peak_bytes: int | None = Field(None, description="CUDA max allocated while generating")
    resident_bytes: int = Field(description="weight bytes of the loaded side's torch components (as the bench's)")
    seeds: list[int] = Field(description="the seeds generated")
    batch_size: int
    decode: DecodeMemory | None = Field(None, description="VAE decode peaks; null: the pipeline has no VAE")
    load_s: float = Field(description="wall seconds of the load")
    generate_s: float = Field(description="wall seconds of the generation")


# ----------------------------------------------------------------------------------------------- parent side


def probe(request: ProbeRequest) -> ProbeResult:
    """Run ``request`` in a fresh python process (one torch thread); FragError when it fails."""
    import fragcli

    root = str(Path(fragcli.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FRAG_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="frag-probe-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(request.model_dump_json())
        proc = subprocess.run([sys.executable, "-m", "fragcli.memory_probe", str(req), str(res)], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0 or not res.is_file():
            lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            why = lines[-1].strip().removeprefix("error: ") if lines else f"exit status {proc.returncode}"
            raise FragError(f"the memory probe of the {request.side} side failed: {why[:300]}",
                            "fix the cause, or pass --no-memory to skip the memory probes")
        try:
            return ProbeResult.model_validate_json(res.read_text())
        except ValidationError as exc:
            raise FragError(f"the memory probe of the {request.side} side returned an invalid result "
                            f"({exc.errors()[0]['msg']})", "re-run; pass --no-memory to skip the probes") from None


# ------------------------------------------------------------------------------------------------ probe side


def _load(req: ProbeRequest):
    from fragcli.models import load_model

    if req.side == "full":
        return load_model(req.model, req.device, req.dtype)
    from fragcli.loading import open_fragment

    return open_fragment(req.fragment, model=req.model, device=req.device, dtype=req.dtype)


class _Window:
    """RSS high-water mark (and CUDA max allocated) over a ``with`` block, after freeing what can be freed."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self) -> _Window:
        import torch

        from fragcli.memory import proc_status, release_memory, reset_hwm

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self.trimmed = release_memory()
        self.reset = reset_hwm()
        self.rss0 = proc_status()["rss"]
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = int(torch.cuda.memory_allocated())
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        from fragcli.memory import proc_status

        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_peak = int(torch.cuda.max_memory_allocated())
        self.seconds = time.perf_counter() - self.t0
        self.peak = proc_status()["hwm"]

    @property
    def rise(self) -> int | None:
        return None if self.peak is None or self.rss0 is None else max(0, self.peak - self.rss0)


def set_decode(vae, mode: str) -> None:
    """Put a VAE in decode ``mode`` (plain | tiled | sliced) with diffusers' own switches."""
    if hasattr(vae, "disable_tiling"):
        vae.disable_tiling()
    if hasattr(vae, "disable_slicing"):
        vae.disable_slicing()
    if mode == "tiled":
        vae.enable_tiling()
    elif mode == "sliced":
        vae.enable_slicing()


def _cost(t: DecodeTry, cuda: bool) -> float:
    value = t.cuda_rise_bytes if cuda else t.rise_bytes
    return float("inf") if value is None else float(value)


def _decode_memory(loaded, req: ProbeRequest, cuda: bool) -> DecodeMemory | None:
    import torch

    pipe = loaded.pipe
    vae = getattr(pipe, "vae", None)
    if vae is None or not callable(getattr(vae, "decode", None)):
        return None
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    channels = int(getattr(vae.config, "latent_channels", 4))
    shape = [req.batch_size, channels, req.height // scale, req.width // scale]
    param = next(vae.parameters())
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)).to(param.device, param.dtype)
    latents = latents / float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    tile = getattr(vae, "tile_latent_min_size", None)
    applies = {"plain": True, "tiled": tile is not None and max(shape[2:]) > tile, "sliced": shape[0] > 1}
    tries, missing = {}, []
    set_decode(vae, "plain")
    with torch.inference_mode():  # warm-up, not counted: the first decode of a process allocates once-only state
        vae.decode(latents, return_dict=False)
    for _ in range(ROUNDS):  # each mode ROUNDS times, in turn; the lowest of its rises is kept
        for mode in DECODE_MODES:
            if any(m.startswith(f"{mode}:") for m in missing):
                continue
            try:
                set_decode(vae, mode)
            except (NotImplementedError, AttributeError) as exc:
                missing.append(f"{mode}: {exc}")
                continue
            with torch.inference_mode(), _Window(cuda) as w:
                vae.decode(latents, return_dict=False)
            t = DecodeTry(applies=applies[mode], peak_bytes=w.peak, rise_bytes=w.rise, seconds=w.seconds,
                          cuda_peak_bytes=w.cuda_peak if cuda else None,
                          cuda_rise_bytes=(w.cuda_peak - w.cuda0) if cuda else None)
            if mode not in tries or _cost(t, cuda) < _cost(tries[mode], cuda):
                tries[mode] = t
    set_decode(vae, "plain")
    del latents

    lowest = "plain"
    base = _cost(tries["plain"], cuda)
    for mode, t in tries.items():
        c = _cost(t, cuda)
        if mode != "plain" and t.applies and c < min((1 - LOWER_BY) * base, base - MIN_GAIN) \
                and c < _cost(tries[lowest], cuda):
            lowest = mode
    used = lowest if req.decode == "auto" else req.decode
    if used not in tries:
        used = "plain"
    set_decode(vae, used)
    return DecodeMemory(latent_shape=shape, tile_latent_min_size=tile, tries=tries, lowest=lowest, used=used,
                        unavailable="; ".join(missing) or None)


def _import_libraries() -> None:
    """Import what loading a pipeline imports lazily, so that ``rss_after_import_bytes`` holds the libraries and
    the load peak only what the load adds."""
    import contextlib

    with contextlib.suppress(ImportError):
        import diffusers  # noqa: F401
        from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def run(req: ProbeRequest) -> ProbeResult:
    """The measurement itself, in this process (``main`` runs it in a fresh one)."""
    import torch

    from fragcli.generation import generate, resolve_settings
    from fragcli.memory import proc_status, weight_bytes

    torch.set_num_threads(1)
    _import_libraries()
    rss_import = proc_status()["rss"]
    cuda = req.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = _load(req)
    load_s = time.perf_counter() - t0
    load_peak = proc_status()["hwm"]
    load_cuda = int(torch.cuda.max_memory_allocated()) if loaded.device.startswith("cuda") else None
    cuda = loaded.device.startswith("cuda")
    s = resolve_settings(loaded, req.prompt, req.steps, req.guidance, req.width, req.height, req.negative_prompt)
    decode = _decode_memory(loaded, req, cuda)
    with _Window(cuda) as w:
        generate(loaded.pipe, s, list(req.seeds), loaded.device, batch_size=req.batch_size)
    return ProbeResult(
        side=req.side, pid=os.getpid(), device=loaded.device, dtype=loaded.dtype, threads=torch.get_num_threads(),
        peak_kind="rss_hwm" if w.reset else "rss_hwm_since_start", hwm_reset=w.reset, malloc_trim=w.trimmed,
        rss_after_import_bytes=rss_import, load_peak_bytes=load_peak, load_cuda_peak_bytes=load_cuda,
        rss_before_generate_bytes=w.rss0, generate_peak_bytes=w.peak, generate_rise_bytes=w.rise,
        cuda_before_generate_bytes=w.cuda0 if cuda else None, generate_cuda_peak_bytes=w.cuda_peak if cuda else None,
        resident_bytes=weight_bytes(loaded.pipe), seeds=list(req.seeds), batch_size=req.batch_size, decode=decode,
        load_s=load_s, generate_s=w.seconds)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fragcli.memory_probe REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    try:
        req = ProbeRequest.model_validate_json(Path(args[0]).read_text())
        result = run(req)
    except FragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: invalid probe request: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    Path(args[1]).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
