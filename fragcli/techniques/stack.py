"""A fragment's techniques as an ordered stack: plan-then-apply, generic state-dict diffs, meta-device checks.

``apply_stack`` checks the whole stack on a meta-device copy of the denoiser before it touches the real one, so a
refusal anywhere leaves the model untouched. The weight delta is found generically: a snapshot of every state-dict
tensor (storage pointer, version counter, shape, dtype) before, compared with the state after, gives the keys that
were changed, added and removed, whatever the techniques did.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from fragcli.errors import FragError
from fragcli.patches import Patch, remove_patch
from fragcli.techniques import REGISTRY
from fragcli.techniques.base import Applied, Technique, TechniqueConfig, TechniqueSummary


@dataclass
class Step:
    """One technique of a stack, as applied: its config, its summary on the denoiser it was applied to."""

    technique: Technique
    config: TechniqueConfig
    summary: TechniqueSummary | None = None
    applied: Applied | None = None

    def entry(self) -> dict[str, Any]:
        """The manifest's ``techniques[]`` item."""
        return {"name": self.technique.name, "version": self.technique.version, "config": self.config.to_dict(),
                "summary": (self.summary or TechniqueSummary()).model_dump(mode="json")}


def steps_from_entries(entries) -> list[Step]:
    """Manifest entries (objects with name/version/config, or dicts) -> steps; unknown or newer ones refused."""
    out = []
    for e in entries:
        name, version, config = (e["name"], e["version"], e["config"]) if isinstance(e, dict) else \
            (e.name, e.version, e.config)
        technique = REGISTRY.get(name)
        if version > technique.version:
            raise FragError(f"technique {name} version {version} is newer than this frag's ({technique.version})",
                            "upgrade frag")
        try:
            cfg = technique.Config.model_validate(config)
        except Exception as exc:  # pydantic.ValidationError
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
            where = ".".join(str(x) for x in first["loc"]) or "config"
            raise FragError(f"technique {name} config is invalid at {where}: {first['msg']}",
                            "rebuild the fragment with frag extract") from None
        out.append(Step(technique, cfg))
    return out


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers live on the meta device (no weight copied)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    if "_frag_patches" in module.__dict__:
        memo[id(module.__dict__["_frag_patches"])] = {}  # runtime patches are not structure
    return copy.deepcopy(module, memo)


def snapshot(module: torch.nn.Module) -> dict[str, tuple]:
    """Identity of every state-dict tensor: (storage pointer, version counter, shape, dtype)."""
    return {k: (t.data_ptr(), t._version, tuple(t.shape), t.dtype) for k, t in module.state_dict(keep_vars=True).items()}


def state_diff(before: dict[str, tuple], module: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(changed, added, removed) state-dict keys of ``module`` since ``before`` (a ``snapshot``)."""
    after = snapshot(module)
    changed = sorted(k for k in after if k in before and after[k] != before[k])
    added = sorted(k for k in after if k not in before)
    removed = sorted(k for k in before if k not in after)
    return changed, added, removed


def check_stack(denoiser, steps: list[Step]) -> torch.nn.Module:
    """Run every step's ``check`` then ``rebuild`` on a meta copy, in order; returns the rebuilt meta copy."""
    meta = meta_copy(denoiser)
    for step in steps:
        step.technique.check(meta, step.config)
        step.technique.rebuild(meta, step.config)  # patches on the copy go with it
    return meta


def _count(module) -> tuple[int, int]:
    from fragcli.memory import param_count

    params = param_count(module)
    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return params, nbytes


def apply_stack(denoiser, steps: list[Step]) -> list[Step]:
    """Plan, then apply: check the whole stack on a meta copy, then apply each step; summaries are measured."""
    check_stack(denoiser, steps)
    for step in steps:
        summary = step.technique.summary(step.config, denoiser)
        p0, b0 = _count(denoiser)
        step.applied = step.technique.apply(denoiser, step.config)
        if step.applied.config is not None:  # resolved from the weights at apply time (rebuild reads it back)
            step.config = step.applied.config
        p1, b1 = _count(denoiser)
        step.summary = summary.model_copy(update={"params_removed": p0 - p1, "bytes_saved": b0 - b1})
    return steps


def rebuild_stack(denoiser, steps: list[Step]) -> list[Step]:
    """Recreate every step's structure and runtime patch (before loading the fragment's delta)."""
    for step in steps:
        step.applied = step.technique.rebuild(denoiser, step.config)
    return steps


def mask_stack(denoiser, steps: list[Step]) -> list[Patch]:
    """Logical simulation of every step that has one (a refusal removes the masks already installed)."""
    check_stack(denoiser, steps)
    patches: list[Patch] = []
    try:
        for step in steps:
            patch = step.technique.mask(denoiser, step.config)
            if patch is None:
                raise FragError(f"technique {step.technique.name} has no logical simulation",
                                "validate the physical fragment instead (without --simulate)")
            patches.append(patch)
    except BaseException:
        for p in reversed(patches):
            remove_patch(denoiser, p.name)
        raise
    return patches
