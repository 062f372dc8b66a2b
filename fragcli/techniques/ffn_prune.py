"""Feed-forward channel pruning of diffusers ``FeedForward`` blocks: physical (narrower Linears) or a reversible mask.

A ``FeedForward`` is ``net = [activation, Dropout, Linear(inner, dim_out), (Dropout)]`` whose activation starts with
``proj = Linear(dim, gates * inner)``: elementwise activations (``GELU``, incl. "gelu-approximate" of PixArt / SD3 /
Flux MLPs, ``ApproximateGELU``, ``LinearActivation``) have one row per inner channel; gated ones (``GEGLU``,
``SwiGLU``: ``hidden, gate = proj(x).chunk(2, -1)``) have two, rows ``c`` and ``inner + c``. Inner channel ``c``
depends only on those rows, so removing it = dropping them and column ``c`` of ``net[2]``; the result equals the
original with channel ``c`` of ``net[2]``'s input zeroed (the mask), which is how the tests prove it. Any other
activation (or a net of another shape) is skipped and listed in the summary's details. Flux's single-stream blocks
hold their MLP outside any ``FeedForward``: ``proj_mlp`` (one row per channel, tanh GELU) feeds the last
``mlp_hidden_dim`` input columns of the block's ``proj_out`` (the first ones are the attention's); the block is
named by itself (``single_transformer_blocks.3``) and sliced the same way, those columns only.

Profile (table ``ffn``, one row per module, channel and seed): ``energy`` is the RMS of the channel's activation
(the input of ``net[2]``) over every token, batch row and profiled step of that seed; ``out_norm`` is the L2 norm of
``net[2].weight[:, c]``. RMS rather than mean |x| because squared errors add: removing ``c`` changes the block's
output by ``W[:, c] * x_c``, whose RMS is exactly ``out_norm * energy``, the ``output`` score (default; ``energy``
ranks by the activation alone). Plan: per seed, scores are divided by their module's mean score, then averaged
over seeds; per module (default) the lowest ``floor(C * (1 - retention))`` channels go (at least one channel kept),
or globally over all modules. Rank stability as for heads: a channel whose within-module rank varies across seeds
by more than ``stability_threshold * (C - 1)`` (standard deviation) is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError
from fragcli.patches import Patch, apply_patch, installed, remove_patch
from fragcli.techniques.base import Applied, Collector, Plan, Technique, TechniqueConfig, TechniqueSummary

MASK_PATCH = "frag.ffn_mask"
ENERGY_PATCH = "frag.ffn_energy"
TABLE = "ffn"
COLUMNS = [("module", "string"), ("channel", "int32"), ("seed", "int64"), ("steps", "int32"),
           ("energy", "float64"), ("out_norm", "float64")]
SCORES = ("output", "energy")
REFIT = "the selection belongs to another model; re-run frag extract"


@dataclass
class Ffn:
    """One sliceable feed-forward block: ``proj`` (rows = ``gates * inner``) and ``out`` (columns = ``inner``)."""

    module: object
    proj: object
    out: object
    gates: int
    inner: int

    @property
    def offset(self) -> int:
        """First input column of ``out`` that reads this MLP (a single-stream ``proj_out`` reads the attention
        first): always the last ``inner`` columns."""
        return self.out.in_features - self.inner


def _gates() -> dict[type, int]:
    from diffusers.models import activations as a

    return {a.GELU: 1, a.ApproximateGELU: 1, a.LinearActivation: 1, a.GEGLU: 2, a.SwiGLU: 2}


def _plain_linear(lin) -> bool:
    import torch

    own = {n for n, _ in lin.named_parameters(recurse=False)} | {n for n, _ in lin.named_buffers(recurse=False)}
    return isinstance(lin, torch.nn.Linear) and own <= {"weight", "bias"} and not list(lin.children())


def _inspect(ff, gates_of: dict) -> Ffn | str:
    """The block as an ``Ffn``, or why frag cannot slice it."""
    import torch
    from diffusers.models.attention import FeedForward

    if type(ff).forward is not FeedForward.forward:
        return f"{type(ff).__name__} overrides FeedForward.forward"
    net = getattr(ff, "net", None)
    if not isinstance(net, torch.nn.ModuleList) or len(net) < 3:
        return "net is not [activation, Dropout, Linear, ...]"
    act, drop, out = net[0], net[1], net[2]
    gates = gates_of.get(type(act))
    if gates is None:
        return f"activation {type(act).__name__} is not one frag can slice"
    if not isinstance(drop, torch.nn.Dropout) or not all(isinstance(m, torch.nn.Dropout) for m in net[3:]):
        return "net holds layers other than Dropout around its output Linear"
    proj = getattr(act, "proj", None)
    if not (_plain_linear(proj) and _plain_linear(out)):
        return "its projections are not plain Linear layers (already quantized or factored?)"
    if proj.out_features != gates * out.in_features:
        return f"proj has {proj.out_features} outputs, not {gates} x {out.in_features}"
    return Ffn(ff, proj, out, gates, out.in_features)


def _single_stream(block) -> Ffn | str | None:
    """A Flux single-stream block's MLP (``proj_mlp`` -> tanh GELU -> the MLP columns of ``proj_out``); None for
    any other module."""
    import torch

    proj, out, act = (getattr(block, a, None) for a in ("proj_mlp", "proj_out", "act_mlp"))
    attn = getattr(block, "attn", None)
    if proj is None or out is None or attn is None or getattr(attn, "to_out", None) is not None:
        return None
    if not isinstance(act, torch.nn.GELU):
        return f"activation {type(act).__name__} is not one frag can slice"
    if not (_plain_linear(proj) and _plain_linear(out)):
        return "its projections are not plain Linear layers (already quantized or factored?)"
    if out.in_features <= proj.out_features:
        return f"proj_out reads {out.in_features} columns, not [attention, {proj.out_features} MLP channels]"
    return Ffn(block, proj, out, 1, proj.out_features)


def ffn_blocks(denoiser) -> tuple[dict[str, Ffn], dict[str, str]]:
    """(sliceable feed-forward blocks by name, {name: why not} for the other ``FeedForward`` blocks)."""
    from diffusers.models.attention import FeedForward

    gates_of = _gates()
    ok, skipped = {}, {}
    for name, m in denoiser.named_modules():
        single = _single_stream(m)
        if single is not None:
            if isinstance(single, Ffn):
                ok[name] = single
            else:
                skipped[name] = single
        elif isinstance(m, FeedForward):
            found = _inspect(m, gates_of)
            if isinstance(found, Ffn):
                ok[name] = found
            else:
                skipped[name] = found
    return ok, skipped


def _check(name: str, blocks: dict[str, Ffn], skipped: dict[str, str], remove: list[int]) -> Ffn:
    if name in skipped:
        raise FragError(f"feed-forward block {name} cannot be sliced: {skipped[name]}", "drop it from the selection")
    f = blocks.get(name)
    if f is None:
        raise FragError(f"module {name} is not a feed-forward block of this model", REFIT)
    bad = [c for c in remove if not (isinstance(c, int) and 0 <= c < f.inner)]
    if bad:
        raise FragError(f"feed-forward block {name} has {f.inner} channels; cannot remove channel(s) {bad[:5]}", REFIT)
    if len(set(remove)) != len(remove):
        raise FragError(f"the selection for {name} repeats a channel", REFIT)
    if len(remove) >= f.inner:
        raise FragError(f"the selection removes every channel of {name}", "keep at least one channel per block")
    return f


def check_channels(denoiser, removed: dict[str, list[int]]) -> dict[str, Ffn]:
    """Every named block exists, can be sliced and keeps at least one channel; changes nothing."""
    blocks, skipped = ffn_blocks(denoiser)
    for name, remove in removed.items():
        _check(name, blocks, skipped, remove)
    return blocks


def _slice(lin, idx, dim: int) -> None:
    import torch

    with torch.no_grad():
        w = lin.weight
        lin.weight = torch.nn.Parameter(w.index_select(dim, idx).clone(), requires_grad=w.requires_grad)
        if dim == 0 and lin.bias is not None:
            b = lin.bias
            lin.bias = torch.nn.Parameter(b.index_select(0, idx).clone(), requires_grad=b.requires_grad)
    if dim == 0:
        lin.out_features = idx.numel()
    else:
        lin.in_features = idx.numel()


def prune_ffn(f: Ffn, remove: list[int]) -> None:
    """Physically remove inner channels ``remove`` of one block (every gate's rows of ``proj``, columns of ``out``)."""
    import torch

    if not remove:
        return
    gone = set(remove)
    keep = torch.tensor([c for c in range(f.inner) if c not in gone], dtype=torch.long, device=f.proj.weight.device)
    rows = torch.cat([keep + g * f.inner for g in range(f.gates)])
    offset = f.offset
    d = f.out.weight.device
    _slice(f.proj, rows, 0)
    _slice(f.out, torch.cat([torch.arange(offset, device=d), keep.to(d) + offset]), 1)
    f.inner = keep.numel()
    if hasattr(f.module, "mlp_hidden_dim"):  # a single-stream block
        f.module.mlp_hidden_dim = f.inner
        packed = getattr(f.out, "_tp_packed_row_blocks", None)
        if isinstance(packed, list) and len(packed) == 2:
            f.out._tp_packed_row_blocks = [offset, f.inner]


def prune_channels(denoiser, removed: dict[str, list[int]]) -> list[str]:
    """Check every block, then slice them all; returns the blocks changed."""
    blocks = check_channels(denoiser, removed)
    for name, remove in removed.items():
        prune_ffn(blocks[name], remove)
    return [n for n, r in removed.items() if r]


def channel_mask_hook(inner: int, remove: list[int], offset: int = 0):
    """A pre-hook on ``net[2]`` (or a single-stream ``proj_out``, whose MLP columns start at ``offset``) zeroing the
    removed channels of its input."""
    import torch

    remove = sorted(set(remove))
    cache: dict = {}

    def hook(module, args):
        x = args[0]
        if x.shape[-1] != offset + inner:
            raise FragError(f"the FFN mask expects {offset + inner} channels, got {x.shape[-1]}",
                            "remove the mask first")
        idx = cache.get(x.device)
        if idx is None:
            idx = cache[x.device] = torch.tensor(remove, dtype=torch.long, device=x.device) + offset
        return (x.index_fill(-1, idx, 0),) + tuple(args[1:])

    return hook


def install_channel_mask(denoiser, removed: dict[str, list[int]]) -> Patch:
    """Logical pruning: a named, reversible, idempotent mask; the weights are untouched."""

    def install(patch: Patch) -> None:
        blocks = check_channels(denoiser, removed)
        for name, remove in removed.items():
            if remove:
                f = blocks[name]
                hook = channel_mask_hook(f.inner, remove, f.offset)
                patch.undo.append(f.out.register_forward_pre_hook(hook).remove)

    return apply_patch(denoiser, MASK_PATCH, install, removed)


def remove_channel_mask(denoiser) -> bool:
    return remove_patch(denoiser, MASK_PATCH)


# --- profiling: per-channel activation RMS, accumulated on the device, one row per (module, channel, seed) ---

def install_ffn_energy(denoiser, recorder) -> Patch:
    """A pre-hook on every sliceable block's ``net[2]``: sums of squares per channel on profiled steps."""

    def install(patch: Patch) -> None:
        blocks, _ = ffn_blocks(denoiser)
        sums: dict[tuple[str, int], list] = {}  # (module, seed) -> [sum of x^2 per channel, rows, {steps}]
        patch.state = {"recorder": recorder, "sums": sums, "outs": {n: (f.out, f.offset) for n, f in blocks.items()}}
        for name, f in blocks.items():

            def hook(lin, args, name=name, offset=f.offset):
                if not recorder.active:
                    return None
                x = args[0].detach()[..., offset:]
                sq = x.float().square().reshape(-1, x.shape[-1]).sum(0)
                acc = sums.get((name, recorder.seed))
                if acc is None:
                    sums[(name, recorder.seed)] = [sq, x.numel() // x.shape[-1], {recorder.step}]
                else:
                    acc[0] += sq
                    acc[1] += x.numel() // x.shape[-1]
                    acc[2].add(recorder.step)
                return None

            patch.undo.append(f.out.register_forward_pre_hook(hook).remove)

    return apply_patch(denoiser, ENERGY_PATCH, install)


def remove_ffn_energy(denoiser) -> bool:
    """Flush the accumulated rows into the recorder's ``ffn`` table, then remove the hooks."""
    import torch

    patch = installed(denoiser).get(ENERGY_PATCH)
    if patch is None:
        return False
    try:
        st = patch.state
        with torch.no_grad():
            norms = {n: lin.weight.detach()[:, offset:].float().norm(dim=0).double().cpu().tolist()
                     for n, (lin, offset) in st["outs"].items()}
        for (name, seed), (sq, rows, steps) in sorted(st["sums"].items()):
            energy = (sq / rows).sqrt().cpu().double().tolist()
            n = len(energy)
            st["recorder"].add_rows(TABLE, {"module": [name] * n, "channel": list(range(n)), "seed": [int(seed)] * n,
                                            "steps": [len(steps)] * n, "energy": energy, "out_norm": norms[name]})
    finally:
        remove_patch(denoiser, ENERGY_PATCH)
    return True


# --- planning ---

def read_ffn(profile) -> dict[str, dict]:
    """``ffn.parquet`` checked (types, finite non-negative values, every channel once per seed, same seeds
    everywhere): module -> {"energy": [seeds x C], "out_norm": [C], "seeds": [...]}."""
    import numpy as np

    folder = getattr(profile, "folder", None)
    where = f"{TABLE}.parquet in {folder or 'the profile'}"
    if folder is not None and not (folder / f"{TABLE}.parquet").is_file():
        raise FragError(f"profile {folder} has no {TABLE}.parquet (taken before FFN pruning existed?)",
                        "re-run frag profile, then frag extract --ffn-retention")
    if (profile.context.get("rows") or {}).get(TABLE) == 0:
        raise FragError(f"the profiled model has no feed-forward block frag can slice ({where} is empty)",
                        "drop --ffn-retention for this model")
    table = profile.table(TABLE, dict(COLUMNS))
    if any(table.column(c).null_count for c, _ in COLUMNS):
        raise FragError(f"{where} has empty (null) values", "re-run frag profile")
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c, _ in COLUMNS}
    for c in ("energy", "out_norm"):
        v = cols[c].astype(float)
        if not np.isfinite(v).all() or (v < 0).any():
            raise FragError(f"{where}: column {c} has NaN, infinite or negative values",
                            "re-run frag profile (in fp32 if fp16 overflowed)")
    if (cols["channel"] < 0).any():
        raise FragError(f"{where}: negative channel indices", "re-run frag profile")
    all_seeds = sorted(set(cols["seed"].tolist()))
    out = {}
    for mod in dict.fromkeys(cols["module"].tolist()):
        sel = cols["module"] == mod
        ch, sd = cols["channel"][sel].astype(np.int64), cols["seed"][sel]
        seeds = sorted(set(sd.tolist()))
        n = int(ch.max()) + 1
        s_idx = np.searchsorted(np.array(seeds), sd)
        count = np.zeros((len(seeds), n), dtype=np.int64)
        np.add.at(count, (s_idx, ch), 1)
        if seeds != all_seeds or (count != 1).any():
            raise FragError(f"{where}: module {mod} lacks a channel's row for some seed, or repeats one",
                            "re-run frag profile")
        energy = np.zeros((len(seeds), n))
        energy[s_idx, ch] = cols["energy"][sel]
        norm = np.zeros(n)
        norm[ch] = cols["out_norm"][sel]
        out[mod] = {"energy": energy, "out_norm": norm, "seeds": seeds}
    return out


def score_channels(data: dict[str, dict], method: str) -> dict[str, dict]:
    """Per module: "score" per channel (mean over seeds of the seed's score / its module mean) and "per_seed"."""
    import numpy as np

    out = {}
    for mod, d in data.items():
        per_seed = d["energy"] * d["out_norm"][None, :] if method == "output" else d["energy"].copy()
        mean = per_seed.mean(axis=1, keepdims=True)
        per_seed = np.divide(per_seed, mean, out=np.zeros_like(per_seed), where=mean > 0)
        out[mod] = {"channels": per_seed.shape[1], "per_seed": per_seed, "score": per_seed.mean(axis=0)}
    return out


def select_channels(scores: dict[str, dict], retention: float, per_module: bool, threshold: float) -> dict:
    """The channels to remove (lowest scores first, unstable ones protected, one channel kept per block) and a
    record of the choice (``ffn_selection.json``)."""
    import numpy as np

    from fragcli.techniques.head_selection import instability, lowest_units

    protected = {m: set(np.flatnonzero(instability(v["per_seed"]) > threshold).tolist()) for m, v in scores.items()}
    removed = lowest_units(scores, "channels", retention, per_module, protected)
    total = sum(v["channels"] for v in scores.values())
    n_removed = sum(len(r) for r in removed.values())
    record = {
        "_type": "frag.ffn_selection", "schema_version": 1,
        "channels_total": total, "channels_removed": n_removed,
        "achieved_retention": 1 - n_removed / total if total else 1.0,
        "modules": {m: {"channels": v["channels"], "removed": len(removed[m]), "protected": len(protected[m]),
                        "score_removed_share": round(float(v["score"][removed[m]].sum() / v["score"].sum()), 6)
                        if v["score"].sum() > 0 else 0.0}
                    for m, v in scores.items()},
    }
    return {"removed": removed, "record": record}


class FfnBlockChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channels: int = Field(description="inner channels of the block")
    removed: int = Field(description="channels removed")
    protected: int = Field(description="channels kept for rank instability across seeds")
    score_removed_share: float = Field(description="share of the block's score (sum) the removed channels carried")


class FfnSelection(BaseModel):
    """``ffn_selection.json``: the FFN-pruning plan, written beside the manifest by ``frag extract``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type_: str = Field("frag.ffn_selection", alias="_type")
    schema_version: int = 1
    params: dict[str, float | str | bool] = Field(description="ffn_retention, ffn_score, ffn_per_module, "
                                                              "ffn_stability_threshold as used")
    channels_total: int
    channels_removed: int
    achieved_retention: float
    modules: dict[str, FfnBlockChoice] = Field(description="FeedForward block -> what was chosen there")


class FfnPruneConfig(TechniqueConfig):
    """Feed-forward inner channels to remove, per block (names relative to the denoiser), and how they were chosen."""

    ffn_channels_removed: dict[str, list[int]] = Field(default_factory=dict,
                                                       description="FeedForward block -> inner channel indices removed")
    ffn_retention_ratio: float | None = Field(None, description="fraction of FFN inner channels asked to be kept")
    method: str | None = Field(None, description="score the channels were ranked by (output | energy)")
    per_module: bool = Field(True, description="the retention applied in every block (else over all blocks)")
    stability_threshold: float | None = Field(None, description="channels whose within-block rank std across "
                                              "seeds / (channels - 1) exceeded this were kept")


def _removed(config: FfnPruneConfig) -> dict[str, list[int]]:
    return {m: sorted(r) for m, r in config.ffn_channels_removed.items() if r}


def _check_options(opts: dict) -> tuple[float, str, bool, float]:
    r = opts["ffn_retention"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0 < r <= 1):
        raise FragError(f"--ffn-retention {r} is not a number in (0, 1]",
                        "pass e.g. 0.7 (keep 70% of every feed-forward block's channels)")
    score = opts["ffn_score"]
    if score not in SCORES:
        raise FragError(f"unknown FFN score {score!r}", f"use one of: {', '.join(SCORES)}")
    t = opts["ffn_stability_threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
        raise FragError(f"FFN stability threshold {t} is not a number >= 0", "pass e.g. 0.25 (1 or more protects none)")
    return float(r), score, bool(opts["ffn_per_module"]), float(t)


class FfnPrune(Technique):
    """Remove the feed-forward inner channels a prompt does not use (slices proj rows, both GEGLU halves, and
    the output Linear's columns)."""

    name = "ffn_prune"
    version = 1
    Config = FfnPruneConfig
    options = {"ffn_retention": None, "ffn_score": "output", "ffn_per_module": False, "ffn_stability_threshold": 0.25}

    def plan(self, profile, options: dict) -> Plan | None:
        if options.get("ffn_retention") is None:
            return None  # not asked for
        opts = {**self.options, **{k: v for k, v in options.items() if k in self.options and v is not None}}
        retention, score, per_module, threshold = _check_options(opts)
        chosen = select_channels(score_channels(read_ffn(profile), score), retention, per_module, threshold)
        config = FfnPruneConfig(ffn_channels_removed={m: r for m, r in chosen["removed"].items() if r},
                                ffn_retention_ratio=retention, method=score, per_module=per_module,
                                stability_threshold=threshold)
        record = {**chosen["record"], "params": {"ffn_retention": retention, "ffn_score": score,
                                                 "ffn_per_module": per_module, "ffn_stability_threshold": threshold}}
        FfnSelection.model_validate(record)
        return Plan(config, record, "ffn_selection.json")

    def collectors(self) -> list[Collector]:
        return [Collector("ffn_channel_energy", TABLE, list(COLUMNS), install_ffn_energy, remove_ffn_energy)]

    def check(self, denoiser, config: FfnPruneConfig) -> None:
        check_channels(denoiser, _removed(config))

    def apply(self, denoiser, config: FfnPruneConfig) -> Applied:
        prune_channels(denoiser, _removed(config))
        return Applied(self.name)

    def rebuild(self, denoiser, config: FfnPruneConfig) -> Applied:
        return self.apply(denoiser, config)  # slicing computes no value: it works on meta tensors too

    def mask(self, denoiser, config: FfnPruneConfig) -> Patch:
        return install_channel_mask(denoiser, _removed(config))

    def summary(self, config: FfnPruneConfig, denoiser) -> TechniqueSummary:
        """``denoiser`` is the one before this technique: counts are computed as if the channels were removed."""
        removed = _removed(config)
        blocks, skipped = ffn_blocks(denoiser)
        total = sum(f.inner for f in blocks.values())
        n_removed = params = nbytes = 0
        for name, remove in removed.items():
            f = blocks.get(name)
            if f is None:
                continue
            k = len(remove)
            n_removed += k
            proj_cut = k * f.gates * (f.proj.in_features + (1 if f.proj.bias is not None else 0))
            out_cut = k * f.out.out_features  # the MLP's columns of out (a single-stream proj_out keeps the rest)
            params += proj_cut + out_cut
            nbytes += proj_cut * f.proj.weight.element_size() + out_cut * f.out.weight.element_size()
        kept = total - n_removed
        return TechniqueSummary(
            unit="ffn_channels", units_total=total, units_removed=n_removed,
            removed_fraction=n_removed / total if total else 0.0, params_removed=params, bytes_saved=nbytes,
            details={"ffn_channels_total": total, "ffn_channels_kept": kept,
                     "ffn_retention_ratio": kept / total if total else 1.0,
                     "ffn_retention_asked": config.ffn_retention_ratio, "method": config.method,
                     "blocks": len(blocks), "removed_per_block": {m: len(r) for m, r in removed.items()},
                     "skipped_blocks": skipped})
