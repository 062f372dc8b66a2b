"""The typed schema of the report's files: ``metrics_summary.json`` (``ReportSummary``), ``regression_diff.json``
(``RegressionDiff``), ``head_importance.json`` (``HeadImportance``), and ``ComparedReport``: the part of an earlier
report of any schema_version that a regression diff reads. Written with ``fragcli.records.write_record``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fragcli.records import Aggregate, Block, ModelId, Record, Versions

# ------------------------------------------------------------------------------ head_importance.json (report)


class ModuleImportance(Block):
    """One attention module: per-head means over seeds x profiled steps, joined with the selection."""

    module: str
    block: str | None = Field(description="enclosing top-level block; null without a profile")
    kind: str | None = Field(description="self | cross; null without a profile")
    heads: int
    energy_post: list[float | None]
    energy_pre: list[float | None]
    entropy: list[float | None] = Field(description="null where the module was not profiled for entropy")
    removed: list[int]
    protected: list[int]
    score: list[float | None] | None = Field(description="the selection's score per head")
    status: list[Literal["kept", "removed", "protected"]] | None = Field(description="per head; null: no selection")
    kept: int | None


class ImportanceTotals(Block):
    modules: int
    heads: int
    removed: int | None
    removed_fraction: float | None


class HeadImportance(Record):
    """``head_importance.json``: per-head usage from profile.parquet and the head selection (``frag report``)."""

    TYPE: ClassVar[str] = "frag.head_importance"
    WHAT: ClassVar[str] = "head importance"
    FIX: ClassVar[str] = "re-run frag report"

    type_: Literal["frag.head_importance"] = Field("frag.head_importance", alias="_type")
    schema_version: Literal[1] = 1
    model: ModelId
    sources: dict[str, str | None] = Field(description="profile, selection -> the file read (relative), or null")
    statistic: str = Field(description="how the per-head numbers were aggregated")
    modules: list[ModuleImportance] = Field(description="in network order")
    totals: ImportanceTotals


# ------------------------------------------------------------------------------ regression_diff.json (report)


class DiffRow(Block):
    """One key metric against the comparison report."""

    metric: str
    baseline: float | None
    current: float | None
    better: Literal["higher", "lower"]
    tolerance: float | None = Field(description="from thresholds.yaml's regression block; null: never gates")
    tolerance_kind: Literal["absolute", "relative"]
    tolerance_key: str
    delta: float | None = Field(description="current - baseline")
    delta_rel: float | None = Field(description="delta / |baseline|")
    limit: float | None = Field(description="the worst value that still passes")
    status: Literal["PASS", "FAIL", "INFO", "MISSING", "INVALID", "UNAVAILABLE"] = Field(
        description="INFO/MISSING: reported only (null tolerance); INVALID: a gated metric missing or not finite on "
        "a side; UNAVAILABLE: the same, but listed in regression.optional (skipped)")
    note: str | None = Field(None, description="why the metric could not be compared")


class ComparedWith(Block):
    path: str
    run_id: str | None
    created: str | None
    model: dict[str, Any] | None = Field(description="the comparison report's model block, as written")


class RegressionDiff(Record):
    """``regression_diff.json``: key metrics against an earlier report (``frag report --compare``)."""

    TYPE: ClassVar[str] = "frag.regression_diff"
    WHAT: ClassVar[str] = "regression diff"
    FIX: ClassVar[str] = "re-run frag report"

    type_: Literal["frag.regression_diff"] = Field("frag.regression_diff", alias="_type")
    schema_version: Literal[1] = 1
    compare: str = Field(description="the --compare argument")
    baseline: ComparedWith | None = Field(description="null: nothing to compare with (see note)")
    note: str
    metrics: list[DiffRow]
    passed: bool
    failures: list[str] = Field(description="metrics that regressed beyond their tolerance")
    invalid: list[str] = Field(default_factory=list, description="what could not be compared (a gated metric "
                               "missing or not finite; no baseline report for --compare baseline)")


# ------------------------------------------------------------------------------ metrics_summary.json (report)


class RunRef(Block):
    id: str = Field(description="the run folder's name")
    dir: str


class TechniqueRow(Block):
    """One technique of the fragment, from its summary."""

    name: str
    unit: str | None
    units_removed: int | None
    units_total: int | None
    removed_fraction: float | None
    params_removed: int
    bytes_saved: int


class FragmentBlock(Block):
    name: str | None = None
    path: str | None = Field(None, description="the fragment folder")
    hash: str | None = Field(None, description="SHA-256 of its manifest.json")
    techniques: list[TechniqueRow] = Field(default_factory=list, description="in order")


class HypothesisRow(Block):
    id: str = Field(description="H1 .. H5")
    statement: str = Field(description="the hypothesis with this run's thresholds")
    value: float | None = Field(description="the measurement; null: UNAVAILABLE")
    threshold: float
    direction: Literal["min", "max"] = Field(description="min: value >= threshold passes; max: value <= threshold")
    status: Literal["PASS", "WARN", "FAIL", "UNAVAILABLE"] = Field(
        description="WARN: passes on a smaller sample than the hypothesis asks for")
    evidence: str = Field(description="the file and numbers the value came from")
    note: str = ""


class QualityBlock(Block):
    """The run's own validation, summarised."""

    source: str | None = Field(description="the validation.json read; null: none")
    mode: str | None = None
    prompt: str | None = None
    seeds: int = 0
    removed_fraction: dict[str, float] = Field(default_factory=dict, description="unit -> fraction removed")
    aggregate: Aggregate | None = None
    unavailable: dict[str, str] = Field(default_factory=dict)
    reuse_pass_rate: float | None = None
    paraphrases: int = 0
    passed: bool | None = None


