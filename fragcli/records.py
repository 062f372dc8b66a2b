"""The typed schema of the JSON files frag's stages write: ``context.json``, ``validation.json``, ``run.json``
(the report's files are in ``fragcli.report.schema``; the manifest is ``fragcli.manifest``, the head selection
``fragcli.techniques.head_selection.HeadSelection``, the benchmark ``fragcli.bench.BenchRecord``, the sweep
``fragcli.sweep.SweepRecord``), and the helpers every reader uses.

One pydantic model per file: the code that writes a file builds its model and writes
``model_dump(by_alias=True, mode="json")``; the code that reads it validates it with ``read_record``, so that a
malformed, wrong-typed, older or newer file is a one-line ``FragError`` naming the file and the field.
``docs/FORMATS.md`` is generated from these models (``python -m fragcli.formats --write``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fragcli.errors import FragError
from fragcli.library import Lookup
from fragcli.techniques.base import TechniqueSummary


class Block(BaseModel):
    """A nested block: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Record(Block):
    """A top-level file: ``_type`` + ``schema_version``; ``READS`` are the versions this frag reads."""

    TYPE: ClassVar[str]
    READS: ClassVar[tuple[int, ...]] = (1,)
    WHAT: ClassVar[str] = "file"
    FIX: ClassVar[str] = "re-run the stage that wrote it"

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


R = TypeVar("R", bound=BaseModel)


# ----------------------------------------------------------------------------------------------- shared blocks


class ModelInfo(Block):
    """The model as loaded (``LoadedModel.describe()``)."""

    name: str = Field(description="built-in name, Hugging Face id or folder name")
    source: str = Field(description="builtin:<name>, hf:<id> or the folder it was loaded from")
    hash: str = Field(description="SHA-256 over the model's safetensors files")
    device: str = Field(description="cpu | cuda | cuda:N | mps")
    dtype: str = Field(description="fp32 | fp16 | bf16")
    denoiser: str = Field(description="the pipeline component profiled and changed (unet | transformer)")


class ModelId(Block):
    """A model named by name and weight hash."""

    name: str
    hash: str | None = Field(None, description="SHA-256 over the model's safetensors files; null when unknown")


class Settings(Block):
    """Generation settings (``GenSettings``), every one resolved."""

    prompt: str
    steps: int = Field(description="denoising steps")
    guidance: float = Field(description="classifier-free guidance scale")
    width: int = Field(description="pixels")
    height: int = Field(description="pixels")
    negative_prompt: str = ""


class Versions(Block):
    """Library versions of the process that wrote the file."""

    frag: str
    torch: str
    diffusers: str
    transformers: str
    python: str


class MemoryUse(Block):
    """Peak memory while generating (``PeakMemory``) and the pipeline's resident weights."""

    peak_rss_bytes: int = Field(description="peak resident set size of the process, sampled every 5 ms")
    cuda_max_allocated_bytes: int | None = Field(description="torch.cuda.max_memory_allocated; null off CUDA")
    weight_bytes: int = Field(description="bytes of every parameter and buffer of the pipeline's torch components")


class BeforeAfter(Block):
    before: int = Field(description="the full model's")
    after: int = Field(description="with the fragment applied")


# --------------------------------------------------------------------------------------------- context.json


class ProfileTimings(Block):
    total_s: float = Field(description="wall seconds of the whole profile command")
    per_seed_s: list[float] = Field(description="profiled generation seconds, one per seed")
    plain_first_seed_s: float = Field(description="the first seed again without any patch, warm")
    profiled_first_seed_s: float = Field(description="= per_seed_s[0]")
    overhead_ratio: float | None = Field(description="median of per_seed_s / plain_first_seed_s (the first seed "
                                                    "again, warm, with no patch installed)")


