"""bench.json's schema (``BenchRecord``): what `frag bench` measured, read back by the report, the manifest's
performance block and the tests. Versions 1, 2 and 3 (without peers, fidelity and the marginal break-even) are
migrated in memory by ``read_bench``. The measuring is in ``fragcli.bench``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragcli.errors import FragError
from fragcli.memory_probe import DecodeMemory, DecodeMode, ProbeResult
from fragcli.records import Aggregate

TYPE = "frag.bench"
SCHEMA_VERSION = 4
BASELINE = "full"
FRAGMENT = "fragment"
PeakKind = Literal["cuda_max_allocated", "rss_hwm", "rss_hwm_since_start", "weights_plus_rss"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelRef(_Strict):
    name: str
    hash: str = Field(description="SHA-256 of the base model's weights")


class Ratios(_Strict):
    """One contender against the baseline, measured in the same process and the same repeats."""

    speedup: float = Field(description="median over repeats of baseline time / this contender's time (>1: faster)")
    speedup_range: tuple[float, float] = Field(description="[min, max] of the per-repeat speedups")
    speedup_per_repeat: list[float] = Field(description="baseline total_s / this total_s, repeat by repeat")
    weight_reduction: float = Field(description="1 - resident (weight) bytes / the baseline's")
    peak_memory_reduction: float = Field(description="1 - peak / the baseline's peak, the peak being the record's "
                                                     "peak_kind: the probes' generation peaks when measured, else "
                                                     "peak_bytes_est (CPU) or cuda_peak_bytes")


class ComponentInfo(_Strict):
    """One torch component of a pipeline as it sits in memory."""

    class_name: str | None = Field(description="its class; null when evicted")
    device: str | None = Field(description="device of its tensors ('+'-joined when several); null when evicted")
    dtypes: list[str] = Field(description="dtypes of its parameters and buffers")
    bytes: int = Field(description="bytes of its parameters and buffers (0 when evicted)")
    params: int = Field(description="parameters")
    evicted: bool = Field(False, description="a text encoder the fragment dropped (its prompt is cached)")


class SideMemory(_Strict):
    """One side's peaks, each measured in a fresh process (medians over the probe runs)."""

    peak_kind: Literal["cuda_max_allocated", "rss_hwm", "rss_hwm_since_start"] = Field(
        description="what peak_bytes is: CUDA max allocated while generating, or the RSS high-water mark while "
                    "generating (rss_hwm_since_start: it could not be reset after the load)")
    peak_bytes: int = Field(description="the peak while generating, of peak_kind (what H2 and the manifest read)")
    load_peak_bytes: int | None = Field(description="RSS high-water mark after loading (imports included)")
    rss_after_import_bytes: int | None = Field(description="RSS of the probe with its libraries imported, nothing "
                                                           "loaded")
    rss_before_generate_bytes: int | None = Field(description="RSS just before generating")
    generate_peak_bytes: int | None = Field(description="RSS high-water mark while generating")
    generate_cuda_peak_bytes: int | None = Field(None, description="CUDA max allocated while generating")
    generate_above_import_bytes: int | None = Field(
        None, description="generate_peak_bytes - rss_after_import_bytes: what this side adds to a process that has "
                          "its libraries imported (the libraries alone can outweigh a small model)")
    decode: DecodeMemory | None = Field(None, description="VAE decode peaks (the first probe's); null: no VAE")
    probes: list[ProbeResult] = Field(description="every probe run of this side, in order")


class RunStats(_Strict):
    """One contender (the full model, the fragment, or a peer) over every repeat."""

    kind: Literal["full", "fragment", "peer"] = Field(description="what was run")
    description: str = Field("", description="human-readable: the model, the fragment name, or the peer's config")
    repeats_total_s: list[float] = Field(description="wall seconds for all variants, one entry per repeat")
    total_s: float = Field(description="median of repeats_total_s")
    per_image_s: float = Field(description="median over repeats of the per-image seconds (total_s / variants)")
    per_image_s_range: tuple[float, float] = Field(description="[min, max] of the per-image seconds over repeats")
    images_per_min: float | None = Field(description="60 / per_image_s")
    weight_bytes: int = Field(description="bytes of every parameter and buffer of the pipeline's torch components")
    activation_peak_bytes: int = Field(description="largest rise of peak RSS (CPU) or CUDA allocated bytes above "
                                                   "what was resident when a chunk started")
    peak_bytes_est: int = Field(description="weight_bytes + activation_peak_bytes")
    cuda_peak_bytes: int | None = Field(None, description="torch.cuda.max_memory_allocated over the chunks; null on CPU")
    params: int = Field(description="parameters of the pipeline's torch components")
    vs_baseline: Ratios | None = Field(None, description="ratios against runs[baseline]; null for the baseline")
    components: dict[str, ComponentInfo] | None = Field(
        None, description="every torch component of the pipeline (name -> where it is, its size); null: not "
                          "recorded (schema_version < 3)")
    resident_bytes: int | None = Field(None, description="sum of components' bytes (= weight_bytes)")
    disk_bytes: int | None = Field(None, description="on disk: the full model's weight files (null: built in "
                                                     "memory); the fragment's artifacts (it runs on its base model)")
    memory: SideMemory | None = Field(None, description="peaks measured in a fresh process; null: not measured")
    fidelity: Aggregate | None = Field(
        None, description="this contender's images against the full model's on the same seeds (the first repeat's), "
                          "with frag validate's metrics and per-image gates; null for the baseline or not measured")
    peer: dict[str, Any] | None = Field(None, description="kind peer: its package, version and settings")


