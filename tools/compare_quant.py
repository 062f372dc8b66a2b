#!/usr/bin/env python
"""Compare weight-quantization backends on one denoiser call (CPU): bytes, time, output error, saveability.

    nice -n 5 .venv/bin/python tools/compare_quant.py --model shapes --skip-study
    flock /tmp/sd15.lock nice -n 5 .venv/bin/python tools/compare_quant.py --model random:sd15

Rows: fp32; frag int8 (dequantize + F.linear/F.conv2d); frag int8 with torch._weight_int8pack_mm forced for every
Linear; frag fp8 (e4m3fn + per-output-channel scale); torchao ``quantize_(Int8WeightOnlyConfig())``; diffusers
``enable_layerwise_casting(float8_e4m3fn)``; optimum-quanto ``quantize(weights=qint8)`` + ``freeze``. The library
rows are optional (a row says why it is missing): this script does not install them; for a measurement,
``pip install --target DIR torchao optimum-quanto`` and put DIR on PYTHONPATH. With ``--bf16`` the frag int8 rows
are repeated in bfloat16 (where the int8pack kernel is faster for few-row Linears). One torch thread.

Each variant shares the base UNet's untouched tensors (a structural copy) except diffusers' layerwise casting,
which casts in place and so gets a full copy. Time: median (and range) of ``--repeats`` interleaved calls after
one warm-up call each. Error: ||y - y_fp32|| / ||y_fp32|| on the same input (batch 2, timestep 500). Bytes: the
storage of every parameter and buffer, tensor subclasses flattened into their inner tensors. ``plain
safetensors``: whether ``safetensors.torch.save`` takes the state dict as it is (the fragment's format).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(m) -> int:
    return sum(tensor_bytes(t) for t in [*m.parameters(), *m.buffers()])


def sharing_copy(m):
    """A structural copy whose parameters and buffers are the original's (no tensor copied)."""
    memo = {id(t): t for t in [*m.parameters(), *m.buffers()]}
    return copy.deepcopy(m, memo)


def plain_safetensors(m) -> str:
    from safetensors.torch import save

    try:
        save({k: v.detach().contiguous() for k, v in m.state_dict().items()})
        return "yes"
    except Exception as exc:  # the libraries' subclasses raise various errors
        return f"no ({type(exc).__name__})"


def load_unet(model: str):
    if model == "random:sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)  # the UNet of fragcli.models.builtin.build_random_sd15, without the rest of the pipeline
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return unet.eval(), 32, None
    from fragcli.models import load_model

    loaded = load_model(model, "cpu", "fp32")
    pipe = loaded.pipe
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red circle on a blue background", "cpu", 1, True)
    return loaded.denoiser.eval(), loaded.denoiser.config.sample_size, torch.cat([uncond, cond])


def frag_variant(fmt: str, kernel: str = "dequant", dtype=torch.float32, skip=None):
    def build(base):
        from fragcli.techniques.quant_layers import set_kernel
        from fragcli.techniques.quantize import QuantizeConfig, quantize_layers

        m = sharing_copy(base) if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        cfg = QuantizeConfig(format=fmt) if skip is None else QuantizeConfig(format=fmt, skip=skip)
        quantize_layers(m, cfg)
        set_kernel(m, kernel)
        return m
    return build


def torchao_variant(base):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = sharing_copy(base)
    quantize_(m, Int8WeightOnlyConfig())
    return m


def layerwise_variant(base):
    m = copy.deepcopy(base)
    m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return m


def quanto_variant(base):
    from optimum.quanto import freeze, qint8, quantize

    m = sharing_copy(base)
    quantize(m, weights=qint8)
    freeze(m)
    return m


def bf16_base(base):
    return copy.deepcopy(base).to(torch.bfloat16)


def variants(bf16: bool):
    out = [("fp32", lambda b: b, torch.float32),
           ("frag int8 (dequant)", frag_variant("int8", "dequant"), torch.float32),
           ("frag int8 (int8pack_mm linear)", frag_variant("int8", "int8pack"), torch.float32),
           ("frag fp8 (e4m3 + scale)", frag_variant("fp8"), torch.float32),
           ("torchao Int8WeightOnly", torchao_variant, torch.float32),
           ("diffusers layerwise fp8", layerwise_variant, torch.float32),
           ("optimum-quanto qint8", quanto_variant, torch.float32)]
    if bf16:
        out += [("bf16", bf16_base, torch.bfloat16),
                ("frag int8 bf16 (dequant)", frag_variant("int8", "dequant", torch.bfloat16), torch.bfloat16),
                ("frag int8 bf16 (auto)", frag_variant("int8", "auto", torch.bfloat16), torch.bfloat16)]
    return out


