"""``frag extract`` as a library call: plan every asked-for technique from a profile, check, apply, save.

Plan, then apply: every technique plans from the profile first (and its plan is checked), then the whole stack is
checked on a meta copy of the denoiser, and only then is the real model changed and the folder written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragcli.errors import FragError
from fragcli.manifest import Manifest
from fragcli.techniques.base import Plan


@dataclass
class ExtractResult:
    out: Path
    manifest: Manifest | None  # None for --simulate
    plans: list[Plan]
    simulate: bool = False

    def summary(self) -> dict[str, Any]:
        base = {"out": str(self.out), "simulate": self.simulate,
                "techniques": [{"name": t.name, **t.summary.model_dump(mode="json")}
                               for t in (self.manifest.techniques if self.manifest else [])]}
        if self.manifest is not None:
            m = self.manifest
            base.update(name=m.name, params=m.params, weight_bytes=m.weight_bytes, costs=m.costs.model_dump())
        return base


def load_profiled_model(ctx: dict, model: str | None, device: str, dtype: str):
    """The profile's model (or ``model``), refusing one whose hash differs from the profile's."""
    from fragcli.models import load_model, spec_of

    spec = model or spec_of(ctx["model"])
    loaded = load_model(spec, device, dtype)
    if loaded.hash != ctx["model"]["hash"]:
        raise FragError(f"model {spec} ({loaded.hash[:12]}) is not the profiled model ({ctx['model']['hash'][:12]})",
                        "pass the profiled model with --model, or re-run frag profile")
    return loaded


def plan_techniques(profile, options: dict[str, Any]) -> list[Plan]:
    """Every registered technique's plan for ``profile`` (in registration order); those not asked for return None."""
    from fragcli.techniques import REGISTRY

    plans = [p for t in REGISTRY if (p := t.plan(profile, options)) is not None]
    if not plans:
        raise FragError("no technique was asked for", "pass e.g. --head-retention 0.7")
    return plans


def default_name(ctx: dict, plans: list[Plan]) -> str:
    from fragcli.paths import safe_name

    tags = "-".join(t for p in plans if (t := _tag(p)))
    return safe_name(f"{ctx['model']['name']}-{ctx['prompt'][:40]}" + (f"-{tags}" if tags else ""))


def _tag(plan: Plan) -> str:
    """Short name part from the config's asked-for ratio, e.g. head_retention_ratio 0.7 -> h70."""
    for key, value in plan.config.to_dict().items():
        if key.endswith("_ratio") and isinstance(value, (int, float)):
            return f"{key[0]}{round(value * 100)}"
    return ""


def extract(profile_dir: Path, options: dict[str, Any], *, out: Path | None = None, overwrite: bool = False,
            name: str = "", model: str | None = None, device: str = "auto", dtype: str = "auto",
            simulate: bool = False, show_progress: bool = True) -> ExtractResult:
    """Build a fragment (or, with ``simulate``, the plan and the masked model's images) from a profile."""
    from fragcli.fragment import build_fragment
    from fragcli.models.hashing import sha256_file
    from fragcli.paths import check_out_dir, fragments_dir
    from fragcli.profiling.data import ProfileData

    t0 = time.perf_counter()
    profile = ProfileData(Path(profile_dir))
    ctx = profile.context
    plans = plan_techniques(profile, options)
    frag_name = name or default_name(ctx, plans)
    target = check_out_dir(Path(out) if out else fragments_dir() / frag_name, overwrite, inputs=[profile.folder])
    loaded = load_profiled_model(ctx, model, device, dtype)
    if simulate:
        _simulate(loaded, ctx, plans, target, show_progress)
        return ExtractResult(target, None, plans, simulate=True)
    costs = {"profile_s": float(ctx.get("timings", {}).get("total_s", 0.0)), "extract_s": time.perf_counter() - t0}
    manifest = build_fragment(loaded, ctx, plans, target, frag_name, costs,
                              context_sha256=sha256_file(profile.folder / "context.json"))
    return ExtractResult(target, manifest, plans)


def _simulate(loaded, ctx: dict, plans: list[Plan], target: Path, show_progress: bool) -> None:
    """Apply the plans as reversible masks on the full model and render the profile's seeds."""
    from fragcli.console import progress
    from fragcli.fragment import plan_steps
    from fragcli.generation import generate, resolve_settings
    from fragcli.paths import atomic_write_json, inside, staged_dir
    from fragcli.techniques.stack import mask_stack

    s = resolve_settings(loaded, ctx["prompt"], ctx["steps"], ctx.get("guidance"), ctx.get("width"), ctx.get("height"),
                         ctx.get("negative_prompt", ""))
    mask_stack(loaded.denoiser, plan_steps(plans))
    seeds = ctx["seeds"]
    with progress("simulating (masked)", len(seeds) * s.steps, show_progress) as adv:
        result = generate(loaded.pipe, s, seeds, loaded.device, advance=adv)
    with staged_dir(target) as tmp:
        for plan in plans:
            if plan.record is not None and plan.file:
                atomic_write_json(inside(tmp, plan.file), plan.record)
        (tmp / "images").mkdir()
        for seed, img in result.images.items():
            img.save(tmp / "images" / f"seed-{seed}.png")