class BenchRecord(_Strict):
    """bench.json: contenders benchmarked side by side in one process; top-level numbers are the fragment's."""

    type_: Literal["frag.bench"] = Field(TYPE, alias="_type")
    schema_version: Literal[4] = SCHEMA_VERSION
    frag_version: str = Field("", description="frag version that wrote the record")
    created: str = Field(description="UTC time, ISO 8601")
    model: ModelRef = Field(description="the base model")
    fragment_path: str = Field(description="the benchmarked fragment folder (absolute, on the machine that ran it)")
    fragment_name: str
    techniques: list[str] = Field(default_factory=list, description="the fragment's techniques, in order")
    device: str = Field(description="cpu | cuda | cuda:N")
    dtype: str = Field(description="fp32 | fp16 | bf16")
    threads: int | None = Field(None, description="torch CPU threads during the run")
    variants: int = Field(description="images per contender and repeat (seeds 0..variants-1)")
    batch_size: int
    repeats: int = Field(description="repeats of the whole interleaved run; numbers are medians over them")
    order: Literal["ABBA"] = Field("ABBA", description="contender order per chunk, reversed on every other chunk")
    prompt: str
    steps: int
    width: int
    height: int
    baseline: str = Field(BASELINE, description="the runs entry the ratios are against")
    runs: dict[str, RunStats] = Field(description="contender name -> its numbers; 'full' and 'fragment' always")
    speedup: float = Field(description="= runs.fragment.vs_baseline.speedup (H4)")
    speedup_range: tuple[float, float] = Field(description="= runs.fragment.vs_baseline.speedup_range")
    weight_reduction: float = Field(description="= runs.fragment.vs_baseline.weight_reduction")
    peak_memory_reduction: float = Field(description="= runs.fragment.vs_baseline.peak_memory_reduction")
    peak_kind: PeakKind = Field(
        description="what peak_memory_reduction and the manifest's peak_vram_* compare: CUDA max allocated, the RSS "
                    "high-water mark while generating in a fresh process per side (rss_hwm; rss_hwm_since_start "
                    "where it could not be reset after the load), or, without the probes, weights + peak RSS growth")
    peak_source: Literal["probe", "in_process"] = Field(
        "in_process", description="probe: the peaks come from the memory probes; in_process: from the timing run")
    memory_probes: int = Field(0, description="probe runs per side (0: the probes were skipped, --no-memory)")
    decode: Literal["plain", "tiled", "sliced", "auto"] = Field(
        "plain", description="the VAE decode asked for the fragment side (auto: the mode its probe found lowest)")
    decode_used: DecodeMode = Field("plain", description="the VAE decode the fragment side ran with (the full "
                                                         "model always decodes plain)")
    unavailable: dict[str, str] = Field(default_factory=dict, description="measurement -> why it is missing")
    profile_cost_s: float = Field(description="the fragment's profiling time (manifest costs)")
    extract_cost_s: float = Field(description="the fragment's extraction time (manifest costs)")
    break_even_images: float | None = Field(
        description="(profile_cost_s + extract_cost_s) / seconds saved per image; null: the fragment is not faster (H5)")
    break_even_images_marginal: float | None = Field(
        None, description="the same, crediting the profile's own full-model images, which the user keeps: "
                          "(profile_cost_s + extract_cost_s - profile_images x full per-image s) / seconds saved per "
                          "image, at least 0; null: the fragment is not faster (or not recorded, schema_version < 4)")
    profile_images: int = Field(0, description="images the profile generated with the full model (its seeds)")
    peers: list[str] = Field(default_factory=list, description="the peers asked for (runs holds those that ran; "
                                                               "unavailable says why the others did not)")
    versions: dict[str, str] = Field(default_factory=dict, description="frag, torch, diffusers, transformers, python")

    @property
    def full(self) -> RunStats:
        return self.runs[self.baseline]

    @property
    def fragment(self) -> RunStats:
        return self.runs[FRAGMENT]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def read_bench(path: Path) -> BenchRecord:
    """Read and validate a bench.json (versions 1, from frag 0.1's tools/bench.py, and 2 are migrated in
    memory)."""
    from fragcli.paths import read_json

    data = read_json(Path(path), "bench record")
    if not isinstance(data, dict) or data.get("_type") != TYPE:
        raise FragError(f"{path} is not a frag bench record", "re-run frag bench")
    if data.get("schema_version") == 1:
        try:
            data = _migrate_v1(data)
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:  # fields missing or odd
            what = f"lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else f"has a malformed field ({exc})"
            raise FragError(f"bench record {path} (schema_version 1) {what[:120]}", "re-run frag bench") from None
    data = _migrate_v2(data)
    try:
        return BenchRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FragError(f"bench record {path} is invalid at {where}: {first['msg']}", "re-run frag bench") from None