def non_finite(data: Any, where: str = "") -> str | None:
    """The dotted name of the first NaN or infinite number in ``data`` (a JSON-like value), or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else where or "value"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class ProfileContext(Record):
    """``context.json``: what was profiled, how, and at what cost (``frag profile``)."""

    TYPE: ClassVar[str] = "frag.profile"
    WHAT: ClassVar[str] = "profile context"
    FIX: ClassVar[str] = "re-run frag profile with this version of frag"

    type_: Literal["frag.profile"] = Field("frag.profile", alias="_type")
    schema_version: Literal[1] = 1
    model: ModelInfo
    prompt: str
    negative_prompt: str = ""
    text_embedding_hash: str | None = Field(description="SHA-256 of the text encoder's output for the prompt")
    seeds: list[int]
    steps: int = Field(description="denoising steps of each generation")
    profiled_steps: list[int] = Field(description="0-based step indices that were recorded")
    timesteps: list[float] = Field(description="the scheduler's timesteps, one per step")
    guidance: float
    width: int
    height: int
    scheduler: str = Field(description="scheduler class name")
    exact_entropy: bool = Field(description="true: entropy over every query row; false: 256 evenly spaced rows")
    versions: Versions
    timings: ProfileTimings
    memory: MemoryUse
    rows: dict[str, int] = Field(description="Parquet table name -> rows written (profile, blocks, ...)")
    images: dict[str, str] = Field(description='seed -> relative path of the full model\'s image ("images/seed-0.png")')
    settings: Settings = Field(description="the resolved settings; validate reuses the images only when its own match")

    @model_validator(mode="after")
    def _finite(self) -> ProfileContext:
        """A NaN or infinite number here would be copied into the fragment's manifest, which cannot hold one."""
        bad = non_finite(self.model_dump())
        if bad:
            raise ValueError(f"{bad} is not a finite number")
        return self


# ------------------------------------------------------------------------------------------ validation.json


class ValidatedTechnique(Block):
    """A technique of the validated fragment, copied from its manifest."""

    name: str
    version: int
    summary: TechniqueSummary


class ImageResult(Block):
    """One seed: the fragment's image against the full model's."""

    seed: int
    clip_full: float | None = Field(description="CLIP score of the full model's image; null: CLIP unavailable")
    clip_fragment: float | None = Field(description="CLIP score of the fragment's image")
    clip_delta_rel: float | None = Field(description="(clip_fragment - clip_full) / |clip_full|; negative = worse")
    lpips: float | None = Field(description="LPIPS distance; null: LPIPS unavailable")
    ssim: float | None = Field(description="structural similarity (1 = identical)")
    phash_distance: int | None = Field(description="Hamming distance of the 64-bit perceptual hashes")
    passed: bool = Field(description="every available metric within its gate")
    failures: list[str] = Field(default_factory=list, description="one message per failed gate")


class Aggregate(Block):
    """Means over the seeds (``clip_delta_rel`` from the two CLIP means)."""

    clip_full_mean: float | None = Field(description="mean CLIP score of the full model's images")
    clip_fragment_mean: float | None = Field(description="mean CLIP score of the fragment's images")
    clip_delta_rel: float | None = Field(description="(clip_fragment_mean - clip_full_mean) / |clip_full_mean|")
    lpips_mean: float | None
    ssim_mean: float | None
    phash_mean: float | None = Field(description="mean perceptual-hash distance")
    pass_rate: float | None = Field(description="share of images that passed")


class ParaphraseResult(Block):
    """One paraphrased prompt, over the paraphrase seeds (means)."""

    prompt: str
    clip_full: float | None
    clip_fragment: float | None
    clip_delta_rel: float | None
    lpips: float | None
    ssim: float | None
    phash_distance: float | None
    passed: bool
    failures: list[str] = Field(default_factory=list)


class Paraphrases(Block):
    prompts: list[str]
    seeds: list[int] = Field(description="the seeds each paraphrase was generated with")
    per_prompt: list[ParaphraseResult]
    pass_rate: float | None = Field(description="share of paraphrases that passed (H3)")


