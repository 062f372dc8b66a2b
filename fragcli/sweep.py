"""`frag sweep PROFILE`: extract + validate at several values of one extract option, so H1 is answered with a curve.

Each value is one point: ``<out>/<point>/fragment`` (frag extract) and ``<out>/<point>/validate`` (frag validate),
then ``<out>/sweep.json`` lists them. The whole folder is built beside ``out`` and swapped in at the end, so an
interrupted sweep leaves ``out`` as it was. ``frag report --sweep <out>`` finds the points by their
validation.json files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError
from fragcli.techniques.base import TechniqueSummary

TYPE = "frag.sweep"
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PointTechnique(_Strict):
    name: str
    summary: TechniqueSummary


class SweepPoint(_Strict):
    """One value of the swept option: its fragment and its validation."""

    name: str = Field(description="the point's folder inside the sweep folder, e.g. h70")
    value: float = Field(description="the swept option's value")
    fragment: str = Field(description="the fragment folder, relative to the sweep folder")
    validation: str = Field(description="validation.json, relative to the sweep folder")
    techniques: list[PointTechnique] = Field(description="the fragment's techniques and what each removed")
    aggregate: dict[str, float | None] = Field(description="validation.json's aggregate (means over seeds)")
    passed: bool = Field(description="validation.json's passed (aggregate quality gates)")
    failures: list[str] = Field(default_factory=list, description="the aggregate gates that failed")


class SweepRecord(_Strict):
    """sweep.json: the points of a sweep over one extract option."""

    type_: Literal["frag.sweep"] = Field(TYPE, alias="_type")
    schema_version: Literal[1] = SCHEMA_VERSION
    frag_version: str = ""
    created: str = Field(description="UTC time, ISO 8601")
    profile: str = Field(description="the profile folder the fragments were extracted from (absolute)")
    model: dict[str, str] = Field(description="the profiled model: name, hash")
    prompt: str
    option: str = Field(description="the swept extract option (underscored), e.g. head_retention")
    options: dict[str, Any] = Field(default_factory=dict, description="the other extract options, fixed")
    seeds: list[int] = Field(description="validation seeds of every point")
    points: list[SweepPoint] = Field(description="in the order of the values asked for")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def extract_options() -> dict[str, Any]:
    """Every registered technique's extract options (underscored name -> default)."""
    from fragcli.techniques import REGISTRY

    out: dict[str, Any] = {}
    for t in REGISTRY:
        out.update(t.options)
    return out


def point_names(option: str, values: Sequence[float]) -> list[str]:
    """Folder names: h90, h70 for fractions of head_retention; else <option>-<value>."""
    from fragcli.paths import safe_name

    if all(0 < v <= 1 for v in values):
        names = [f"{option[0]}{round(v * 100):02d}" for v in values]
        if len(set(names)) == len(names):
            return names
    return [safe_name(f"{option}-{v:g}") for v in values]


def check_sweep(option: str, values: Sequence[float], options: dict[str, Any]) -> None:
    known = extract_options()
    if option not in known:
        raise FragError(f"unknown --option {option.replace('_', '-')!r}",
                        f"sweep one of: {', '.join(k.replace('_', '-') for k in known)}")
    bad = [k for k in options if k not in known]
    if bad:
        raise FragError(f"unknown extract option(s) {', '.join(bad)}", f"use: {', '.join(known)}")
    if option in options:
        raise FragError(f"--set {option} is the swept option", "drop it from --set")
    if not values:
        raise FragError("--values is empty", "pass numbers such as 0.9,0.8,0.7")
    if len(set(values)) != len(values):
        raise FragError(f"--values repeats a value ({', '.join(f'{v:g}' for v in values)})", "pass distinct values")


def _files(paraphrases) -> list[Path]:
    return [Path(paraphrases)] if isinstance(paraphrases, (str, Path)) else []


def run_sweep(profile_dir: Path, values: list[float], *, option: str, options: dict[str, Any], seeds, paraphrases,
              paraphrase_seeds: int, thresholds: Path | None, model: str | None, device: str, dtype: str,
              out: Path | None, overwrite: bool, show_progress: bool) -> tuple[Path, SweepRecord]:
    from fragcli import __version__
    from fragcli.api import _prepare_validation, _seeds, extract
    from fragcli.console import err
    from fragcli.extraction import plan_techniques
    from fragcli.outputs import profile_inputs
    from fragcli.paths import atomic_write_json, check_out_dir, reports_dir, safe_name, staged_dir, timestamp
    from fragcli.profiling.data import ProfileData
    from fragcli.thresholds import load_thresholds

    option = option.replace("-", "_")
    check_sweep(option, values, options)
    seed_list = _seeds(seeds)
    load_thresholds(thresholds)  # a bad thresholds file is refused before anything runs
    profile_dir = Path(profile_dir).resolve()
    profile = ProfileData(profile_dir)
    ctx = profile.context
    for value in values:  # every point's plan is checked before any work starts
        plan_techniques(profile, {**options, option: value})
    target = check_out_dir(Path(out) if out else reports_dir() / safe_name(ctx["model"]["name"]) / timestamp()
                           / "sweep", overwrite, inputs=profile_inputs(profile_dir, ctx, model, thresholds,
                                                                       *_files(paraphrases)))
    names = point_names(option, values)
    points = []
    with staged_dir(target) as tmp:
        for value, name in zip(values, names, strict=True):
            if show_progress:
                err.print(f"[bold]sweep {option}={value:g}[/] ({name}): extract, validate")
            res = extract(profile_dir, {**options, option: value}, out=tmp / name / "fragment", model=model,
                          device=device, dtype=dtype, show_progress=show_progress)
            run = _prepare_validation(res.out, res.manifest, seed_list, paraphrases, paraphrase_seeds, False, None,
                                      None, None, thresholds, profile_dir, model, device, dtype, show_progress)
            v = run(tmp / name / "validate", target / name / "fragment").record
            points.append(SweepPoint(
                name=name, value=value, fragment=f"{name}/fragment", validation=f"{name}/validate/validation.json",
                techniques=[PointTechnique(name=t.name, summary=t.summary) for t in res.manifest.techniques],
                aggregate=v["aggregate"], passed=v["passed"], failures=v["failures"]))
        record = SweepRecord(frag_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             profile=str(profile_dir), model={"name": ctx["model"]["name"], "hash": ctx["model"]["hash"]},
                             prompt=ctx["prompt"], option=option, options=options, seeds=seed_list, points=points)
        atomic_write_json(tmp / "sweep.json", record.dump())
    return target, record