class Contender(Block):
    """One row of the bench table: a contender of bench.json against the full model."""

    kind: str = Field(description="full | fragment | peer")
    description: str = ""
    per_image_s: float | None = None
    speedup: float | None = Field(None, description="median over the repeats; null for the full model")
    speedup_range: list[float] | None = None
    clip_delta_rel: float | None = None
    ssim_mean: float | None = None
    phash_mean: float | None = None
    pass_rate: float | None = None


class PerformanceBlock(Block):
    """Speed from bench.json (the fragment against the full model) and profiling cost from context.json."""

    source: str | None = Field(description="the bench.json read; null: none")
    device: str | None = None
    variants: int | None = None
    steps: int | None = None
    repeats: int | None = None
    full_per_image_s: float | None = None
    fragment_per_image_s: float | None = None
    full_images_per_min: float | None = None
    fragment_images_per_min: float | None = None
    speedup: float | None = None
    speedup_range: list[float] | None = Field(None, description="[min, max] over the bench repeats")
    break_even_images: float | None = Field(None, description="H5, the design formula: (profile + extract s) / "
                                                            "seconds saved per image")
    break_even_images_marginal: float | None = Field(None, description="the same crediting the profile's own "
                                                                     "full-model images")
    contenders: dict[str, Contender] = Field(default_factory=dict, description="bench.json's runs, side by side "
                                                                              "(peers included)")
    unavailable_contenders: dict[str, str] = Field(default_factory=dict, description="peers asked for that did not "
                                                                                    "run, and why")
    profile_cost_s: float | None = None
    extract_cost_s: float | None = None
    profile_total_s: float | None = None
    profile_overhead_ratio: float | None = None


class MemoryBlock(Block):
    """Weights and peak memory: bench.json first, else the manifest's or the validation's weight counts."""

    source: str | None
    full_weight_bytes: float | None = None
    fragment_weight_bytes: float | None = None
    weight_reduction: float | None = None
    full_params: float | None = None
    fragment_params: float | None = None
    full_peak_bytes: float | None = None
    fragment_peak_bytes: float | None = None
    full_cuda_peak_bytes: float | None = None
    fragment_cuda_peak_bytes: float | None = None
    peak_memory_reduction: float | None = None


