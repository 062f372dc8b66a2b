"""Low-rank factorisation of ``torch.nn.Linear`` layers: ``W`` (out x in) becomes ``up @ down`` at rank ``r``.

A layer is factored when the rank that keeps ``energy`` (``--low-rank-energy``; the design documents say 0.93) of
its spectral energy (sum of squared singular values) saves bytes: ``r * (in + out) < (1 - min_saving) * in * out``.
It becomes a ``LowRankLinear`` holding two plain Linears, ``down`` (in -> r, no bias) and ``up`` (r -> out, the
original bias): ``<layer>.weight``/``.bias`` are removed from the state dict, ``<layer>.down.weight``,
``<layer>.up.weight``, ``<layer>.up.bias`` added (a later ``quantize`` takes the two factors like any Linear).

Methods:
- ``svd``: truncated SVD of ``W``, ``up = U_r S_r^1/2``, ``down = S_r^1/2 V_r^T``; exactly
  ``||W - up @ down||_F^2 / ||W||_F^2 = 1 - energy_retained`` and ``||(W - up @ down) x|| <= s_(r+1) ||x||``.
- ``asvd`` (default; ASVD-style): ``s`` = per-input-channel RMS of the layer's input on the profiled steps
  (``linear_inputs.parquet``, this technique's collector), ``d = s^alpha`` floored at ``1e-3 * mean(d)``; truncated
  SVD of ``W diag(d)``, ``down = S_r^1/2 V_r^T diag(1/d)``. Rank and ``energy_retained`` are the scaled spectrum's.
  A layer the profile never saw, or whose input width no longer matches it (an earlier technique pruned its input),
  falls back to ``svd``; each entry records its method.
Why asvd (``tools/low_rank_calibration.py``, shapes, two prompts, ranks of plain SVD so equal bytes, error of the
denoiser output over 5 steps x 2 held-out seeds), every Linear factored at the ranks plain SVD needs for 0.93:
relative error 0.085 / 0.084 (svd) vs 0.074 / 0.060 (asvd, alpha 0.5) vs 0.094 / 0.075 (alpha 1); at the 0.8
ranks 0.18 / 0.16 vs 0.13 / 0.11; asvd (alpha 0.5) has the lower output error in 92-99% of the layers.

``plan`` has no weights: its config holds the target (and, for asvd, the profile's scales). ``apply`` computes ranks
and factors and returns the resolved config the manifest keeps: ``low_rank_layers`` = [{layer, rank, orig_rank,
in_features, out_features, energy_retained, method}], no scales. ``rebuild`` creates the factor modules at the
recorded ranks with empty storage (meta-safe); with a planned config it changes nothing.

``mask``: a forward hook replaces each layer's output by ``up @ (down @ x) + b`` from the untouched weight (the
physical layer's very ops: low-rank alone simulates exactly). A resolved config is refused where a layer's shape
differs from the recorded one (an earlier technique pruned it physically) or where asvd factors need the scales a
fragment does not keep. With a planned config after a masked pruning of the same layer, the factors are the
unpruned weight's: an approximation of the physical stack.
"""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, installed, remove_patch
from fragcli.techniques.base import Applied, Collector, Plan, Technique, TechniqueConfig, TechniqueSummary

MASK_PATCH = "frag.low_rank_mask"
INPUTS_PATCH = "frag.linear_inputs"
TABLE = "linear_inputs"
COLUMNS = [("module", "string"), ("channel", "int32"), ("calls", "int32"), ("rms", "float64")]
METHODS = ("svd", "asvd")
DEFAULT_METHOD = "asvd"  # lower error at equal bytes on shapes (tools/low_rank_calibration.py; module docstring)
DEFAULT_MIN_SAVING = 0.1
DEFAULT_ALPHA = 0.5  # ASVD's exponent on the activation scales
SCALE_FLOOR = 1e-3  # d is floored at this fraction of its mean (dead input channels would divide by zero)
CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
REFIT = "the fragment belongs to another model; re-run frag extract"
NO_SIM = "validate the physical fragment instead (without --simulate)"


