"""`frag bench FRAGMENT_DIR`: the fragment against its full model, side by side in one process (bench.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fragcli.cli import options as o


def bench(
    fragment_dir: Annotated[Path, typer.Argument(help="A fragment folder written by frag extract.")],
    variants: Annotated[int, typer.Option("--variants", help="Images per model and repeat (seeds 0..N-1).")] = 32,
    repeats: Annotated[int, typer.Option("--repeats", help="Repeats of the interleaved run; medians and ranges "
                                         "over them are reported.")] = 3,
    batch_size: o.BatchSize = 1,
    steps: o.Steps = None,
    no_manifest: Annotated[bool, typer.Option("--no-manifest", help="Do not write the manifest's performance block.")] = False,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure each side's load, generation and "
                                         "VAE decode peaks in a fresh process first (one after the other).")] = True,
    memory_repeats: Annotated[int, typer.Option("--memory-repeats", help="Probe runs per side (medians are "
                                                "reported).")] = 1,
    decode: Annotated[str, typer.Option("--decode", help="The fragment side's VAE decode: plain | tiled | sliced "
                                        "(diffusers' enable_tiling / enable_slicing) | auto (the one its memory "
                                        "probe finds lowering the decode peak).")] = "plain",
    peers: Annotated[
        str, typer.Option("--peers", help="Also run these peers, each on its own copy of the full model, "
                          "interleaved with the rest: deepcache (intervals 2 and 3), tgate, tomesd, or one setting "
                          "(deepcache-i3). Not installed: reported, not run (pip install 'fragcli[peers]').")
    ] = "",
    fidelity: Annotated[bool, typer.Option("--fidelity/--no-fidelity", help="Compare every contender's images with "
                                           "the full model's (CLIP delta, SSIM, pHash).")] = True,
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    json_out: o.Json = False,
):
    """Benchmark a fragment against its full model in one process: both stay loaded and run interleaved (full,
    fragment, fragment, full, ...) after one warm-up each; per model: seconds per image, images/min, every
    component's device, dtype and bytes (resident weights), on-disk size; the speedup (median of the repeats, with
    its range), weight and peak reductions and the break-even image count (H4, H5). Peaks (unless --no-memory):
    each side in a fresh process before the timing run: RSS high-water mark (CUDA max allocated on GPU) after
    loading, while generating, and while decoding plain / tiled / sliced. Writes bench.json into --out (default
    reports/<model>/<timestamp>/bench) and the manifest's performance block.

    Example: frag bench fragments/demo --variants 32 --repeats 3 --out reports/demo/bench
              frag bench fragments/demo --variants 32 --peers deepcache,tgate,tomesd --no-memory
    """
    from rich.markup import escape

    from fragcli.api import bench as run_bench
    from fragcli.console import err, print_json

    result = run_bench(fragment_dir, variants=variants, batch_size=batch_size, repeats=repeats, steps=steps,
                       model=model, device=device, dtype=dtype, out=out, overwrite=overwrite,
                       manifest=not no_manifest, show_progress=not json_out, memory=memory,
                       memory_repeats=memory_repeats, decode=decode, peers=peers or None, fidelity=fidelity)
    rec = result.record
    if json_out:
        print_json({"out": str(result.path), **rec.dump()})
        return
    _print_table(err, rec)
    be = rec.break_even_images
    lo, hi = rec.speedup_range
    peak = {"rss_hwm": "process RSS peak while generating", "rss_hwm_since_start": "process RSS peak (since start)",
            "cuda_max_allocated": "CUDA max allocated", "weights_plus_rss": "weights+activations"}[rec.peak_kind]
    bm = rec.break_even_images_marginal
    err.print(f"speedup x{rec.speedup:.2f} (x{lo:.2f}-x{hi:.2f} over {rec.repeats} repeat(s)); resident weights "
              f"{-rec.weight_reduction:+.1%}; peak ({peak}) {-rec.peak_memory_reduction:+.1%}; "
              f"break-even {'never' if be is None else f'{be:.1f} images'} (H5; "
              f"{'never' if bm is None else f'{bm:.1f}'} crediting the profile's {rec.profile_images} images)")
    for peer in rec.peers:
        if f"runs.{peer}" in rec.unavailable:
            err.print(escape(f"{peer}: not run: {rec.unavailable[f'runs.{peer}']}"))
    typer.echo(f"bench written to {result.path}")


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _print_table(console, rec) -> None:
    from rich.table import Table

    runs = rec.runs
    table = Table(title=f"bench {rec.fragment_name} ({rec.variants} variants x {rec.repeats} repeats, {rec.device})")
    table.add_column("", justify="left")
    for name in runs:
        table.add_column(name, justify="right")

    def row(label, fn):
        table.add_row(label, *[fn(r) for r in runs.values()])

    row("s/image", lambda r: f"{r.per_image_s:.3f}")
    row("range", lambda r: "{:.3f}-{:.3f}".format(*r.per_image_s_range))
    row("images/min", lambda r: "-" if r.images_per_min is None else f"{r.images_per_min:.1f}")
    row("speedup", lambda r: "-" if r.vs_baseline is None else f"x{r.vs_baseline.speedup:.2f}")
    row("  range", lambda r: "-" if r.vs_baseline is None else "x{:.2f}-x{:.2f}".format(*r.vs_baseline.speedup_range))
    if any(r.fidelity is not None for r in runs.values()):
        def fid(attr, fmt):
            def cell(r):
                v = getattr(r.fidelity, attr) if r.fidelity is not None else None
                return "-" if v is None else fmt.format(v)
            return cell
        row("CLIP delta", fid("clip_delta_rel", "{:+.2%}"))
        row("SSIM", fid("ssim_mean", "{:.3f}"))
        row("pHash", fid("phash_mean", "{:.1f}"))
        row("LPIPS", fid("lpips_mean", "{:.3f}"))
        row("images passing", fid("pass_rate", "{:.0%}"))
    names = list(dict.fromkeys(n for r in runs.values() for n in (r.components or {})))
    for comp in names:
        def cell(r, comp=comp):
            c = (r.components or {}).get(comp)
            if c is None:
                return "-"
            if c.evicted:
                return "evicted"
            return f"{_mib(c.bytes)} MiB {c.device} {'/'.join(c.dtypes)}"
        row(f"  {comp}", cell)
    row("resident MiB", lambda r: _mib(r.resident_bytes if r.resident_bytes is not None else r.weight_bytes))
    row("on disk MiB", lambda r: _mib(r.disk_bytes))
    if any(r.memory is not None for r in runs.values()):
        row("load peak MiB", lambda r: _mib(r.memory and r.memory.load_peak_bytes))
        row("RSS before gen MiB", lambda r: _mib(r.memory and r.memory.rss_before_generate_bytes))
        row("generation peak MiB", lambda r: _mib(r.memory and r.memory.generate_peak_bytes))
        row("  above libraries MiB", lambda r: _mib(r.memory and r.memory.generate_above_import_bytes))
        if rec.peak_kind == "cuda_max_allocated":
            row("CUDA gen peak MiB", lambda r: _mib(r.memory and r.memory.generate_cuda_peak_bytes))
        for mode in ("plain", "tiled", "sliced"):
            def dec(r, mode=mode):
                d = r.memory.decode if r.memory is not None else None
                t = d.tries.get(mode) if d is not None else None
                if t is None:
                    return "-"
                rise = t.cuda_rise_bytes if rec.peak_kind == "cuda_max_allocated" else t.rise_bytes
                return f"+{_mib(rise)}" + ("" if t.applies else " (n/a)") + (" *" if d.used == mode else "")
            row(f"decode {mode} MiB", dec)
    else:
        row("peak MiB (est.)", lambda r: _mib(r.peak_bytes_est))
    console.print(table)
    if any(r.memory is not None for r in runs.values()):
        console.print("decode: rise above RSS before the decode; * = the decode used; n/a = the mode changes "
                      "nothing at this size")