def _migrate_v2(data: dict) -> dict:
    """Version 2 had no components, disk sizes nor probes, version 3 no fidelity, peers nor marginal break-even:
    the new fields keep their defaults (not measured)."""
    if data.get("schema_version") not in (2, 3):
        return data
    return {**data, "schema_version": SCHEMA_VERSION}


def _migrate_v1(data: dict) -> dict:
    """Version 1 had top-level ``full``/``fragment`` blocks and one repeat's ratio."""
    d = dict(data)
    runs = {}
    for name in (BASELINE, FRAGMENT):
        b = d.pop(name)
        reps = [float(x) for x in b.get("repeats_total_s") or [b["total_s"]]]
        per = [x / d["variants"] for x in reps]
        runs[name] = {"kind": name, "repeats_total_s": reps, "total_s": b["total_s"], "per_image_s": b["per_image_s"],
                      "per_image_s_range": (min(per), max(per)), "images_per_min": b.get("images_per_min"),
                      **{k: b.get(k) for k in ("weight_bytes", "activation_peak_bytes", "peak_bytes_est",
                                               "cuda_peak_bytes", "params")}}
    f = runs[BASELINE]
    ratios = [a / b for a, b in zip(f["repeats_total_s"], runs[FRAGMENT]["repeats_total_s"], strict=False)]
    runs[FRAGMENT]["vs_baseline"] = {"speedup": d["speedup"], "speedup_range": (min(ratios), max(ratios)),
                                     "speedup_per_repeat": ratios, "weight_reduction": d["weight_reduction"],
                                     "peak_memory_reduction": d["peak_memory_reduction"]}
    d.update(schema_version=2, runs=runs, speedup_range=(min(ratios), max(ratios)),
             peak_kind="weights_plus_rss" if f["cuda_peak_bytes"] is None else "cuda_max_allocated")
    return d


def _peak(run: RunStats, kind: str) -> int | None:
    """The run's peak of the record's ``peak_kind``."""
    if run.memory is not None and kind != "weights_plus_rss":
        return run.memory.peak_bytes
    return run.cuda_peak_bytes if kind == "cuda_max_allocated" else run.peak_bytes_est


def _migrate(data: dict) -> dict:
    return _migrate_v2(_migrate_v1(data) if data.get("schema_version") == 1 else data)


def performance_block(result: BenchRecord | dict) -> dict:
    """The manifest's ``performance`` block (design names) from a bench record: peak_vram_* are the peaks of the
    record's peak_kind (the probes' generation peaks when they ran)."""
    rec = result if isinstance(result, BenchRecord) else BenchRecord.model_validate(_migrate(result))
    f, x = rec.full, rec.fragment
    mb = 2**20

    def peak(run: RunStats) -> float | None:
        value = _peak(run, rec.peak_kind)
        return None if value is None else value / mb

    return {"speedup": rec.speedup, "weight_reduction": rec.weight_reduction,
            "peak_memory_reduction": rec.peak_memory_reduction, "break_even_images": rec.break_even_images,
            "variants": rec.variants, "device": rec.device, "latency_full_ms": 1000 * f.per_image_s,
            "latency_fragment_ms": 1000 * x.per_image_s, "peak_vram_full_mb": peak(f),
            "peak_vram_fragment_mb": peak(x), "peak_kind": rec.peak_kind}

