"""`frag bench`: the full model and a fragment side by side, in ONE process, interleaved; written as bench.json.

Every contender (``runs``: the full model, the fragment, and each installed peer of ``--peers`` on its own copy of
the full model, ``fragcli.peers``) stays loaded; the variants (seeds of the fragment's prompt) run in chunks of ``batch_size`` in the order A B, B A, ...
(ABBA; with more contenders the order is reversed on every other chunk) so that drift on a shared machine hits all
alike. The whole interleaved run is repeated ``repeats`` times; every number is a median over the repeats, with its
range. Per contender: wall time per image, images/minute, resident weight bytes, the activation peak (peak RSS, or
CUDA allocated memory, above what was resident when the chunk started), and its ratios against the ``baseline``
(the full model), and (``fidelity``) its first repeat's images against the full model's with frag validate's
metrics. H4 reads the fragment's ``speedup``, H5 its ``break_even_images`` (and ``break_even_images_marginal``,
which credits the profile's own full-model images).

Memory, side by side (since schema_version 3): every torch component of each pipeline with its device, dtypes, bytes and
parameters (an evicted text encoder: 0 bytes, ``evicted``), their sum ``resident_bytes`` (H2's weight reduction),
the on-disk size (the fragment's artifacts; the base model's weight files), and, unless ``memory=False``, each
side's peaks measured in a fresh process (``fragcli.memory_probe``: the load peak, the peak while generating, and
the VAE decode peak plain / tiled / sliced), run one side after the other before the timing run. The probes'
generation peaks are what ``peak_memory_reduction`` and the manifest's ``peak_vram_*`` hold (``peak_kind``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from fragcli.bench_schema import (  # noqa: F401 - re-exported: the record's names live beside the measuring
    BASELINE,
    FRAGMENT,
    SCHEMA_VERSION,
    TYPE,
    BenchRecord,
    ComponentInfo,
    ModelRef,
    Ratios,
    RunStats,
    SideMemory,
    _peak,
    performance_block,
    read_bench,
)
from fragcli.errors import FragError
from fragcli.memory_probe import DECODE_CHOICES, ProbeResult

PROBE_IMAGES = 2  # images each memory probe generates (at least one batch)


def _chunk_stats(model, s, seeds, advance) -> tuple[float, int, int | None, dict]:
    import psutil
    import torch

    from fragcli.generation import generate
    from fragcli.memory import PeakMemory

    cuda = model.device.startswith("cuda")
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    rss0 = psutil.Process().memory_info().rss
    with PeakMemory(model.device) as peak:
        res = generate(model.pipe, s, seeds, model.device, batch_size=len(seeds), advance=advance)
    act = (peak.cuda_peak - start_alloc) if cuda else max(0, peak.peak_rss - rss0)
    return res.total_s, act, peak.cuda_peak, res.images


def _interleaved(models: dict[str, Any], s, variants: int, batch_size: int, repeats: int, advance) -> dict[str, dict]:
    """Times per repeat and activation/CUDA peaks of every contender, run ABBA-interleaved after one warm-up each."""
    names = list(models)
    seeds = list(range(variants))
    chunks = [seeds[i : i + batch_size] for i in range(0, variants, batch_size)]
    out = {n: {"times": [], "act": 0, "cuda": None, "images": {}} for n in names}
    for name in names:  # warm-up, not counted
        _chunk_stats(models[name], s, [10_000], advance)
    for r in range(repeats):
        rep = dict.fromkeys(names, 0.0)
        for i, chunk in enumerate(chunks):
            for name in names if (i + r) % 2 == 0 else names[::-1]:
                t, a, c, images = _chunk_stats(models[name], s, chunk, advance)
                if r == 0:
                    out[name]["images"].update(images)
                rep[name] += t
                out[name]["act"] = max(out[name]["act"], a)
                if c is not None:
                    out[name]["cuda"] = max(out[name]["cuda"] or 0, c)
        for name in names:
            out[name]["times"].append(rep[name])
    return out


def _stats(kind: str, description: str, m: dict, pipe, variants: int) -> RunStats:
    from fragcli.memory import components, param_count, weight_bytes

    per = [t / variants for t in m["times"]]
    median = statistics.median(per)
    wb = weight_bytes(pipe)
    comps = {name: ComponentInfo(**c) for name, c in components(pipe).items()}
    return RunStats(kind=kind, description=description, repeats_total_s=m["times"], total_s=statistics.median(m["times"]),
                    per_image_s=median, per_image_s_range=(min(per), max(per)),
                    images_per_min=60.0 / median if median > 0 else None, weight_bytes=wb,
                    activation_peak_bytes=m["act"], peak_bytes_est=wb + m["act"], cuda_peak_bytes=m["cuda"],
                    params=param_count(pipe), components=comps, resident_bytes=sum(c.bytes for c in comps.values()))


def _ratios(run: RunStats, base: RunStats, kind: str) -> Ratios:
    per = [b / t for b, t in zip(base.repeats_total_s, run.repeats_total_s, strict=True)]
    resident = run.resident_bytes if run.resident_bytes is not None else run.weight_bytes
    base_resident = base.resident_bytes if base.resident_bytes is not None else base.weight_bytes
    peak, base_peak = _peak(run, kind), _peak(base, kind)
    if peak is None or not base_peak:
        raise FragError(f"no {kind} peak was measured for the {run.kind} side", "pass --no-memory, or re-run")
    return Ratios(speedup=statistics.median(per), speedup_range=(min(per), max(per)), speedup_per_repeat=per,
                  weight_reduction=1 - resident / base_resident, peak_memory_reduction=1 - peak / base_peak)


def _median(values: list[int | None]) -> int | None:
    got = [v for v in values if v is not None]
    return int(statistics.median(got)) if got else None


def side_memory(probes: list[ProbeResult]) -> SideMemory:
    """One side's probe runs summarised (medians; the first run's decode)."""
    cuda = probes[0].device.startswith("cuda")
    kind = "cuda_max_allocated" if cuda else (
        "rss_hwm" if all(p.peak_kind == "rss_hwm" for p in probes) else "rss_hwm_since_start")
    gen = _median([p.generate_peak_bytes for p in probes])
    gen_cuda = _median([p.generate_cuda_peak_bytes for p in probes])
    peak = gen_cuda if cuda else gen
    if peak is None:
        raise FragError(f"the memory probe of the {probes[0].side} side measured no peak on {probes[0].device}",
                        "pass --no-memory on this system")
    above = _median([None if p.generate_peak_bytes is None or p.rss_after_import_bytes is None
                     else p.generate_peak_bytes - p.rss_after_import_bytes for p in probes])
    return SideMemory(peak_kind=kind, peak_bytes=peak, load_peak_bytes=_median([p.load_peak_bytes for p in probes]),
                      rss_after_import_bytes=_median([p.rss_after_import_bytes for p in probes]),
                      generate_above_import_bytes=above,
                      rss_before_generate_bytes=_median([p.rss_before_generate_bytes for p in probes]),
                      generate_peak_bytes=gen, generate_cuda_peak_bytes=gen_cuda, decode=probes[0].decode,
                      probes=probes)


def check_bench_args(variants: int, batch_size: int, repeats: int, steps: int | None, *, memory: bool = True,
                     memory_repeats: int = 1, decode: str = "plain") -> None:
    for name, value in (("--variants", variants), ("--batch-size", batch_size), ("--repeats", repeats),
                        ("--memory-repeats", memory_repeats)):
        if value < 1:
            raise FragError(f"{name} must be at least 1 (got {value})", f"pass {name} 1 or more")
    if steps is not None and steps < 1:
        raise FragError(f"--steps must be at least 1 (got {steps})", "pass --steps 1 or more")
    if decode not in DECODE_CHOICES:
        raise FragError(f"--decode {decode!r} is not one of {', '.join(DECODE_CHOICES)}",
                        "pass --decode plain (default), tiled, sliced or auto")
    if decode == "auto" and not memory:
        raise FragError("--decode auto picks the VAE decode from the memory probes, which --no-memory skips",
                        "drop --no-memory, or pass --decode plain, tiled or sliced")


def _probe_sides(spec: str, fragment_dir: Path, manifest, steps: int | None, variants: int, batch_size: int,
                 device: str, dtype: str, memory_repeats: int, decode: str,
                 show_progress: bool) -> dict[str, list[ProbeResult]]:
    """Each side in a fresh process, one after the other (full, fragment), ``memory_repeats`` times."""
    from fragcli.console import progress
    from fragcli.memory_probe import ProbeRequest, probe

    g = manifest.profiling
    n = min(variants, max(PROBE_IMAGES, batch_size))
    common = {"model": spec, "device": device, "dtype": dtype, "prompt": g.prompt, "steps": steps or g.steps,
              "guidance": g.guidance, "width": g.width, "height": g.height, "negative_prompt": g.negative_prompt,
              "seeds": list(range(n)), "batch_size": min(batch_size, n)}
    requests = {BASELINE: ProbeRequest(side="full", decode="plain", **common),
                FRAGMENT: ProbeRequest(side="fragment", fragment=str(fragment_dir), decode=decode, **common)}
    out: dict[str, list[ProbeResult]] = {name: [] for name in requests}
    with progress(f"memory probes (a fresh process per side, {memory_repeats} run(s))", len(requests) * memory_repeats,
                  show_progress) as adv:
        for _ in range(memory_repeats):
            for name, req in requests.items():
                out[name].append(probe(req))
                adv(1)
    return out


def _load_peers(asked, spec, device, dtype, s, models, unavailable) -> dict:
    """Each installed peer on its own copy of the full model, added to ``models``; the others in ``unavailable``.
    Returns peer name -> its real pipeline (for the weight and component numbers)."""
    from types import SimpleNamespace

    from fragcli.peers import load_peer

    pipes = {}
    for peer in asked:
        why = peer.missing()
        if why is None:
            try:
                loaded, call = load_peer(peer, spec, device, dtype, s)
            except FragError as exc:
                why = exc.one_line()
            else:
                models[peer.name] = SimpleNamespace(pipe=call, device=loaded.device)
                pipes[peer.name] = loaded.pipe
                continue
        unavailable[f"runs.{peer.name}"] = why
    return pipes


def _peer_info(peer) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version(peer.dist)
    except PackageNotFoundError:
        v = None
    return {"package": peer.dist, "version": v, "params": peer.params}


def _fidelity(full, runs: dict, measured: dict, prompt: str, show_progress: bool) -> None:
    """Every contender's images against the full model's, with frag validate's metrics and per-image gates."""
    from fragcli.console import progress
    from fragcli.thresholds import load_thresholds
    from fragcli.validation import fidelity, quality_metrics

    metrics = quality_metrics(full)
    th = load_thresholds(None)
    ref = measured[BASELINE]["images"]
    others = [n for n in runs if n != BASELINE]
    with progress("fidelity against the full model", len(others), show_progress) as adv:
        for name in others:
            seeds = sorted(ref)
            runs[name].fidelity, _ = fidelity(ref, measured[name]["images"], seeds, prompt, metrics, th)
            adv(1)


