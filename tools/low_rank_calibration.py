#!/usr/bin/env python
"""Low-rank factoring: plain SVD against activation-aware SVD at equal bytes, and what qualifies at an energy target.

    nice -n 5 .venv/bin/python tools/low_rank_calibration.py --model shapes --json /tmp/low_rank_shapes.json
    flock /tmp/sd15.lock nice -n 5 .venv/bin/python tools/low_rank_calibration.py --model random:sd15 --no-activations

1. Calibration: ``frag profile`` of the prompt on ``--calib-seeds`` (the technique's own collector writes
   ``linear_inputs.parquet``: per-input-channel RMS of every Linear) gives the ASVD scales.
2. Evaluation data, from other seeds (``--eval-seeds``) of the full model: a random sample of every Linear's input
   rows on a few steps, and the denoiser's inputs at ``--unet-steps`` steps of the schedule.
3. Layer error at equal bytes: for every candidate Linear and energy ``e``, the rank ``r`` that plain SVD needs to
   keep ``e`` of the weight's energy; each method's rank-``r`` factors; error ``||X (W - W_r)^T|| / ||X W^T||`` on
   the evaluation rows (bias left out). Methods: ``svd``; ``asvd`` with alpha 0.5 and 1 (``W diag(s^alpha)``);
   ``whiten`` (reference only, not offered by the technique: SVD of ``W L`` with ``L`` the Cholesky factor of the
   calibration inputs' covariance, the optimum for those inputs; it needs in x in statistics per layer).
4. Denoiser error at equal bytes: every candidate layer factored at those ranks (``all``), and only the layers whose
   rank saves >= 10% of their bytes (``saving``): ``||eps_f - eps|| / ||eps||`` over the captured denoiser calls.
5. What the technique itself would factor (``--energies``, min saving 10%): layers, parameters and bytes saved for
   ``svd`` and ``asvd`` (whose ranks come from the scaled spectrum), with their denoiser error.

One torch thread; CPU; fp32. The numbers that chose the default method are quoted in fragcli/techniques/low_rank.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fragcli.techniques.low_rank import (  # noqa: E402
    LowRank,
    LowRankConfig,
    _factored,
    _scales,
    _swap,
    factors,
    linear_layers,
    rank_for,
    saves,
)

TECH = LowRank()


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def capture(loaded, settings, seeds, layers, rows_per_call: int, layer_steps: set[int], unet_steps: set[int]):
    """Full-model generation of ``seeds``: sampled input rows of every layer (on ``layer_steps``) and the
    denoiser's call inputs (on ``unet_steps``)."""
    from fragcli.generation import run_batch

    rows: dict[str, list] = {n: [] for n in layers}
    calls: list = []
    state = {"step": 0}
    gen = torch.Generator().manual_seed(1234)
    hooks = []
    for name, lin in layers.items():
        def hook(mod, args, name=name):
            if state["step"] in layer_steps:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
                idx = torch.randperm(x.shape[0], generator=gen)[:rows_per_call]
                rows[name].append(x[idx].clone())
        hooks.append(lin.register_forward_pre_hook(hook))

    def unet_hook(mod, args, kwargs):
        if state["step"] in unet_steps:
            calls.append((tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args),
                          {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))
    hooks.append(loaded.denoiser.register_forward_pre_hook(unet_hook, with_kwargs=True))
    try:
        for seed in seeds:
            state["step"] = 0

            def step_done():
                state["step"] += 1

            run_batch(loaded.pipe, settings, [seed], loaded.device, on_step=step_done)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in rows.items() if v}, calls


def whiten_factors(lin, rank: int, x_cal: torch.Tensor):
    """Reference: rank-r factors minimising ||X (W - W_r)^T|| for the calibration rows X (SVD of W L, C = L L^T)."""
    w = lin.weight.detach().float()
    c = x_cal.T @ x_cal / max(x_cal.shape[0], 1)
    c = c + 1e-3 * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0])  # rank-deficient for few rows
    chol = torch.linalg.cholesky(c.double()).float()
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = torch.linalg.solve_triangular(chol, root[:, None] * vh[:rank], upper=False, left=False)  # M L^-1
    return down.contiguous(), up.contiguous()