class LowRankLinear(torch.nn.Module):
    """``up(down(x))``: a rank-``rank`` replacement of a ``Linear(in_features, out_features)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = _empty_linear(in_features, rank, False, device, dtype)
        self.up = _empty_linear(rank, out_features, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _empty_linear(i: int, o: int, bias: bool, device, dtype) -> torch.nn.Linear:
    """A Linear with uninitialised storage (built on meta, then moved: no random init is computed)."""
    lin = torch.nn.Linear(i, o, bias=bias, device="meta", dtype=dtype)
    if device is not None and torch.device(device).type != "meta":
        lin = lin.to_empty(device=device)
    lin.weight.requires_grad_(False)
    if lin.bias is not None:
        lin.bias.requires_grad_(False)
    return lin


class LowRankLayer(BaseModel):
    """One factored layer, as the manifest records it (the design documents' ``low_rank_layers`` entries)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str = Field(description="the Linear's name relative to the denoiser")
    rank: int = Field(ge=1, description="rank kept")
    orig_rank: int = Field(ge=1, description="min(in_features, out_features)")
    in_features: int = Field(ge=1, description="the layer's input width when it was factored")
    out_features: int = Field(ge=1, description="the layer's output width when it was factored")
    energy_retained: float = Field(description="share of the (scaled, for asvd) spectral energy the rank keeps")
    method: Literal["svd", "asvd"] = Field("svd", description="how this layer's factors were computed")


class LowRankConfig(TechniqueConfig):
    """The energy target and method (planned), and the factored layers with their ranks (resolved by apply)."""

    rank_energy_ratio: float = Field(description="share of each layer's spectral energy kept (--low-rank-energy)")
    method: Literal["svd", "asvd"] = Field(DEFAULT_METHOD, description="plain SVD of W, or activation-aware SVD")
    min_saving: float = Field(DEFAULT_MIN_SAVING, description="a layer is factored only when its factors take at most "
                                                              "(1 - min_saving) of its weight's bytes")
    alpha: float = Field(DEFAULT_ALPHA, ge=0, le=4, description="asvd: exponent on the per-channel activation RMS")
    activation_scales: dict[str, list[float]] | None = Field(
        None, description="asvd, planned only: per-input-channel activation RMS per layer, from the profile")
    low_rank_layers: list[LowRankLayer] | None = Field(None, description="resolved by apply; None = planned")

    @field_validator("rank_energy_ratio")
    @classmethod
    def _energy(cls, v: float) -> float:
        check_energy(v)
        return v

    @field_validator("min_saving")
    @classmethod
    def _saving(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 <= v < 1):
            raise ValueError(f"min_saving {v} is not in [0, 1)")
        return v


def check_energy(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= 1):
        raise FragError(f"--low-rank-energy {v} is not a number in (0, 1]",
                        "pass e.g. 0.93 (keep 93% of each Linear layer's spectral energy)")
    return float(v)


# --- which layers ---

def linear_layers(denoiser) -> tuple[dict, dict[str, str]]:
    """({name: Linear} that can be factored, {name: why not} for other Linear-like layers), in module order."""
    ok, other = {}, {}
    modules = dict(denoiser.named_modules())
    for name, m in modules.items():
        if not name or not isinstance(m, torch.nn.Linear):
            continue
        parent = modules[name.rpartition(".")[0]]
        ptype = type(parent)
        if isinstance(parent, LowRankLinear):
            continue  # a factor of an already factored layer
        if type(m) is not torch.nn.Linear:
            other[name] = f"a {type(m).__name__}, not a plain torch.nn.Linear"
        elif ptype.__module__.startswith("torch.nn") and ptype.__name__ not in CONTAINERS:
            other[name] = f"inside a torch.nn.{ptype.__name__}, which reads its weight directly"
        else:
            ok[name] = m
    return ok, other


def _swap(denoiser, name: str, new) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
    setattr(parent, attr, new)


# --- ranks and factors ---

def _scales(config: LowRankConfig, name: str, lin):
    """The ASVD column scales d of ``lin`` (float32, on its device), or None where plain SVD applies."""
    if config.method != "asvd" or not config.activation_scales or name not in config.activation_scales:
        return None
    s = config.activation_scales[name]
    if len(s) != lin.in_features:
        return None  # an earlier technique changed its input width: the profile's channels no longer match
    d = torch.tensor(s, dtype=torch.float32, device=lin.weight.device).clamp_min(0) ** config.alpha
    mean = d.mean()
    if not bool(torch.isfinite(mean)) or float(mean) <= 0:
        return None
    return d.clamp_min(SCALE_FLOOR * mean)


def _matrix(lin, d):
    w = lin.weight.detach().float()
    return w if d is None else w * d[None, :]


def rank_for(sv, energy: float) -> tuple[int, float]:
    """The smallest rank whose singular values ``sv`` (descending) keep ``energy`` of the energy, and the share kept."""
    e = sv.double().square()
    total = float(e.sum())
    if total <= 0 or not math.isfinite(total):
        return 0, 0.0
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype, device=cum.device))) + 1
    r = min(r, sv.numel())
    return r, float(cum[r - 1])


