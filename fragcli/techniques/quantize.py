"""Weight quantization of what the earlier techniques retained: int8 or fp8 weights of Linear and Conv2d layers.

Every plain ``torch.nn.Linear`` and ``torch.nn.Conv2d`` (zero padding) of the denoiser is replaced by a
``QuantLinear`` / ``QuantConv2d`` (``fragcli/techniques/quant_layers.py``): in the state dict ``<layer>.weight`` is
removed and ``<layer>.qweight`` (int8 or float8_e4m3fn) plus ``<layer>.scale`` (one float per output channel) are
added; the bias is kept as it was. The fragment's safetensors holds those plain tensors (the loader keeps int8/fp8
exact and gives float tensors the pipeline's dtype); ``rebuild`` creates the quantized modules with empty int8/fp8
storage of the right shapes (meta-safe), so a quantized layer's full-precision weight is never materialised when
the fragment is opened. The forward dequantizes one layer at a time to the input's dtype (int8 Linear layers may
use ``torch._weight_int8pack_mm`` where it was measured faster; see quant_layers).

Stack order: quantize comes after pruning and low-rank factoring, so it quantizes the narrower Linears they leave
and the plain ``down``/``up`` Linears of low-rank factors. Layers are chosen by ``layers`` (an explicit list) or,
when it is None, every supported layer except those under ``skip``; ``apply`` resolves the list, so the manifest
names every quantized layer. Layer types frag cannot take (ConvTranspose2d, Conv1d, Linear subclasses from other
libraries, layers whose torch parent reads ``.weight`` directly) are left in full precision and listed in the
summary; naming one explicitly is refused.

Simulation (``--simulate``): a named, reversible patch whose forward pre-hook swaps each layer's weight for its
fake-quantized copy (quantize then dequantize, the very ops of the physical layer) and restores it after the
call; the output equals the physical quantized layer's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, remove_patch
from fragcli.techniques.base import Applied, Plan, Technique, TechniqueConfig, TechniqueSummary
from fragcli.techniques.quant_layers import FORMATS, QUANT_TYPES, fake_quantize, quantized, storage_dtype

MASK_PATCH = "frag.quant_mask"
# Left in full precision by default (tools/compare_quant.py --skip-study, shapes UNet, int8, mean relative output
# error over t=100/500/900): everything quantized 7.8e-3, conv_in and conv_out kept 4.8e-3 for 7 KB (0.1% of the
# bytes; fp8: 2.9e-2 -> 2.2e-2). The time embedding alone costs 2.5e-4, so it is quantized.
DEFAULT_SKIP = ("conv_in", "conv_out")
CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
REFIT = "the fragment belongs to another model; re-run frag extract"


class QuantizeConfig(TechniqueConfig):
    """Which layers get int8/fp8 weights."""

    format: Literal["int8", "fp8"] = Field("int8", description="weight storage: int8 (symmetric) or fp8 (e4m3fn), "
                                                                "one scale per output channel")
    layers: list[str] | None = Field(None, description="layers to quantize (names relative to the denoiser); "
                                                       "None = every supported Linear and Conv2d not under skip")
    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP),
                            description="layer names (or prefixes: a module and everything under it) kept in full "
                                        "precision when layers is None")


def _why_not(module, parent) -> str | None:
    """None when ``module`` can be quantized, else why not."""
    import torch

    kind, ptype = type(module), type(parent)
    if ptype.__module__.startswith("torch.nn") and ptype.__name__ not in CONTAINERS:
        return f"inside a torch.nn.{ptype.__name__}, which reads its weight directly"
    if kind is torch.nn.Linear:
        pass
    elif kind is torch.nn.Conv2d:
        if module.padding_mode != "zeros":
            return f"a Conv2d with padding_mode={module.padding_mode!r} (only zero padding is supported)"
    elif isinstance(module, QUANT_TYPES):
        return "already quantized"
    else:
        where = kind.__module__.split(".")[0]
        return f"a {kind.__name__} ({where}); quantize takes torch.nn.Linear and torch.nn.Conv2d only"
    return None


def _candidates(denoiser) -> tuple[dict, dict[str, str]]:
    """({name: module} of the supported layers, {name: why not} of the other weight layers), in module order."""
    import torch

    weighted = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, *QUANT_TYPES)
    ok, other = {}, {}
    parents = {name: m for name, m in denoiser.named_modules()}
    uses: dict[int, int] = {}
    for _, m in denoiser.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for name, m in parents.items():
        if not name or not isinstance(m, weighted):
            continue
        why = _why_not(m, parents[name.rpartition(".")[0]])
        if why is None and uses[id(m)] > 1:
            why = "shared by several parents (tied weights)"
        if why is None:
            ok[name] = m
        else:
            other[name] = why
    return ok, other


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def select_layers(denoiser, config: QuantizeConfig) -> tuple[dict, list[str], dict[str, str]]:
    """(the layers to quantize {name: module}, the supported layers skipped, the unsupported ones {name: why}).

    Refuses (FragError) an unknown format, fp8 on a torch without it, and an explicit layer that is missing, listed
    twice, or of a type quantize cannot take; changes nothing."""
    storage_dtype(config.format)
    ok, other = _candidates(denoiser)
    if config.layers is None:
        chosen = {n: m for n, m in ok.items() if not _skipped(n, config.skip)}
        skipped = [n for n in ok if n not in chosen]
        if not chosen:
            raise FragError("quantize found no Linear or Conv2d layer to quantize in this denoiser",
                            "drop --quantize, or skip fewer layers")
        return chosen, skipped, other
    chosen = {}
    for name in config.layers:
        if name in chosen:
            raise FragError(f"quantize lists layer {name} twice", "list each layer once")
        if name in other:
            raise FragError(f"layer {name} cannot be quantized: it is {other[name]}",
                            "drop it from the quantize layers (it stays in full precision)")
        if name not in ok:
            raise FragError(f"layer {name} is not a Linear or Conv2d layer of this denoiser", REFIT)
        chosen[name] = ok[name]
    return chosen, [n for n in ok if n not in chosen], other


def _swap(denoiser, name: str, new) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
    setattr(parent, attr, new)


def quantize_layers(denoiser, config: QuantizeConfig, *, values: bool = True) -> list[str]:
    """Replace the chosen layers by quantized ones (``values=False``: empty storage, for ``rebuild``); checked
    first, so a refusal changes nothing. Returns the layer names."""
    chosen, _, _ = select_layers(denoiser, config)
    for name, module in chosen.items():
        _swap(denoiser, name, quantized(module, config.format, values=values))
    return list(chosen)


def _weight_bytes(module, fmt: str) -> tuple[int, int]:
    """(bytes of the full-precision weight, bytes of its quantized storage: qweight + scale)."""
    w = module.weight
    return w.numel() * w.element_size(), w.numel() * 1 + w.shape[0] * w.element_size()


def install_quant_mask(denoiser, config: QuantizeConfig) -> Patch:
    """Logical quantization: each chosen layer computes with its fake-quantized weight (swapped in by a forward
    pre-hook, restored after the call, errors included); the stored weights are untouched."""
    present = {n for n, _ in denoiser.named_modules()}
    missing = [n for n in config.layers or [] if n not in present]
    if missing:  # e.g. the factors of a low-rank layer: they exist only in the physical fragment
        raise FragError(f"quantize cannot simulate layer {missing[0]}: the untouched denoiser has no such layer "
                        "(an earlier technique of the fragment creates it)",
                        "validate the physical fragment instead (without --simulate)")
    chosen, _, _ = select_layers(denoiser, config)
    fmt = config.format

    def install(patch: Patch) -> None:
        for module in chosen.values():
            def pre(mod, args):
                original = mod._parameters["weight"]
                mod.__dict__["_frag_quant_original"] = original  # not setattr: that would register a Parameter
                mod._parameters["weight"] = fake_quantize(original.detach(), fmt)

            def post(mod, args, output):
                original = mod.__dict__.pop("_frag_quant_original", None)
                if original is not None:
                    mod._parameters["weight"] = original

            patch.undo.append(module.register_forward_pre_hook(pre).remove)
            patch.undo.append(module.register_forward_hook(post, always_call=True).remove)

    return apply_patch(denoiser, MASK_PATCH, install, config)


def remove_quant_mask(denoiser) -> bool:
    return remove_patch(denoiser, MASK_PATCH)


class Quantize(Technique):
    """int8 / fp8 weights (per-output-channel scales) for every Linear and Conv2d the earlier techniques retained."""

    name = "quantize"
    version = 1
    Config = QuantizeConfig
    options = {"quantize": None}

    def plan(self, profile, options: dict) -> Plan | None:
        fmt = options.get("quantize")
        if fmt is None or fmt == "none":
            return None
        if fmt not in FORMATS:
            raise FragError(f"--quantize {fmt!r} is not a format frag knows", "use --quantize int8, fp8 or none")
        return Plan(QuantizeConfig(format=fmt))

    def check(self, denoiser, config: QuantizeConfig) -> None:
        select_layers(denoiser, config)

    def apply(self, denoiser, config: QuantizeConfig) -> Applied:
        names = quantize_layers(denoiser, config)
        return Applied(self.name, None, config=config.model_copy(update={"layers": names}))

    def rebuild(self, denoiser, config: QuantizeConfig) -> Applied:
        quantize_layers(denoiser, config, values=False)  # structure only: the delta brings qweight and scale
        return Applied(self.name)

    def mask(self, denoiser, config: QuantizeConfig) -> Patch:
        return install_quant_mask(denoiser, config)

    def summary(self, config: QuantizeConfig, denoiser) -> TechniqueSummary:
        """On the denoiser before quantization: the layers that will be quantized and the bytes that saves."""
        chosen, skipped, other = select_layers(denoiser, config)
        ok, _ = _candidates(denoiser)
        counts: dict[str, int] = {}
        before = after = 0
        for module in chosen.values():
            kind = type(module).__name__
            counts[kind] = counts.get(kind, 0) + 1
            b, a = _weight_bytes(module, config.format)
            before, after = before + b, after + a
        total = len(ok)
        return TechniqueSummary(
            unit="quantized_layers", units_total=total, units_removed=len(chosen),
            removed_fraction=len(chosen) / total if total else 0.0, params_removed=0, bytes_saved=before - after,
            details={"format": config.format, "storage_dtype": str(storage_dtype(config.format)).replace("torch.", ""),
                     "scales": "per output channel", "layers_by_type": counts, "skipped": skipped,
                     "unsupported": other, "weight_bytes_before": before, "weight_bytes_after": after})