def layer_error(lin, down, up, x: torch.Tensor) -> float:
    w = lin.weight.detach().float()
    ref = x @ w.T
    approx = (x @ down.float().T) @ up.float().T
    return float((approx - ref).norm() / ref.norm().clamp_min(1e-30))


def denoiser_error(den, factored, calls) -> float:
    errs = []
    with torch.no_grad():
        for args, kwargs in calls:
            ref, got = _sample(den(*args, **kwargs)), _sample(factored(*args, **kwargs))
            errs.append(float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
    return statistics.mean(errs)


def _sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def factored_copy(den, plan: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    work = copy.deepcopy(den)
    layers, _ = linear_layers(work)
    for name, (down, up) in plan.items():
        _swap(work, name, _factored(layers[name], down.to(layers[name].weight.dtype), up.to(layers[name].weight.dtype)))
    return work


def qualify(den, energies, scales, min_saving: float) -> dict:
    """What the technique would factor at each energy (its own rule), per method; with timing of the rank search."""
    out = {}
    weight_bytes = sum(t.numel() * t.element_size() for t in den.state_dict().values())
    for method in (["svd", "asvd"] if scales else ["svd"]):
        for e in energies:
            cfg = LowRankConfig(rank_energy_ratio=e, method=method, min_saving=min_saving, activation_scales=scales)
            t0 = time.perf_counter()
            s = TECH.summary(cfg, den)
            secs = time.perf_counter() - t0
            out[f"{method}@{e:g}"] = {
                "method": method, "energy": e, "candidates": s.units_total, "factored": s.units_removed,
                "params_saved": s.params_removed, "bytes_saved": s.bytes_saved,
                "denoiser_bytes": weight_bytes, "share_of_denoiser": s.bytes_saved / weight_bytes,
                "rank_search_s": round(secs, 2),
                "layers": [{k: v for k, v in d.items() if k in ("layer", "rank", "orig_rank", "energy_retained")}
                           for d in s.details["low_rank_layers"]],
            }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--prompt", default="a large red circle in the center on a blue background")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--calib-seeds", default="0,1,2,3")
    ap.add_argument("--eval-seeds", default="100,101")
    ap.add_argument("--energies", default="0.5,0.8,0.93")
    ap.add_argument("--alphas", default="0.5,1")
    ap.add_argument("--min-saving", type=float, default=0.1)
    ap.add_argument("--rows-per-call", type=int, default=32)
    ap.add_argument("--no-activations", action="store_true",
                    help="only what plain SVD would factor (no profile, no generation): for random:sd15")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from fragcli import api
    from fragcli.generation import resolve_settings
    from fragcli.models import load_model
    from fragcli.profiling.data import ProfileData
    from fragcli.techniques.low_rank import read_scales

    energies = parse_floats(args.energies)
    t0 = time.perf_counter()
    loaded = load_model(args.model, "cpu", "fp32")
    den = loaded.denoiser.eval()
    layers, other = linear_layers(den)
    print(f"{args.model}: {len(layers)} candidate Linear layers ({sum(m.weight.numel() for m in layers.values()):,} "
          f"weights), {len(other)} unsupported; loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    result: dict = {"model": args.model, "prompt": args.prompt, "energies": energies, "min_saving": args.min_saving,
                    "candidates": len(layers)}
    if args.no_activations:
        result["qualify"] = qualify(den, energies, None, args.min_saving)
        _print_qualify(result["qualify"])
        _write(args.json, result)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        prof = api.profile(args.prompt, model=args.model, seeds=parse_ints(args.calib_seeds), steps=args.steps,
                           device="cpu", dtype="fp32", out=Path(tmp) / "profile", show_progress=False)
        scales = read_scales(ProfileData(prof.out))
    settings = resolve_settings(loaded, args.prompt, args.steps)
    n = settings.steps
    layer_steps = set(range(n))
    unet_steps = {round(i * (n - 1) / 4) for i in range(5)}
    x_eval, calls = capture(loaded, settings, parse_ints(args.eval_seeds), layers, args.rows_per_call, layer_steps,
                            unet_steps)
    x_cal, _ = capture(loaded, settings, parse_ints(args.calib_seeds)[:2], layers, args.rows_per_call, layer_steps,
                       set())
    print(f"calibration: {len(scales)} layers with activation RMS; evaluation: {len(calls)} denoiser calls, "
          f"{min(v.shape[0] for v in x_eval.values())}+ rows per layer", flush=True)

    alphas = parse_floats(args.alphas)
    methods = ["svd", *[f"asvd{a:g}" for a in alphas], "whiten"]
    per_energy = {}
    for e in energies:
        plans = {m: {} for m in methods}
        errs = {m: [] for m in methods}
        saving = []
        for name, lin in layers.items():
            r, _ = rank_for(torch.linalg.svdvals(lin.weight.detach().float()), e)
            if saves(r, lin.in_features, lin.out_features, args.min_saving):
                saving.append(name)
            x = x_eval.get(name)
            for m in methods:
                if m == "svd":
                    f = factors(lin, r)
                elif m == "whiten":
                    f = whiten_factors(lin, r, x_cal[name])
                else:
                    cfg = LowRankConfig(rank_energy_ratio=e, method="asvd", alpha=float(m[4:]),
                                        activation_scales=scales)
                    d = _scales(cfg, name, lin)
                    f = factors(lin, r, d)
                plans[m][name] = f
                if x is not None:
                    errs[m].append(layer_error(lin, *f, x))
        row = {"layers_saving": len(saving), "layer_error_mean": {m: statistics.mean(v) for m, v in errs.items()},
               "layer_error_median": {m: statistics.median(v) for m, v in errs.items()},
               "asvd_better_share": {m: statistics.mean(float(a < b) for a, b in zip(errs[m], errs["svd"], strict=True))
                                     for m in methods if m != "svd"},
               "denoiser_error_all": {}, "denoiser_error_saving": {}}
        for m in methods:
            work = factored_copy(den, plans[m])
            row["denoiser_error_all"][m] = denoiser_error(den, work, calls)
            del work
            if saving:
                work = factored_copy(den, {k: plans[m][k] for k in saving})
                row["denoiser_error_saving"][m] = denoiser_error(den, work, calls)
                del work
        per_energy[f"{e:g}"] = row
        print(f"\nenergy {e:g} (ranks of plain SVD, equal bytes for every method; {len(saving)} layers save "
              f">= {args.min_saving:.0%}):")
        print(f"  {'method':10s} {'layer err mean':>15s} {'median':>8s} {'denoiser err (all)':>19s} "
              f"{'(saving only)':>14s} {'beats svd':>10s}")
        for m in methods:
            ds = row["denoiser_error_saving"].get(m)
            print(f"  {m:10s} {row['layer_error_mean'][m]:15.4f} {row['layer_error_median'][m]:8.4f} "
                  f"{row['denoiser_error_all'][m]:19.4f} {'' if ds is None else f'{ds:.5f}':>14s} "
                  f"{'' if m == 'svd' else format(row['asvd_better_share'][m], '.0%'):>10s}", flush=True)
    result["equal_bytes"] = per_energy

    q = qualify(den, energies, scales, args.min_saving)
    for v in q.values():  # the technique's own choice, with its denoiser error
        cfg = LowRankConfig(rank_energy_ratio=v["energy"], method=v["method"], min_saving=args.min_saving,
                            activation_scales=scales)
        work = copy.deepcopy(den)
        TECH.apply(work, cfg)
        v["denoiser_error"] = denoiser_error(den, work, calls)
        del work
    result["qualify"] = q
    _print_qualify(q)
    result["seconds"] = time.perf_counter() - t0
    _write(args.json, result)
    return 0


def _print_qualify(q: dict) -> None:
    print("\nwhat the technique factors (its own rule):")
    for key, v in q.items():
        err = v.get("denoiser_error")
        print(f"  {key:10s} {v['factored']:3d}/{v['candidates']} layers, {v['params_saved']:,} params, "
              f"{v['bytes_saved']:,} B = {v['share_of_denoiser']:.2%} of the denoiser; rank search "
              f"{v['rank_search_s']}s" + ("" if err is None else f"; denoiser error {err:.4f}"), flush=True)


def _write(path, result) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