class KeyMetrics(Block):
    """The numbers a later report diffs against by name (``report.diff.RULES``); null: not measured."""

    clip_delta_rel: float | None = Field(description="the validation's aggregate")
    lpips_mean: float | None
    ssim_mean: float | None
    phash_mean: float | None
    pass_rate: float | None = Field(description="share of validated images that passed")
    reuse_pass_rate: float | None = Field(description="share of paraphrases that passed")
    removed_fraction: dict[str, float] = Field(default_factory=dict, description="unit -> fraction removed "
                                                                                 "(reported, never diffed)")
    speedup: float | None = Field(description="bench: full / fragment time per image")
    full_per_image_s: float | None
    fragment_per_image_s: float | None
    break_even_images: float | None
    fragment_weight_bytes: float | None
    weight_reduction: float | None = Field(description="1 - fragment / full weight bytes")
    fragment_peak_bytes: float | None = Field(description="bench: weights + activation peak")
    fragment_cuda_peak_bytes: float | None
    peak_memory_reduction: float | None


class ValidationPoint(Block):
    """One validation point (the run's and the --sweep folders'), for H1 and quality_vs_retention.png."""

    source: str
    removed_fraction: dict[str, float] = Field(description="unit -> fraction removed, from the technique summaries")
    clip_delta_rel: float | None
    lpips_mean: float | None
    ssim_mean: float | None
    phash_mean: float | None
    pass_rate: float | None


class GateRow(Block):
    gate: str
    kind: Literal["quality", "hypothesis", "regression"]
    measured: float | None
    threshold: float | None
    direction: Literal["min", "max"] | None
    status: Literal["PASS", "FAIL", "UNAVAILABLE", "INVALID"] = Field(
        description="INVALID: a gate that could not be measured (not optional); UNAVAILABLE: optional and unmeasured")
    source: str | None = Field(description="the file the measurement came from")
    message: str


class RegressionBlock(Block):
    compare: str
    baseline: ComparedWith | None
    note: str
    passed: bool
    failures: list[str]


class GateVerdict(Block):
    enforced: bool = Field(description="true with --gate: a failure exits 1, an unmeasured gate exits 3")
    passed: bool
    status: Literal["PASS", "FAIL", "INVALID"] = Field(description="FAIL beats INVALID beats PASS")
    failures: list[str] = Field(description="one message per failed gate")
    invalid: list[str] = Field(default_factory=list, description="one message per gate that could not be measured")


class HostInfo(Block):
    run: str | None = Field(description="the device the run's measurements were made on")
    host: str
    platform: str
    machine: str
    cpus: int | None


class Provenance(Block):
    git_commit: str | None
    versions: dict[str, str | None] = Field(description="frag, python and the libraries, in the report's process")
    run_versions: Versions | None = Field(description="the profile's versions")
    device: HostInfo
    inputs: dict[str, str] = Field(description="role (profile, manifest, selection, validation, bench) -> file")


class ReportSummary(Record):
    """``metrics_summary.json``: hypotheses, gates, key metrics and provenance of one run (``frag report``)."""

    TYPE: ClassVar[str] = "frag.report"
    READS: ClassVar[tuple[int, ...]] = (2,)
    WHAT: ClassVar[str] = "report summary"
    FIX: ClassVar[str] = "re-run frag report"

    type_: Literal["frag.report"] = Field("frag.report", alias="_type")
    schema_version: Literal[2] = 2
    created: str = Field(description="UTC time, ISO 8601")
    run: RunRef
    model: ModelId
    fragment: FragmentBlock
    hypotheses: list[HypothesisRow]
    quality: QualityBlock
    performance: PerformanceBlock
    memory: MemoryBlock
    metrics: KeyMetrics
    sweep: list[ValidationPoint] = Field(description="every validation point: the run's and the --sweep folders'")
    thresholds: dict[str, float | list[str]] = Field(description="gate -> value, and gate_hypotheses")
    notes: list[str]
    provenance: Provenance
    gates: list[GateRow]
    regression: RegressionBlock
    gate: GateVerdict
    report_dir: str
    files: list[str] = Field(description="the files written into the report folder")


class ComparedReport(BaseModel):
    """The part of a ``metrics_summary.json`` of any schema_version that a later report compares with."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type_: Literal["frag.report"] = Field(alias="_type")
    schema_version: int
    created: str | None = None
    run: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(description="read by name (report.diff.RULES); other keys are ignored")
