"""The fragment manifest (`manifest.json`): a versioned pydantic schema, read and written in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragcli.errors import FragError
from fragcli.paths import atomic_write_text

SCHEMA_VERSION = 1
TYPE = "frag.fragment"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BaseModelRef(_Strict):
    name: str
    source: str
    hash: str = Field(min_length=64, max_length=64)
    dtype: str
    denoiser: str = "unet"

    @property
    def spec(self) -> str:
        """The ``--model`` spec that loads this base model."""
        from fragcli.models import spec_of

        return spec_of({"name": self.name, "source": self.source})


class Generation(_Strict):
    prompt: str
    negative_prompt: str = ""
    text_embedding_hash: str | None = None
    seeds: list[int]
    steps: int
    profiled_steps: list[int]
    guidance: float
    width: int
    height: int
    profile_dir: str | None = None  # where the profile was (its images are the full model's baseline)


class Pruning(_Strict):
    method: str = "attention_heads"
    score: str
    heads_removed: dict[str, list[int]]
    heads_total: int
    heads_kept: int
    head_retention: float
    achieved_retention: float
    per_module: bool
    safety_margin: float
    stability_threshold: float


class Artifact(_Strict):
    sha256: str = Field(min_length=64, max_length=64)
    bytes: int


class Manifest(_Strict):
    type_: str = Field(TYPE, alias="_type")
    schema_version: int = SCHEMA_VERSION
    frag_version: str
    name: str
    created: str
    base_model: BaseModelRef
    generation: Generation
    pruning: Pruning
    structure: dict[str, int]
    compression: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, int]
    weight_bytes: dict[str, int]
    quality: dict[str, Any] = Field(default_factory=dict)
    reuse: dict[str, Any] = Field(default_factory=dict)
    performance: dict[str, Any] = Field(default_factory=dict)
    costs: dict[str, float] = Field(default_factory=dict)
    artifacts: dict[str, Artifact]

    def dump(self) -> str:
        import json

        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2, sort_keys=True) + "\n"


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/manifest.json``; every problem becomes a one-line FragError."""
    import json

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FragError(f"no manifest.json in {folder}", "pass a folder written by frag extract")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FragError(f"manifest {path} is malformed JSON ({exc.msg} at line {getattr(exc, 'lineno', '?')})",
                        "rebuild the fragment with frag extract") from None
    if not isinstance(data, dict) or data.get("_type") != TYPE:
        raise FragError(f"{path} is not a frag fragment manifest", "rebuild the fragment with frag extract")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise FragError(f"manifest schema_version {data.get('schema_version')!r} is not supported (this frag reads "
                        f"{SCHEMA_VERSION})", "rebuild the fragment with this version of frag")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise FragError(f"manifest {path} is invalid at {where}: {first['msg']}",
                        "rebuild the fragment with frag extract") from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(Path(folder) / "manifest.json", manifest.dump())


def update_manifest(folder: Path, **blocks: dict) -> Manifest:
    """Replace whole blocks (quality, reuse, performance, ...) of a manifest, atomically."""
    manifest = read_manifest(folder)
    updated = manifest.model_copy(update=blocks)
    Manifest.model_validate(updated.model_dump(by_alias=True))
    write_manifest(folder, updated)
    return updated