def call(m, x, t, ctx, dtype):
    with torch.no_grad():
        return m(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample.float()


def rel(y, ref) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def compare(model: str, repeats: int, bf16: bool, check_save: bool, only: list[str] | None = None) -> list[dict]:
    unet, size, ctx = load_unet(model)
    torch.manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size)
    if ctx is None:
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500])
    ref = call(unet, x, t, ctx, torch.float32)
    rows, built = [], []
    for name, build, dtype in variants(bf16):
        if only and name != "fp32" and not any(o in name for o in only):
            continue
        try:
            m = build(unet)
        except Exception as exc:  # a library missing or refusing this model: say so in the table
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
            continue
        row = {"variant": name, "weight_bytes": module_bytes(m), "times": []}
        row["safetensors"] = plain_safetensors(m) if check_save else "not checked"
        try:
            row["rel_error"] = rel(call(m, x, t, ctx, dtype), ref)  # also the warm-up
        except Exception as exc:
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
            continue
        rows.append(row)
        built.append((row, m, dtype))
        print(f"built {name}", file=sys.stderr, flush=True)
    for r in range(repeats):  # interleaved: every variant once per round
        for row, m, dtype in built:
            t0 = time.perf_counter()
            call(m, x, t, ctx, dtype)
            row["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    assert rel(call(unet, x, t, ctx, torch.float32), ref) == 0.0, "a variant changed the base model's weights"
    base = next(r for r in rows if r["variant"] == "fp32")
    for row in rows:
        if "times" in row:
            row["time_s"] = statistics.median(row["times"])
            row["time_x"] = row["time_s"] / statistics.median(base["times"])
            row["bytes_x"] = row["weight_bytes"] / base["weight_bytes"]
    return rows


def skip_study(model: str) -> list[dict]:
    """frag int8/fp8 output error and bytes for a few skip lists, averaged over three timesteps."""
    from fragcli.techniques.quantize import QuantizeConfig, quantize_layers

    unet, size, ctx = load_unet(model)
    torch.manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size)
    if ctx is None:
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    ts = [torch.tensor([v]) for v in (100, 500, 900)]
    refs = [call(unet, x, t, ctx, torch.float32) for t in ts]
    out = []
    skips = {"nothing": [], "conv_in, conv_out": ["conv_in", "conv_out"],
             "conv_in, conv_out, time_embedding": ["conv_in", "conv_out", "time_embedding"]}
    for fmt in ("int8", "fp8"):
        for label, skip in skips.items():
            m = sharing_copy(unet)
            quantize_layers(m, QuantizeConfig(format=fmt, skip=skip))
            err = statistics.mean(rel(call(m, x, t, ctx, torch.float32), r) for t, r in zip(ts, refs, strict=True))
            out.append({"format": fmt, "skip": label, "rel_error": err, "weight_bytes": module_bytes(m)})
        for only in ("conv_in", "conv_out", "time_embedding"):  # that group alone quantized
            m = sharing_copy(unet)
            names = [n for n, mm in unet.named_modules() if (n == only or n.startswith(only + "."))
                     and type(mm) in (torch.nn.Linear, torch.nn.Conv2d)]
            quantize_layers(m, QuantizeConfig(format=fmt, layers=names))
            err = statistics.mean(rel(call(m, x, t, ctx, torch.float32), r) for t, r in zip(ts, refs, strict=True))
            out.append({"format": fmt, "skip": f"only {only} quantized", "rel_error": err,
                        "weight_bytes": module_bytes(m)})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | weight MB | × fp32 | s / call (median, min–max) | × fp32 | rel. error | plain safetensors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | n/a: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['weight_bytes'] / 1e6:.2f} | {r['bytes_x']:.3f} | {r['time_s']:.3f} "
                     f"({min(r['times']):.3f}–{max(r['times']):.3f}) | {r['time_x']:.2f} | {r['rel_error']:.2e} "
                     f"| {r['safetensors']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes", help="shapes | random:sd15 | tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also the frag int8 rows in bfloat16")
    ap.add_argument("--skip-study", action="store_true", help="also the error of each skip list (frag int8/fp8)")
    ap.add_argument("--only", action="append", help="only the variants whose name contains this (repeatable; "
                                                    "fp32 is always measured)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = compare(a.model, a.repeats, a.bf16, check_save=a.model != "random:sd15", only=a.only)
    print(f"\n{a.model}: one UNet call, batch 2, torch {torch.__version__}, 1 thread, {a.repeats} interleaved repeats\n")
    print(table(rows))
    result = {"model": a.model, "rows": rows}
    if a.skip_study:
        study = skip_study(a.model)
        result["skip_study"] = study
        print("\n| format | kept in full precision | rel. error (mean of t=100,500,900) | MB |\n|---|---|---|---|")
        for s in study:
            print(f"| {s['format']} | {s['skip']} | {s['rel_error']:.2e} | {s['weight_bytes'] / 1e6:.3f} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
