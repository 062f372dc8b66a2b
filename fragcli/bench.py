"""Side-by-side benchmark of the full model and a fragment, in ONE process, interleaved (tools/bench.py).

Both pipelines stay loaded; variants (seeds of the fragment's prompt) run in chunks of ``batch_size`` in the order
full, fragment, fragment, full, ... (ABBA) so that drift on a shared machine hits both alike. Per model it records
wall time per image, images/minute, resident weight bytes, and the activation peak (peak RSS, or CUDA allocated
memory, above what was resident when the chunk started). H4 is the speedup, H5 the break-even image count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from fragcli.errors import FragError


def _chunk_stats(model, s, seeds, advance) -> tuple[float, int, int | None]:
    import torch

    from fragcli.generation import generate
    from fragcli.memory import PeakMemory

    cuda = model.device.startswith("cuda")
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    import psutil

    rss0 = psutil.Process().memory_info().rss
    with PeakMemory(model.device) as peak:
        res = generate(model.pipe, s, seeds, model.device, batch_size=len(seeds), advance=advance)
    act = (peak.cuda_peak - start_alloc) if cuda else max(0, peak.peak_rss - rss0)
    return res.total_s, act, peak.cuda_peak


def run_bench(fragment_dir: Path, variants: int = 32, batch_size: int = 1, repeats: int = 1, model: str | None = None,
              device: str = "auto", dtype: str = "auto", steps: int | None = None, show_progress: bool = True) -> dict:
    from fragcli.console import progress
    from fragcli.fragment import load_fragment, verify_fragment
    from fragcli.generation import resolve_settings
    from fragcli.memory import param_count, weight_bytes
    from fragcli.models import load_model
    from fragcli.profiling.run import versions

    if variants < 1 or batch_size < 1 or repeats < 1:
        raise FragError("--variants, --batch-size and --repeats must be at least 1", "pass positive numbers")
    fragment_dir = Path(fragment_dir).resolve()
    manifest = verify_fragment(fragment_dir, None)
    base = manifest.base_model
    spec = model or base.spec
    full = load_model(spec, device, dtype)
    frag = load_model(spec, device, dtype)
    load_fragment(frag, fragment_dir)
    g = manifest.generation
    s = resolve_settings(full, g.prompt, steps or g.steps, g.guidance, g.width, g.height, g.negative_prompt)
    seeds = list(range(variants))
    chunks = [seeds[i : i + batch_size] for i in range(0, variants, batch_size)]
    times = {"full": [], "fragment": []}
    act = {"full": 0, "fragment": 0}
    cuda_peak = {"full": None, "fragment": None}
    models = {"full": full, "fragment": frag}
    total = (2 + 2 * variants * repeats) * s.steps
    with progress("benchmark (full and fragment, interleaved)", total, show_progress) as adv:
        for name in ("full", "fragment"):  # warm-up, not counted
            _chunk_stats(models[name], s, [10_000], adv)
        for r in range(repeats):
            rep = {"full": 0.0, "fragment": 0.0}
            for i, chunk in enumerate(chunks):
                order = ("full", "fragment") if (i + r) % 2 == 0 else ("fragment", "full")
                for name in order:
                    t, a, c = _chunk_stats(models[name], s, chunk, adv)
                    rep[name] += t
                    act[name] = max(act[name], a)
                    if c is not None:
                        cuda_peak[name] = max(cuda_peak[name] or 0, c)
            for name in rep:
                times[name].append(rep[name])

    def block(name: str) -> dict:
        total_s = statistics.median(times[name])
        per = total_s / variants
        wb = weight_bytes(models[name].pipe)
        return {"total_s": total_s, "repeats_total_s": times[name], "per_image_s": per,
                "images_per_min": 60.0 / per if per > 0 else None, "weight_bytes": wb,
                "activation_peak_bytes": act[name], "peak_bytes_est": wb + act[name],
                "cuda_peak_bytes": cuda_peak[name], "params": param_count(models[name].pipe)}

    f, x = block("full"), block("fragment")
    costs = manifest.costs
    build_s = float(costs.get("profile_s", 0.0)) + float(costs.get("extract_s", 0.0))
    saved = f["per_image_s"] - x["per_image_s"]
    return {
        "_type": "frag.bench",
        "schema_version": 1,
        "model": {"name": full.name, "hash": full.hash},
        "fragment_path": str(fragment_dir),
        "fragment_name": manifest.name,
        "device": full.device,
        "dtype": full.dtype,
        "variants": variants,
        "batch_size": batch_size,
        "repeats": repeats,
        "prompt": s.prompt,
        "steps": s.steps,
        "width": s.width,
        "height": s.height,
        "full": f,
        "fragment": x,
        "speedup": f["per_image_s"] / x["per_image_s"],
        "weight_reduction": 1 - x["weight_bytes"] / f["weight_bytes"],
        "peak_memory_reduction": 1 - x["peak_bytes_est"] / f["peak_bytes_est"],
        "profile_cost_s": float(costs.get("profile_s", 0.0)),
        "extract_cost_s": float(costs.get("extract_s", 0.0)),
        "break_even_images": build_s / saved if saved > 0 else None,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tools/bench.py",
        description="Benchmark a fragment against its full model side by side, in one process (writes bench.json).",
        epilog="Example: python tools/bench.py fragments/demo --variants 32 --out reports/demo/bench/bench.json",
    )
    ap.add_argument("fragment", type=Path, help="fragment folder (frag extract)")
    ap.add_argument("--variants", type=int, default=32, help="images per model (seeds 0..N-1 of the prompt)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="repeat the whole interleaved run; the median is kept")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the fragment's)")
    ap.add_argument("--model", default=None, help="base model (default: the fragment's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="bench.json path (default: <fragment>/bench.json)")
    ap.add_argument("--no-manifest", action="store_true", help="do not write the performance block into the manifest")
    ap.add_argument("--json", action="store_true", help="print bench.json to stdout")
    args = ap.parse_args(argv)

    from fragcli.console import err, print_json
    from fragcli.manifest import update_manifest
    from fragcli.paths import atomic_write_json

    try:
        result = run_bench(args.fragment, args.variants, args.batch_size, args.repeats, args.model, args.device,
                           args.dtype, args.steps, show_progress=not args.json)
        out = args.out or Path(args.fragment) / "bench.json"
        atomic_write_json(out, result)
        if not args.no_manifest:
            keys = ("speedup", "weight_reduction", "peak_memory_reduction", "break_even_images", "variants", "device")
            update_manifest(Path(args.fragment), performance={**{k: result[k] for k in keys}, "bench": str(out)})
    except FragError as exc:
        err.print(f"error: {exc.one_line()}")
        return exc.code
    if args.json:
        print_json(result)
    else:
        f, x = result["full"], result["fragment"]
        be = result["break_even_images"]
        err.print(f"full {f['per_image_s']:.3f} s/image, fragment {x['per_image_s']:.3f} s/image: speedup "
                  f"x{result['speedup']:.2f}; weights {-result['weight_reduction']:+.1%}; peak (weights+activations) "
                  f"{-result['peak_memory_reduction']:+.1%}; break-even "
                  f"{'never' if be is None else f'{be:.1f} images'}")
        print(f"bench written to {out}")
    return 0
