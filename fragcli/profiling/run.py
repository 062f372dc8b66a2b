"""`frag profile`: generate with the full model while recording per-head and per-block statistics."""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path

from fragcli import __version__
from fragcli.console import progress
from fragcli.generation import GenSettings, run_batch
from fragcli.memory import PeakMemory, weight_bytes
from fragcli.paths import atomic_write_json, staged_dir
from fragcli.profiling.blocks import install_block_stats, install_context_hook, remove_block_stats
from fragcli.profiling.processor import install_profiler, remove_profiler
from fragcli.profiling.recorder import BLOCK_COLUMNS, HEAD_COLUMNS, Recorder


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"frag": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def head_schema():
    import pyarrow as pa

    types = {"module": pa.string(), "block": pa.string(), "kind": pa.string(), "head": pa.int32(),
             "heads": pa.int32(), "seed": pa.int64(), "step": pa.int32(), "timestep": pa.float64(),
             "energy_pre": pa.float64(), "energy_post": pa.float64(), "entropy": pa.float64()}
    return pa.schema([(c, types[c]) for c in HEAD_COLUMNS])


def block_schema():
    import pyarrow as pa

    types = {"block": pa.string(), "block_type": pa.string(), "seed": pa.int64(), "step": pa.int32(),
             "timestep": pa.float64(), "rel_update": pa.float64(), "cos_prev": pa.float64()}
    return pa.schema([(c, types[c]) for c in BLOCK_COLUMNS])


def _tensor_hash(t) -> str | None:
    if t is None:
        return None
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def run_profile(model, s: GenSettings, seeds: list[int], profiled_steps: list[int], out: Path,
                exact_entropy: bool = False, show_progress: bool = True) -> dict:
    """Profile ``seeds`` and write profile.parquet, blocks.parquet, context.json and images/ into ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pipe, den, device = model.pipe, model.denoiser, model.device
    recorder = Recorder(profiled_steps=set(profiled_steps), sample_rows=None if exact_entropy else 256)
    started = time.perf_counter()

    install_profiler(den, recorder)
    install_block_stats(den, recorder)
    install_context_hook(den, recorder)
    images, per_seed = {}, []
    try:
        with PeakMemory(device) as peak, progress("profiling seeds x steps", len(seeds) * s.steps, show_progress) as adv:
            for seed in seeds:
                recorder.start_seed(seed)

                def step_done():
                    recorder.step += 1
                    adv()

                recorder.step = 0
                t0 = time.perf_counter()
                images[seed] = run_batch(pipe, s, [seed], device, on_step=step_done)[0]
                per_seed.append(time.perf_counter() - t0)
    finally:
        remove_profiler(den)
        remove_block_stats(den)

    # Overhead: the first seed again without any patch, warm (so the comparison is conservative).
    with progress("plain run (overhead baseline)", s.steps, show_progress) as advance:
        t0 = time.perf_counter()
        run_batch(pipe, s, seeds[:1], device, on_step=advance)
        plain_s = time.perf_counter() - t0

    timesteps = [float(t) for t in getattr(pipe.scheduler, "timesteps", [])]
    heads = pa.table({c: recorder.heads[c] for c in HEAD_COLUMNS}, schema=head_schema())
    blocks = pa.table({c: recorder.blocks[c] for c in BLOCK_COLUMNS}, schema=block_schema())
    context = {
        "_type": "frag.profile",
        "schema_version": 1,
        "model": model.describe(),
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "text_embedding_hash": _tensor_hash(recorder.first_context),
        "seeds": seeds,
        "steps": s.steps,
        "profiled_steps": sorted(profiled_steps),
        "timesteps": timesteps,
        "guidance": s.guidance,
        "width": s.width,
        "height": s.height,
        "scheduler": type(pipe.scheduler).__name__,
        "exact_entropy": exact_entropy,
        "versions": versions(),
        "timings": {
            "total_s": time.perf_counter() - started,
            "per_seed_s": per_seed,
            "plain_first_seed_s": plain_s,
            "profiled_first_seed_s": per_seed[0],
            "overhead_ratio": per_seed[0] / plain_s if plain_s > 0 else None,
        },
        "memory": {**peak.as_dict(), "weight_bytes": weight_bytes(pipe)},
        "rows": {"profile": heads.num_rows, "blocks": blocks.num_rows},
        "images": {str(seed): f"images/seed-{seed}.png" for seed in seeds},
        "settings": s.as_dict(),
    }
    with staged_dir(out) as tmp:
        (tmp / "images").mkdir()
        for seed, img in images.items():
            img.save(tmp / "images" / f"seed-{seed}.png")
        pq.write_table(heads, tmp / "profile.parquet")
        pq.write_table(blocks, tmp / "blocks.parquet")
        atomic_write_json(tmp / "context.json", context)
    return context