def saves(rank: int, i: int, o: int, min_saving: float) -> bool:
    return 0 < rank and rank * (i + o) < (1 - min_saving) * i * o


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> (config, versions, weight refs, resolution)


def resolve(denoiser, config: LowRankConfig) -> tuple[list[LowRankLayer], dict]:
    """(the layers to factor with their ranks, every candidate's {rank, energy_retained, saves, why}).

    A resolved config gives its layers as recorded; a planned one is resolved from the spectra of the current
    weights (cached per denoiser while the weights are unchanged, so ``summary`` and ``apply`` agree)."""
    layers, _ = linear_layers(denoiser)
    if config.low_rank_layers is not None:
        return list(config.low_rank_layers), {}
    weights = [(n, m.weight._version) for n, m in layers.items()]
    hit = _CACHE.get(denoiser)
    if hit is not None and hit[1] == weights and (hit[0] is config or hit[0] == config) \
            and all(r() is m.weight for r, m in zip(hit[2], layers.values(), strict=True)):
        return hit[3]
    chosen, seen = [], {}
    with torch.no_grad():
        for name, lin in layers.items():
            d = _scales(config, name, lin)
            sv = torch.linalg.svdvals(_matrix(lin, d))
            r, kept = rank_for(sv, config.rank_energy_ratio)
            i, o = lin.in_features, lin.out_features
            ok = saves(r, i, o, config.min_saving)
            seen[name] = {"rank": r, "orig_rank": min(i, o), "energy_retained": round(kept, 6), "saves": ok}
            if ok:
                chosen.append(LowRankLayer(layer=name, rank=r, orig_rank=min(i, o), in_features=i, out_features=o,
                                           energy_retained=kept, method="asvd" if d is not None else "svd"))
    out = (chosen, seen)
    _CACHE[denoiser] = (config, weights, [weakref.ref(m.weight) for m in layers.values()], out)
    return out


def _entry_scales(config: LowRankConfig, e: LowRankLayer, lin):
    """The scales an entry's factors are computed with (None for svd); an asvd entry without them is refused."""
    if e.method != "asvd":
        return None
    d = _scales(config, e.layer, lin)
    if d is None:
        raise FragError(f"the activation-aware factors of layer {e.layer} need the profile's activation scales, "
                        "which a fragment does not keep", NO_SIM)
    return d


def factors(lin, rank: int, d=None):
    """(down [rank, in], up [out, rank]) in the layer's dtype: ``up @ down`` is the rank-``rank`` approximation of
    ``W`` (plain SVD), or of ``W diag(d)`` with ``diag(1/d)`` folded into ``down`` (activation-aware)."""
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(_matrix(lin, d), full_matrices=False)
        root = s[:rank].sqrt()
        up = u[:, :rank] * root[None, :]
        down = root[:, None] * vh[:rank]
        if d is not None:
            down = down / d[None, :]
        dtype = lin.weight.dtype
        return down.to(dtype).contiguous(), up.to(dtype).contiguous()


