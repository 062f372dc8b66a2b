"""The technique protocol: what every technique provides, so that the rest of frag never knows one by name.

A technique is one file in ``fragcli/techniques/`` holding a versioned config (a ``TechniqueConfig``) and a
``Technique`` subclass registered once (``register``). frag calls, in this order:

- ``plan(profile, options) -> Plan | None`` (optional): choose a config from a profile (``options`` are the
  technique's own ``extract`` options; ``None`` = the technique is not asked for);
- ``check(denoiser, config)``: refuse (``FragError``) a config that does not fit this model, changing nothing;
- ``apply(denoiser, config) -> Applied``: compute the change from the current weights (structure and/or a named
  reversible runtime patch) — used by ``frag extract``;
- ``rebuild(denoiser, config) -> Applied``: recreate the same structure and runtime patch without computing any
  value (the weights may be on the meta device or about to be overwritten by the fragment's delta) — used by
  ``load_fragment``, first on a meta-device copy to check, then on the real denoiser;
- ``mask(denoiser, config) -> Patch | None``: a logical simulation on the untouched weights, where one exists;
- ``collectors() -> list[Collector]``: the profile signals the technique's ``plan`` reads;
- ``summary(config, denoiser) -> TechniqueSummary``: units removed, parameters and bytes saved, read by the
  report, H1 and the sweep plot;
- ``capture(loaded, config, settings)`` / ``attach(pipe, config, tensors, evict=, reload=)`` (optional): for a
  technique that acts on the pipeline rather than the denoiser (cached prompt embeddings): tensors computed from
  the whole pipeline at extract time, saved as ``<name>.safetensors``, and the pipeline patch installed at load.

A technique that changes no tensor (a step schedule, a guidance cut) derives from ``RuntimeTechnique`` and
implements ``install`` alone: ``apply``, ``rebuild`` and ``mask`` are that runtime patch, and a fragment may have
no weight delta at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from fragcli.patches import Patch


class TechniqueConfig(BaseModel):
    """Base of every technique's config: strict (unknown keys refused), immutable, JSON round-trip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TechniqueConfig:
        return cls.model_validate(data)


class TechniqueSummary(BaseModel):
    """What one technique did to one denoiser; the generic numbers the report, H1 and the sweep read."""

    model_config = ConfigDict(extra="forbid")

    unit: str | None = Field(None, description="what the technique removes or changes, e.g. attention_heads; "
                                                "null for a runtime-only technique")
    units_total: int | None = Field(None, description="units of that kind in the base denoiser")
    units_removed: int | None = Field(None, description="units removed (or changed) by the technique")
    removed_fraction: float | None = Field(None, description="units_removed / units_total")
    params_removed: int = Field(0, description="parameters removed from the denoiser")
    bytes_saved: int = Field(0, description="weight bytes saved in the denoiser")
    details: dict[str, Any] = Field(default_factory=dict, description="technique-specific numbers")


@dataclass
class Applied:
    """The result of ``apply``/``rebuild``: the runtime patch it installed, if any (structural changes are in
    the denoiser itself and are found by the state-dict diff)."""

    technique: str
    patch: Patch | None = None
    config: TechniqueConfig | None = None  # the config as resolved by ``apply`` from the weights (e.g. the ranks a
    # low-rank energy target gives); the stack saves it in the manifest instead of the planned one


def threshold_option(value, option: str, what: str, example: str, *, zero_ok: bool = False,
                     below_one: bool = False) -> float:
    """A threshold lever's value as a float, or the one-line FragError naming ``option`` (positive, or >= 0 with
    ``zero_ok``; below 1 with ``below_one``)."""
    import math

    from fragcli.errors import FragError

    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or (v < 0 if zero_ok else v <= 0) or (below_one and v >= 1):
        raise FragError(f"{option} {value} is not {what}", f"pass e.g. {option} {example}")
    return v


@dataclass
class Plan:
    """A planned config, and an optional record of how it was chosen, saved beside the manifest as ``file``."""

    config: TechniqueConfig
    record: dict[str, Any] | None = None
    file: str | None = None


