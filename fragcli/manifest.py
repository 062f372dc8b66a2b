"""The fragment manifest (`manifest.json`, schema_version 2): one pydantic schema, read and written here only.

Layers (the design documents'): base model, profiling context, decisions (the ordered ``techniques``), the weight
delta, quality, performance, reuse, costs, and the artifacts with their SHA-256. Version 1 manifests (head pruning
only) are migrated to version 2 in memory when read. No absolute local path is ever stored: a fragment folder is
meant to be copied and shared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fragcli.errors import FragError
from fragcli.paths import atomic_write_text
from fragcli.techniques.base import TechniqueSummary

SCHEMA_VERSION = 2
READS = (1, 2)
TYPE = "frag.fragment"
WEIGHTS = "fragment.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def plain_path(rel: str) -> str:
    """A file name the manifest may hold: UTF-8 text without NUL or backslash, each part at most 255 bytes (the
    OS would refuse anything else with an exception instead of an answer; ``paths.inside`` checks escapes)."""
    try:
        parts = [p.encode("utf-8") for p in rel.split("/")]
    except UnicodeEncodeError:
        raise ValueError(f"path {rel[:40]!r} is not valid UTF-8 text") from None
    if "\x00" in rel or "\\" in rel or any(len(p) > 255 for p in parts) or len(rel) > 4096:
        raise ValueError(f"path {rel[:40]!r} is not a plain relative file name (NUL, backslash or too long)")
    return rel


class BaseModelRef(_Strict):
    """The model the fragment was cut from; loading refuses any other (by hash)."""

    name: str
    source: str = Field(description="builtin:<name>, hf:<id> or the folder it was loaded from")
    hash: str = Field(min_length=64, max_length=64, description="SHA-256 over the model's safetensors files")
    dtype: str = Field(description="dtype the fragment was built in (fp32 | fp16 | bf16)")
    denoiser: str = Field("unet", description="the pipeline component the techniques change (unet | transformer)")

    @property
    def spec(self) -> str:
        """The ``--model`` spec that loads this base model."""
        from fragcli.models import spec_of

        return spec_of({"name": self.name, "source": self.source})


class Profiling(_Strict):
    """The profiling context the decisions were made from."""

    prompt: str
    negative_prompt: str = ""
    prompt_embedding_hash: str | None = Field(None, description="SHA-256 of the text encoder's output for the prompt")
    seeds: list[int]
    steps: int = Field(description="denoising steps of the profiled generations")
    profiled_steps: list[int]
    guidance: float
    width: int
    height: int
    context_sha256: str | None = Field(None, description="SHA-256 of the profile's context.json (identifies it)")


class TechniqueEntry(_Strict):
    """One decision: a registered technique, its config version, its config and what it did."""

    name: str
    version: int
    config: dict[str, Any]
    summary: TechniqueSummary = Field(default_factory=TechniqueSummary)


class WeightDelta(_Strict):
    """The generic state-dict diff against the base denoiser; keys are prefixed by component (``unet.``)."""

    file: str | None = Field(WEIGHTS, description="the safetensors file inside the fragment folder; null: removals only")
    changed: list[str] = Field(default_factory=list, description="keys whose values, shape or dtype changed")
    added: list[str] = Field(default_factory=list, description="keys the techniques added (e.g. low-rank factors)")
    removed: list[str] = Field(default_factory=list, description="keys the techniques removed")

    @field_validator("file")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        return v if v is None else plain_path(v)


class Quality(_Strict):
    """Filled by ``frag validate`` (design names)."""

    clip_delta_mean: float | None = Field(None, description="relative CLIP-score change, fragment vs full")
    clip_full_mean: float | None = None
    clip_fragment_mean: float | None = None
    lpips_mean: float | None = None
    ssim_mean: float | None = None
    phash_mean: float | None = None
    pass_rate: float | None = Field(None, description="share of images passing the per-image gates")
    samples: int = Field(0, description="images compared")
    seeds: list[int] = Field(default_factory=list)
    thresholds_passed: bool | None = None
    failures: list[str] = Field(default_factory=list)
    unavailable: dict[str, str] = Field(default_factory=dict, description="metric -> why it was not measured")


class Reuse(_Strict):
    """Filled by ``frag validate`` with paraphrases."""

    paraphrase_pass_rate: float | None = None
    paraphrases_tested: int = 0
    paraphrases_passed: int = 0
    similarity_metric: str | None = None


class Performance(_Strict):
    """Filled by ``frag bench`` (design names; on CPU the peak is weights + peak RSS growth, see peak_kind)."""

    device: str | None = None
    variants: int | None = None
    latency_full_ms: float | None = None
    latency_fragment_ms: float | None = None
    peak_vram_full_mb: float | None = None
    peak_vram_fragment_mb: float | None = None
    peak_kind: str | None = Field(None, description="cuda_max_allocated | weights_plus_rss")
    speedup: float | None = None
    weight_reduction: float | None = None
    peak_memory_reduction: float | None = None
    break_even_images: float | None = None


class Costs(_Strict):
    profile_s: float = 0.0
    extract_s: float = Field(0.0, description="wall seconds of frag extract, recipe search included")
    search_s: float = Field(0.0, description="of which the recipe search (--objective); 0 without one")


class Artifact(_Strict):
    sha256: str = Field(min_length=64, max_length=64)
    bytes: int


class Manifest(_Strict):
    type_: Literal["frag.fragment"] = Field(TYPE, alias="_type")
    schema_version: Literal[2] = SCHEMA_VERSION
    frag_version: str
    name: str
    created: str
    base_model: BaseModelRef
    profiling: Profiling
    techniques: list[TechniqueEntry] = Field(description="ordered: applied first to last")
    weights: WeightDelta | None = Field(None, description="null: a runtime-only fragment with no weight delta")
    params: dict[str, int] = Field(description="pipeline parameters before, after, removed")
    weight_bytes: dict[str, int] = Field(description="pipeline weight bytes before, after")
    quality: Quality | None = None
    reuse: Reuse | None = None
    performance: Performance | None = None
    costs: Costs = Field(default_factory=Costs)
    artifacts: dict[str, Artifact] = Field(description="relative path -> SHA-256 and size")
    content_sha256: str | None = Field(None, description="SHA-256 of this manifest's canonical JSON without this "
                                                         "field; checked on every read")

    @field_validator("artifacts")
    @classmethod
    def _plain(cls, v: dict[str, Artifact]) -> dict[str, Artifact]:
        for rel in v:
            plain_path(rel)
        return v

    def dump(self) -> str:
        data = self.model_dump(by_alias=True, mode="json")
        data["content_sha256"] = content_hash(data)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def technique(self, name: str) -> TechniqueEntry | None:
        return next((t for t in self.techniques if t.name == name), None)


def content_hash(data: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON (sorted keys, no spaces) of a manifest dict, without ``content_sha256``."""
    import hashlib

    body = {k: v for k, v in data.items() if k != "content_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fail(path: Path, exc: ValidationError) -> FragError:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "top level"
    return FragError(f"manifest {path} is invalid at {where}: {first['msg']}", "rebuild the fragment with frag extract")


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/manifest.json`` (v1 migrated in memory); every problem is a one-line FragError."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FragError(f"no manifest.json in {folder}", "pass a folder written by frag extract")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FragError(f"manifest {path} is not UTF-8 text (byte {exc.start})",
                        "rebuild the fragment with frag extract") from None
    except json.JSONDecodeError as exc:
        raise FragError(f"manifest {path} is malformed JSON ({exc.msg} at line {exc.lineno})",
                        "rebuild the fragment with frag extract") from None
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of more than 4300 digits
        kind = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0][:80]
        raise FragError(f"manifest {path} is malformed JSON ({kind})", "rebuild the fragment with frag extract") from None
    if not isinstance(data, dict) or data.get("_type") != TYPE:
        raise FragError(f"{path} is not a frag fragment manifest", "rebuild the fragment with frag extract")
    version = data.get("schema_version")
    if version not in READS:
        raise FragError(f"manifest schema_version {version!r} is not supported (this frag reads "
                        f"{', '.join(map(str, READS))})", "rebuild the fragment with this version of frag")
    if version == 2:
        try:
            ok = data.get("content_sha256") == content_hash(data)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise FragError(f"manifest {path} does not match its content_sha256 (edited by hand or damaged)",
                            "rebuild the fragment with frag extract, or restore the manifest frag wrote")
    if version == 1:
        from fragcli.manifest_v1 import migrate_v1

        try:
            data = migrate_v1(data, Path(folder))
        except ValidationError as exc:
            raise _fail(path, exc) from None
        except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as exc:  # a block of the wrong type
            raise FragError(f"version 1 manifest {path} cannot be migrated ({type(exc).__name__}: {str(exc)[:80]})",
                            "rebuild the fragment with frag extract") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise _fail(path, exc) from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(Path(folder) / "manifest.json", manifest.dump())


def update_manifest(folder: Path, **blocks: BaseModel | dict | None) -> Manifest:
    """Replace whole blocks (quality, reuse, performance) of a manifest, atomically (a v1 manifest becomes v2)."""
    manifest = read_manifest(folder)
    fields = Manifest.model_fields
    typed = {}
    for key, value in blocks.items():
        if key not in ("quality", "reuse", "performance"):
            raise ValueError(f"manifest block {key!r} cannot be updated")
        cls = fields[key].annotation.__args__[0]  # X | None -> X
        typed[key] = value if value is None or isinstance(value, BaseModel) else cls.model_validate(value)
    updated = manifest.model_copy(update=typed)
    Manifest.model_validate(updated.model_dump(by_alias=True))
    write_manifest(folder, updated)
    return updated