def _check_recorded(denoiser, entries: list[LowRankLayer], simulate: bool = False) -> dict:
    """Every recorded layer is a plain Linear of this denoiser with the recorded shape; returns them by name."""
    layers, other = linear_layers(denoiser)
    seen = set()
    for e in entries:
        if e.layer in seen:
            raise FragError(f"low-rank layer {e.layer} is listed twice", "rebuild the fragment with frag extract")
        seen.add(e.layer)
        if e.layer in other:
            raise FragError(f"layer {e.layer} cannot be factored: it is {other[e.layer]}", REFIT)
        lin = layers.get(e.layer)
        if lin is None:
            raise FragError(f"layer {e.layer} is not a Linear layer of this denoiser (already factored?)", REFIT)
        if (lin.in_features, lin.out_features) != (e.in_features, e.out_features):
            shape = f"layer {e.layer} is {lin.out_features}x{lin.in_features} here, but the fragment factored it " \
                    f"as {e.out_features}x{e.in_features}"
            if simulate:  # an earlier technique of the stack changed it physically; its mask leaves it whole
                raise FragError(f"{shape} (pruned by a technique before it), which a simulation cannot reproduce",
                                NO_SIM)
            raise FragError(shape, REFIT)
        if not 1 <= e.rank <= min(e.in_features, e.out_features) or e.orig_rank != min(e.in_features, e.out_features):
            raise FragError(f"low-rank layer {e.layer}: rank {e.rank} / orig_rank {e.orig_rank} do not fit "
                            f"{e.out_features}x{e.in_features}", "rebuild the fragment with frag extract")
    return layers


def check_config(denoiser, config: LowRankConfig) -> None:
    check_energy(config.rank_energy_ratio)
    if config.low_rank_layers is not None:
        _check_recorded(denoiser, config.low_rank_layers)
        return
    if not linear_layers(denoiser)[0]:
        raise FragError("low_rank found no plain Linear layer to factor in this denoiser", "drop --low-rank-energy")


def _factored(lin, down, up):
    """The LowRankLinear holding ``down``/``up`` and a copy of ``lin``'s bias."""
    new = LowRankLinear(lin.in_features, lin.out_features, down.shape[0], lin.bias is not None, device="meta",
                        dtype=lin.weight.dtype)
    new.down.weight = torch.nn.Parameter(down, requires_grad=False)
    new.up.weight = torch.nn.Parameter(up, requires_grad=False)
    if lin.bias is not None:
        new.up.bias = lin.bias  # the same Parameter: its key moves to <layer>.up.bias
    new.train(lin.training)
    return new


def factor_layers(denoiser, config: LowRankConfig) -> LowRankConfig:
    """Factor the layers (ranks resolved first, so a refusal changes nothing); returns the resolved config."""
    check_config(denoiser, config)
    entries, _ = resolve(denoiser, config)
    layers, _ = linear_layers(denoiser)
    done = []
    for e in entries:
        lin = layers[e.layer]
        down, up = factors(lin, e.rank, _entry_scales(config, e, lin))
        done.append((e, _factored(lin, down, up)))
    for e, new in done:
        _swap(denoiser, e.layer, new)
    _CACHE.pop(denoiser, None)
    return LowRankConfig(rank_energy_ratio=config.rank_energy_ratio, method=config.method,
                         min_saving=config.min_saving, alpha=config.alpha, activation_scales=None,
                         low_rank_layers=[e for e, _ in done])


def rebuild_layers(denoiser, config: LowRankConfig) -> list[str]:
    """Empty factor modules at the recorded ranks (no value computed; works on meta); planned config: nothing."""
    if config.low_rank_layers is None:
        return []
    layers = _check_recorded(denoiser, config.low_rank_layers)
    for e in config.low_rank_layers:
        lin = layers[e.layer]
        new = LowRankLinear(e.in_features, e.out_features, e.rank, lin.bias is not None, device=lin.weight.device,
                            dtype=lin.weight.dtype)
        new.train(lin.training)
        _swap(denoiser, e.layer, new)
    return [e.layer for e in config.low_rank_layers]


# --- simulation ---