@dataclass
class Collector:
    """A profile signal: a Parquet table (``<table>.parquet``) with declared columns, filled while profiling.

    ``columns`` is a list of (name, pyarrow type name) pairs; ``install(denoiser, recorder) -> Patch`` installs the
    named, reversible patch that fills the recorder's rows for ``table``.
    """

    name: str
    table: str
    columns: list[tuple[str, str]]
    install: Callable[..., Patch]
    remove: Callable[..., bool] | None = None
    docs: dict[str, str] = field(default_factory=dict)  # column -> what it holds (docs/FORMATS.md)


class Technique:
    """Subclass, set ``name``/``version``/``Config``, implement ``apply``/``rebuild``/``summary`` and register."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type[TechniqueConfig]]
    options: ClassVar[dict[str, Any]] = {}  # extract option name -> default, for plan()
    records: ClassVar[dict[str, type[BaseModel]]] = {}  # file a Plan.record is written to -> its schema

    def plan(self, profile: Any, options: dict[str, Any]) -> Plan | None:
        return None

    def check(self, denoiser, config: TechniqueConfig) -> None:
        """Refuse a config that does not fit ``denoiser`` (FragError); change nothing."""

    def apply(self, denoiser, config: TechniqueConfig) -> Applied:
        raise NotImplementedError

    def rebuild(self, denoiser, config: TechniqueConfig) -> Applied:
        raise NotImplementedError

    def mask(self, denoiser, config: TechniqueConfig) -> Patch | None:
        return None

    def collectors(self) -> list[Collector]:
        return []

    def capture(self, loaded, config: TechniqueConfig, settings) -> tuple[TechniqueConfig, dict[str, Any]] | None:
        """Pipeline-level tensors computed at extract time from the whole, unchanged pipeline (``loaded`` is a
        ``LoadedModel``, ``settings`` the profile's ``GenSettings``): returns the resolved config and the tensors,
        saved in the fragment as ``<name>.safetensors``; None = nothing to capture (the default)."""
        return None

    def attach(self, pipe, config: TechniqueConfig, tensors: dict[str, Any], *, evict: bool | None = None,
               reload: Callable[[], dict[str, Any]] | None = None) -> Patch | None:
        """Install a pipeline-level runtime patch at load time, from the tensors ``capture`` saved (``evict``: drop
        the components the technique makes unnecessary; ``reload()`` brings them back when a call needs them)."""
        return None

    def evicts(self, config: TechniqueConfig, evict: bool | None = None) -> list[str]:
        """Name prefixes of pipeline components that ``attach`` will drop (a loader need not load them at all)."""
        return []

    def summary(self, config: TechniqueConfig, denoiser) -> TechniqueSummary:
        return TechniqueSummary()

    def migrate_v1(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """The ``techniques[]`` entry for this technique in a schema_version 1 manifest dict, if it has one."""
        return None


class RuntimeTechnique(Technique):
    """A technique that changes no tensor (a step schedule): ``apply`` = ``rebuild`` = its named runtime patch
    (``install``), and its ``mask`` is the same patch (the simulation is the thing itself)."""

    def install(self, denoiser, config: TechniqueConfig) -> Patch:
        raise NotImplementedError

    def apply(self, denoiser, config: TechniqueConfig) -> Applied:
        return Applied(self.name, self.install(denoiser, config))

    def rebuild(self, denoiser, config: TechniqueConfig) -> Applied:
        return self.apply(denoiser, config)

    def mask(self, denoiser, config: TechniqueConfig) -> Patch:
        return self.install(denoiser, config)


@dataclass
class Registry:
    """Techniques by name, in registration order."""

    techniques: dict[str, Technique] = field(default_factory=dict)

    def register(self, technique: Technique) -> Technique:
        if technique.name in self.techniques:
            raise ValueError(f"technique {technique.name!r} is registered twice")
        self.techniques[technique.name] = technique
        return technique

    def unregister(self, name: str) -> None:
        self.techniques.pop(name, None)

    def get(self, name: str) -> Technique:
        from fragcli.errors import FragError

        try:
            return self.techniques[name]
        except KeyError:
            raise FragError(f"unknown technique {name!r} (this frag knows: {', '.join(self.techniques) or 'none'})",
                            "upgrade frag, or rebuild the fragment with this version") from None

    def for_config(self, config: TechniqueConfig) -> Technique:
        for t in self.techniques.values():
            if type(config) is t.Config:
                return t
        raise TypeError(f"no technique registered for {type(config).__name__}")

    def __iter__(self):
        return iter(self.techniques.values())