class ValidationRecord(Record):
    """``validation.json``: the fragment against its full model on the same seeds (``frag validate``)."""

    TYPE: ClassVar[str] = "frag.validation"
    READS: ClassVar[tuple[int, ...]] = (2,)
    WHAT: ClassVar[str] = "validation record"
    FIX: ClassVar[str] = "re-run frag validate with this version of frag"

    type_: Literal["frag.validation"] = Field("frag.validation", alias="_type")
    schema_version: Literal[2] = 2
    fragment: str = Field(description="the fragment folder that was validated")
    fragment_name: str
    manifest_sha256: str = Field(description="SHA-256 of its manifest.json when validated")
    model: ModelId
    mode: Literal["physical", "simulate"] = Field(description="physical: the fragment as loaded; simulate: masks")
    prompt: str
    settings: Settings
    seeds: list[int]
    reused_profile_images: list[int] = Field(default_factory=list,
                                             description="seeds whose full-model image came from --profile")
    techniques: list[ValidatedTechnique] = Field(description="the fragment's techniques, in order (H1 reads them)")
    params: BeforeAfter = Field(description="pipeline parameters")
    weight_bytes: BeforeAfter = Field(description="pipeline weight bytes")
    per_image: list[ImageResult]
    aggregate: Aggregate
    unavailable: dict[str, str] = Field(default_factory=dict, description="metric -> why it was not measured")
    paraphrases: Paraphrases | None = Field(None, description="null: no paraphrases were validated")
    thresholds: dict[str, float] = Field(description="gate name -> value used")
    failures: list[str] = Field(default_factory=list, description="gates the aggregate failed")
    passed: bool = Field(description="the aggregate passes every available gate")


# --------------------------------------------------------------------------------------------------- run.json


class RunRecord(Record):
    """``run.json``: one ``frag generate`` run (the fragment, or the full model when it was refused)."""

    TYPE: ClassVar[str] = "frag.run"
    WHAT: ClassVar[str] = "run record"
    FIX: ClassVar[str] = "re-run frag generate"

    type_: Literal["frag.run"] = Field("frag.run", alias="_type")
    schema_version: Literal[1] = 1
    out: str = Field(description="the folder the images went to")
    model: ModelInfo
    fragment: str | None = Field(description="the fragment folder used; null: the full model")
    fallback_reason: str | None = Field(description="why a requested fragment was not used")
    settings: Settings
    seeds: list[int]
    batch_size: int
    per_image_s: dict[str, float] = Field(description="seed -> seconds (a batch's time split evenly)")
    total_s: float
    images_per_min: float | None
    memory: MemoryUse
    params: int = Field(description="parameters of the pipeline's torch components")
    images: dict[str, str] = Field(description="seed -> image file name")
    versions: Versions
    library: Lookup | None = Field(None, description="--fragment auto: the fragment library's decision (the "
                                   "fragment chosen, its similarity, why the others were rejected)")


# ------------------------------------------------------------------------------------------------- reading


def invalid(path: Path | str, exc: ValidationError, fix: str) -> FragError:
    """A pydantic error as one line: the file, the first failing field, what is wrong."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "top level"
    return FragError(f"{path} is invalid at {where}: {first['msg']}", fix)


def parse_record(cls: type[R], data: Any, path: Path | str, fix: str | None = None) -> R:
    """Validate ``data`` (already-parsed JSON) read from ``path`` as ``cls``; every problem is a FragError.

    ``_type`` and ``schema_version`` are checked first for a ``Record`` (older and newer versions are named);
    ``fix`` overrides the record's own advice."""
    fix = fix or getattr(cls, "FIX", "re-run the stage that wrote it")
    want = getattr(cls, "TYPE", None)
    if want is not None:
        if not isinstance(data, dict) or data.get("_type") != want:
            raise FragError(f"{path} is not a frag {getattr(cls, 'WHAT', 'file')} (_type is not {want})", fix)
        reads = getattr(cls, "READS", (1,))
        version = data.get("schema_version")
        if version not in reads:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > max(reads)
            raise FragError(f"{path} has schema_version {version!r}; this frag reads "
                            f"{', '.join(map(str, reads))}", "upgrade frag" if newer else fix)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise invalid(path, exc, fix) from None


def read_record(cls: type[R], path: Path | str) -> R:
    """Read ``path`` and validate it as ``cls`` (missing, malformed or invalid -> one-line FragError)."""
    from fragcli.paths import read_json

    return parse_record(cls, read_json(Path(path), getattr(cls, "WHAT", "JSON file")), path)


def write_record(path: Path | str, record: BaseModel) -> dict[str, Any]:
    """Write ``record`` atomically (sorted keys, by alias); returns what was written."""
    from fragcli.paths import atomic_write_json

    data = record.model_dump(by_alias=True, mode="json")
    atomic_write_json(Path(path), data)
    return data