def install_low_rank_mask(denoiser, config: LowRankConfig) -> Patch:
    """Logical factoring: each layer's output is replaced by ``up @ (down @ x) + b``; the weights are untouched."""
    check_energy(config.rank_energy_ratio)
    if config.low_rank_layers is not None:
        _check_recorded(denoiser, config.low_rank_layers, simulate=True)
    check_config(denoiser, config)
    entries, _ = resolve(denoiser, config)
    layers, _ = linear_layers(denoiser)
    hooks = []
    for e in entries:
        lin = layers[e.layer]
        down, up = factors(lin, e.rank, _entry_scales(config, e, lin))
        hooks.append((lin, down, up))

    def install(patch: Patch) -> None:
        for lin, down, up in hooks:
            def hook(mod, args, output, down=down, up=up):
                return F.linear(F.linear(args[0], down), up, mod.bias)

            patch.undo.append(lin.register_forward_hook(hook).remove)

    return apply_patch(denoiser, MASK_PATCH, install, config)


def remove_low_rank_mask(denoiser) -> bool:
    return remove_patch(denoiser, MASK_PATCH)


# --- profiling: per-input-channel RMS of every Linear, on the device, one row per (module, channel) ---

def install_linear_inputs(denoiser, recorder) -> Patch:
    """A pre-hook on every factorable Linear: sums of squares of its input per channel, on profiled steps."""
    def install(patch: Patch) -> None:
        layers, _ = linear_layers(denoiser)
        sums: dict[str, list] = {}  # name -> [sum of x^2 per channel (float32, on the device), rows, calls]
        patch.state = {"recorder": recorder, "sums": sums}
        for name, lin in layers.items():
            def hook(mod, args, name=name):
                if not recorder.active:
                    return None
                x = args[0].detach()
                flat = x.reshape(-1, x.shape[-1])
                sq = (flat if flat.dtype == torch.float32 else flat.float()).square().sum(0)  # vector_norm: 4x slower
                acc = sums.get(name)
                if acc is None:
                    sums[name] = [sq, flat.shape[0], 1]
                else:
                    acc[0] += sq
                    acc[1] += flat.shape[0]
                    acc[2] += 1
                return None

            patch.undo.append(lin.register_forward_pre_hook(hook).remove)

    return apply_patch(denoiser, INPUTS_PATCH, install)


def remove_linear_inputs(denoiser) -> bool:
    """Flush the accumulated RMS into the recorder's ``linear_inputs`` table, then remove the hooks."""
    patch = installed(denoiser).get(INPUTS_PATCH)
    if patch is None:
        return False
    try:
        st = patch.state
        for name, (sq, rows, calls) in st["sums"].items():
            rms = (sq.double() / max(rows, 1)).sqrt().cpu().tolist()
            n = len(rms)
            st["recorder"].add_rows(TABLE, {"module": [name] * n, "channel": list(range(n)), "calls": [calls] * n,
                                            "rms": rms})
    finally:
        remove_patch(denoiser, INPUTS_PATCH)
    return True


def read_scales(profile) -> dict[str, list[float]]:
    """``linear_inputs.parquet`` as {layer: per-channel RMS}, checked (finite, non-negative, every channel once)."""
    import numpy as np

    folder = getattr(profile, "folder", None)
    where = f"{TABLE}.parquet in {folder or 'the profile'}"
    if folder is not None and not (folder / f"{TABLE}.parquet").is_file():
        raise FragError(f"profile {folder} has no {TABLE}.parquet (taken before low-rank calibration existed?)",
                        "re-run frag profile, or use the plain SVD (low_rank_method svd)")
    table = profile.table(TABLE, dict(COLUMNS))
    if any(table.column(c).null_count for c, _ in COLUMNS):
        raise FragError(f"{where} has empty (null) values", "re-run frag profile")
    mod = table.column("module").to_numpy(zero_copy_only=False)
    ch = table.column("channel").to_numpy().astype(np.int64)
    rms = table.column("rms").to_numpy().astype(float)
    if not np.isfinite(rms).all() or (rms < 0).any():
        raise FragError(f"{where}: column rms has NaN, infinite or negative values",
                        "re-run frag profile (in fp32 if fp16 overflowed)")
    out = {}
    for name in dict.fromkeys(mod.tolist()):
        sel = mod == name
        c = ch[sel]
        n = c.size
        if c.min() < 0 or int(c.max()) + 1 != n or np.unique(c).size != n:
            raise FragError(f"{where}: layer {name} lacks a channel's row or repeats one", "re-run frag profile")
        v = np.zeros(n)
        v[c] = rms[sel]
        out[name] = v.tolist()
    return out