def _disk_bytes(full, manifest) -> tuple[int | None, int]:
    from fragcli.memory import disk_weight_bytes

    return disk_weight_bytes(full.folder), sum(a.bytes for a in manifest.artifacts.values())


def run_bench(fragment_dir: Path, variants: int = 32, batch_size: int = 1, repeats: int = 3, model: str | None = None,
              device: str = "auto", dtype: str = "auto", steps: int | None = None,
              show_progress: bool = True, *, memory: bool = True, memory_repeats: int = 1,
              decode: str = "plain", peers: str | None = None, fidelity: bool = True) -> BenchRecord:
    """Benchmark ``fragment_dir`` against its base model (and ``peers``, e.g. "deepcache,tgate"; see
    ``fragcli.peers``); returns the record (nothing is written).

    ``memory``: measure each side's peaks in a fresh process first (``fragcli.memory_probe``), ``memory_repeats``
    times; ``decode``: the fragment side's VAE decode (plain | tiled | sliced | auto: the one its probe found
    lowering the decode peak); ``fidelity``: compare every contender's images with the full model's (CLIP delta
    with the model's judge, SSIM, pHash; LPIPS where its weights exist)."""
    import torch

    from fragcli import __version__
    from fragcli.console import progress
    from fragcli.fragment import verify_fragment
    from fragcli.generation import resolve_settings
    from fragcli.loading import open_fragment
    from fragcli.memory_probe import set_decode
    from fragcli.models import load_model
    from fragcli.peers import resolve_peers
    from fragcli.profiling.run import versions

    check_bench_args(variants, batch_size, repeats, steps, memory=memory, memory_repeats=memory_repeats,
                     decode=decode)
    asked = resolve_peers(peers)
    fragment_dir = Path(fragment_dir).resolve()
    manifest = verify_fragment(fragment_dir, None)
    spec = model or manifest.base_model.spec
    probes = None
    if memory:  # first, while this process holds no model
        probes = _probe_sides(spec, fragment_dir, manifest, steps, variants, batch_size, device, dtype,
                              memory_repeats, decode, show_progress)
    full = load_model(spec, device, dtype)
    frag = open_fragment(fragment_dir, model=spec, device=device, dtype=dtype)
    decode_used = "plain" if decode == "auto" else decode
    if probes is not None and decode == "auto" and probes[FRAGMENT][0].decode is not None:
        decode_used = probes[FRAGMENT][0].decode.used
    if getattr(frag.pipe, "vae", None) is None:
        decode_used = "plain"
    else:
        try:
            set_decode(frag.pipe.vae, decode_used)
        except (NotImplementedError, AttributeError):
            raise FragError(f"this model's VAE ({type(frag.pipe.vae).__name__}) has no {decode_used} decode",
                            "pass --decode plain or auto") from None
    g = manifest.profiling
    s = resolve_settings(full, g.prompt, steps or g.steps, g.guidance, g.width, g.height, g.negative_prompt)
    models: dict[str, Any] = {BASELINE: full, FRAGMENT: frag}
    unavailable: dict[str, str] = {}
    peer_pipes = _load_peers(asked, spec, device, dtype, s, models, unavailable)
    total = (len(models) + len(models) * variants * repeats) * s.steps
    label = ", ".join(models)
    with progress(f"benchmark ({label}; interleaved, {repeats} repeat(s))", total, show_progress) as adv:
        measured = _interleaved(models, s, variants, batch_size, repeats, adv)
    base_disk, frag_disk = _disk_bytes(full, manifest)
    base = _stats("full", f"{full.name} (full model)", measured[BASELINE], full.pipe, variants)
    runs = {BASELINE: base,
            FRAGMENT: _stats("fragment", manifest.name, measured[FRAGMENT], frag.pipe, variants)}
    base.disk_bytes, runs[FRAGMENT].disk_bytes = base_disk, frag_disk
    for peer in asked:
        if peer.name in peer_pipes:
            runs[peer.name] = _stats("peer", peer.description, measured[peer.name], peer_pipes[peer.name], variants)
            runs[peer.name].peer = _peer_info(peer)
    if base_disk is None:
        unavailable["runs.full.disk_bytes"] = f"{full.name} is built in memory"
    if probes is not None:
        for name in (BASELINE, FRAGMENT):
            runs[name].memory = side_memory(probes[name])
        kinds = {runs[name].memory.peak_kind for name in (BASELINE, FRAGMENT)}
        kind = kinds.pop() if len(kinds) == 1 else "rss_hwm_since_start"
    else:
        kind = "weights_plus_rss" if base.cuda_peak_bytes is None else "cuda_max_allocated"
        unavailable["memory"] = "the memory probes were skipped (--no-memory): peaks are from the timing run"
    in_process = "weights_plus_rss" if base.cuda_peak_bytes is None else "cuda_max_allocated"
    for name, run in runs.items():
        if name != BASELINE:  # peers have no probe: their peaks compare with the timing run's
            run.vs_baseline = _ratios(run, base, kind if run.kind == "fragment" else in_process)
    if fidelity:
        _fidelity(full, runs, measured, s.prompt, show_progress)
    else:
        unavailable["fidelity"] = "not measured (--no-fidelity)"
    x = runs[FRAGMENT]
    ratios = x.vs_baseline
    costs = manifest.costs
    saved = base.per_image_s - x.per_image_s
    kept = len(manifest.profiling.seeds)  # the profile's full-model images, which the user keeps
    marginal = max(0.0, costs.profile_s + costs.extract_s - kept * base.per_image_s) / saved if saved > 0 else None
    return BenchRecord(
        frag_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=ModelRef(name=full.name, hash=full.hash), fragment_path=str(fragment_dir), fragment_name=manifest.name,
        techniques=[t.name for t in manifest.techniques], device=full.device, dtype=full.dtype,
        threads=torch.get_num_threads(), variants=variants, batch_size=batch_size, repeats=repeats, prompt=s.prompt,
        steps=s.steps, width=s.width, height=s.height, runs=runs, speedup=ratios.speedup,
        speedup_range=ratios.speedup_range, weight_reduction=ratios.weight_reduction,
        peak_memory_reduction=ratios.peak_memory_reduction, peak_kind=kind,
        peak_source="probe" if probes is not None else "in_process",
        memory_probes=memory_repeats if probes is not None else 0, decode=decode, decode_used=decode_used,
        unavailable=unavailable, profile_cost_s=costs.profile_s, extract_cost_s=costs.extract_s,
        break_even_images=(costs.profile_s + costs.extract_s) / saved if saved > 0 else None,
        break_even_images_marginal=marginal, profile_images=kept, peers=[p.name for p in asked], versions=versions())


def write_bench(record: BenchRecord, out: Path, fragment_dir: Path | None = None) -> Path:
    """``out``/bench.json, atomically (the folder is staged and swapped in); with ``fragment_dir``, also the
    manifest's performance block. Returns the bench.json path."""
    from fragcli.manifest import update_manifest
    from fragcli.paths import atomic_write_json, staged_dir

    out = Path(out)
    with staged_dir(out) as tmp:
        atomic_write_json(tmp / "bench.json", record.dump())
    if fragment_dir is not None:
        update_manifest(Path(fragment_dir), performance=performance_block(record))
    return out / "bench.json"
