"""`frag profile`: generate with the full model while recording per-head and per-block statistics."""

from __future__ import annotations

import hashlib
import platform
import statistics
import time
from pathlib import Path

from fragcli import __version__
from fragcli.console import progress
from fragcli.generation import GenSettings, run_batch
from fragcli.memory import PeakMemory, weight_bytes
from fragcli.paths import atomic_write_json, staged_dir
from fragcli.profiling.blocks import install_block_stats, install_context_hook, remove_block_stats
from fragcli.profiling.processor import install_profiler, remove_profiler
from fragcli.profiling.recorder import Recorder, arrow_schema
from fragcli.records import ProfileContext


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"frag": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def technique_collectors() -> list:
    """The extra profile signals that the registered techniques declare (deduplicated by name)."""
    from fragcli.techniques import REGISTRY

    seen: dict[str, object] = {}
    for technique in REGISTRY:
        for c in technique.collectors():
            seen.setdefault(c.name, c)
    return list(seen.values())


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
    recorder = Recorder(profiled_steps=set(profiled_steps), sample_rows=None if exact_entropy else 256,
                        scheduler=getattr(pipe, "scheduler", None))
    started = time.perf_counter()

    collectors = technique_collectors()
    for c in collectors:
        recorder.declare(c.table, c.columns)
    install_profiler(den, recorder)
    install_block_stats(den, recorder)
    install_context_hook(den, recorder)
    images, per_seed = {}, []
    try:
        for c in collectors:
            c.install(den, recorder)
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
        for c in collectors:
            if c.remove is not None:
                c.remove(den)
        remove_profiler(den)
        remove_block_stats(den)

    # Overhead: the first seed again without any patch, warm (so the comparison is conservative).
    with progress("plain run (overhead baseline)", s.steps, show_progress) as advance:
        t0 = time.perf_counter()
        run_batch(pipe, s, seeds[:1], device, on_step=advance)
        plain_s = time.perf_counter() - t0

    timesteps = [float(t) for t in getattr(pipe.scheduler, "timesteps", [])]
    tables = {name: pa.table(recorder.tables[name], schema=arrow_schema(cols)) for name, cols in recorder.columns.items()}
    context = ProfileContext(
        model=model.describe(), prompt=s.prompt, negative_prompt=s.negative_prompt,
        text_embedding_hash=_tensor_hash(recorder.first_context), seeds=seeds, steps=s.steps,
        profiled_steps=sorted(profiled_steps), timesteps=timesteps, guidance=s.guidance, width=s.width,
        height=s.height, scheduler=type(pipe.scheduler).__name__, exact_entropy=exact_entropy, versions=versions(),
        timings={"total_s": time.perf_counter() - started, "per_seed_s": per_seed, "plain_first_seed_s": plain_s,
                 "profiled_first_seed_s": per_seed[0],
                 "overhead_ratio": statistics.median(per_seed) / plain_s if plain_s > 0 else None},
        memory={**peak.as_dict(), "weight_bytes": weight_bytes(pipe)},
        rows={name: t.num_rows for name, t in tables.items()},
        images={str(seed): f"images/seed-{seed}.png" for seed in seeds}, settings=s.as_dict(),
    ).dump()
    with staged_dir(out) as tmp:
        (tmp / "images").mkdir()
        for seed, img in images.items():
            img.save(tmp / "images" / f"seed-{seed}.png")
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        atomic_write_json(tmp / "context.json", context)
    return context