# --- the technique ---

class LowRank(Technique):
    """Factor Linear layers into two thin ones where the rank keeping ``--low-rank-energy`` saves bytes."""

    name = "low_rank"
    version = 1
    Config = LowRankConfig
    options = {"low_rank_energy": None, "low_rank_method": DEFAULT_METHOD, "low_rank_min_saving": DEFAULT_MIN_SAVING}

    def plan(self, profile, options: dict) -> Plan | None:
        energy = options.get("low_rank_energy")
        if energy is None:
            return None  # not asked for
        energy = check_energy(energy)
        method = options.get("low_rank_method") or DEFAULT_METHOD
        if method not in METHODS:
            raise FragError(f"unknown low-rank method {method!r}", f"use one of: {', '.join(METHODS)}")
        saving = options.get("low_rank_min_saving")
        saving = DEFAULT_MIN_SAVING if saving is None else saving
        if isinstance(saving, bool) or not isinstance(saving, (int, float)) or not (math.isfinite(saving)
                                                                                   and 0 <= saving < 1):
            raise FragError(f"low-rank minimum saving {saving} is not a number in [0, 1)",
                            "pass e.g. 0.1 (factor a layer only where that saves 10% of its bytes)")
        scales = read_scales(profile) if method == "asvd" else None
        return Plan(LowRankConfig(rank_energy_ratio=energy, method=method, min_saving=float(saving),
                                  activation_scales=scales))

    def collectors(self) -> list[Collector]:
        return [Collector("linear_input_rms", TABLE, list(COLUMNS), install_linear_inputs, remove_linear_inputs)]

    def check(self, denoiser, config: LowRankConfig) -> None:
        check_config(denoiser, config)

    def apply(self, denoiser, config: LowRankConfig) -> Applied:
        return Applied(self.name, config=factor_layers(denoiser, config))

    def rebuild(self, denoiser, config: LowRankConfig) -> Applied:
        rebuild_layers(denoiser, config)
        return Applied(self.name)

    def mask(self, denoiser, config: LowRankConfig) -> Patch:
        return install_low_rank_mask(denoiser, config)

    def summary(self, config: LowRankConfig, denoiser) -> TechniqueSummary:
        """On the denoiser before factoring: the layers that will be factored and what that saves."""
        layers, other = linear_layers(denoiser)
        if config.low_rank_layers is None and any(m.weight.is_meta for m in layers.values()):
            return TechniqueSummary(unit="low_rank_layers", units_total=len(layers),  # ranks need the weights
                                    details={"energy_target": config.rank_energy_ratio, "method": config.method,
                                             "resolved": False, "unsupported": other})
        entries, seen = resolve(denoiser, config)
        params = nbytes = 0
        for e in entries:
            lin = layers.get(e.layer)
            cut = e.in_features * e.out_features - e.rank * (e.in_features + e.out_features)
            params += cut
            nbytes += cut * (lin.weight.element_size() if lin is not None else 4)
        total = len(layers)
        return TechniqueSummary(
            unit="low_rank_layers", units_total=total, units_removed=len(entries),
            removed_fraction=len(entries) / total if total else 0.0, params_removed=params, bytes_saved=nbytes,
            details={"low_rank_layers": [e.model_dump(mode="json") for e in entries],
                     "energy_target": config.rank_energy_ratio, "method": config.method,
                     "min_saving": config.min_saving, "candidates": total,
                     "not_saving": sum(1 for v in seen.values() if not v["saves"]), "unsupported": other})
