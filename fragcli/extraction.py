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
    recipe: Any = None  # fragcli.recipe.RecipeResult with --objective

    def summary(self) -> dict[str, Any]:
        base = {"out": str(self.out), "simulate": self.simulate,
                "techniques": [{"name": t.name, **t.summary.model_dump(mode="json")}
                               for t in (self.manifest.techniques if self.manifest else [])]}
        if self.manifest is not None:
            m = self.manifest
            base.update(name=m.name, params=m.params, weight_bytes=m.weight_bytes, costs=m.costs.model_dump())
        if self.recipe is not None:
            r = self.recipe.record
            base["recipe"] = {"objective": r.objective, "chosen": r.chosen, "search_s": r.search_s,
                              "candidates": len(r.candidates)}
        return base


LEVERS = ("head_retention", "ffn_retention", "low_rank_energy", "quantize", "cache_prompt", "evict_text_encoders",
          "step_cache", "guidance_cut", "cross_attn_gate", "block_cache")
OBJECTIVES = ("memory", "speed", "balanced")
DEFAULT_HEAD_RETENTION = 0.7


def lever_options(*, head_retention=None, ffn_retention=None, low_rank_energy=None, quantize=None,
                  cache_prompt=False, evict_text_encoders=False, step_cache=None, guidance_cut=None, cross_attn_gate=None,
                  block_cache=None, default_heads=True) -> dict[str, Any]:
    """The lever part of an extract options dict; with no lever at all (and ``default_heads``), head pruning at
    0.7, as frag extract always did."""
    q = None if quantize in (None, "", "none") else quantize
    options = {"head_retention": head_retention, "ffn_retention": ffn_retention, "low_rank_energy": low_rank_energy,
               "quantize": q, "cache_prompt": bool(cache_prompt or evict_text_encoders),
               "evict_text_encoders": bool(evict_text_encoders), "step_cache": step_cache,
               "guidance_cut": guidance_cut, "cross_attn_gate": cross_attn_gate, "block_cache": block_cache}
    if default_heads and all(options[k] is None or options[k] is False for k in LEVERS):
        options["head_retention"] = DEFAULT_HEAD_RETENTION
    return options


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
            simulate: bool = False, show_progress: bool = True, objective: str | None = None,
            search_seeds: int = 8, thresholds: Path | None = None) -> ExtractResult:
    """Build a fragment (or, with ``simulate``, the plan and the masked model's images) from a profile.

    With ``objective`` ("memory") the levers are chosen by a recipe search (``fragcli.recipe``): candidates are
    tried on ``search_seeds`` of the profile's seeds against its full-model images, and the best one that passes the
    quality gates of ``thresholds`` is built; levers given in ``options`` are kept fixed in every candidate."""
    from fragcli.fragment import build_fragment
    from fragcli.models.hashing import sha256_file
    from fragcli.outputs import profile_inputs
    from fragcli.paths import check_out_dir, fragments_dir
    from fragcli.profiling.data import ProfileData

    t0 = time.perf_counter()
    profile = ProfileData(Path(profile_dir))
    ctx = profile.context
    recipe = loaded = None
    if objective is not None:
        if objective not in OBJECTIVES:
            raise FragError(f"unknown --objective {objective!r}", f"use one of: {', '.join(OBJECTIVES)}")
        if simulate:
            raise FragError("--simulate and --objective do not go together",
                            "run --objective, then validate the fragment it writes")
        if search_seeds < 1:
            raise FragError(f"--search-seeds must be at least 1 (got {search_seeds})", "pass e.g. --search-seeds 4")
        from fragcli.paths import safe_name

        frag_name = name or safe_name(f"{ctx['model']['name']}-{ctx['prompt'][:40]}-{objective}")
        target = check_out_dir(Path(out) if out else fragments_dir() / frag_name, overwrite,
                               inputs=profile_inputs(profile.folder, ctx, model, thresholds))
        recipe, loaded = _search(profile, options, objective, search_seeds, thresholds, model, device, dtype,
                                 show_progress)
        options = {**options, **recipe.chosen_options}
    plans = plan_techniques(profile, options)
    if recipe is None:
        frag_name = name or default_name(ctx, plans)
        target = check_out_dir(Path(out) if out else fragments_dir() / frag_name, overwrite,
                               inputs=profile_inputs(profile.folder, ctx, model, thresholds))
        loaded = load_profiled_model(ctx, model, device, dtype)
    if simulate:
        _simulate(loaded, ctx, plans, target, show_progress)
        return ExtractResult(target, None, plans, simulate=True)
    costs = {"profile_s": float(ctx.get("timings", {}).get("total_s", 0.0)), "extract_s": time.perf_counter() - t0,
             "search_s": recipe.record.search_s if recipe is not None else 0.0}
    extra = None
    if recipe is not None:
        from fragcli.recipe import write_recipe

        extra = lambda tmp: write_recipe(recipe, tmp)  # noqa: E731
    manifest = build_fragment(loaded, ctx, plans, target, frag_name, costs,
                              context_sha256=sha256_file(profile.folder / "context.json"), extra=extra)
    from fragcli.library_disk import register_extracted

    register_extracted(target, loaded, ctx["prompt"])  # the fragment library (issue 14): found by --fragment auto
    return ExtractResult(target, manifest, plans, recipe=recipe)


def _search(profile, options: dict, objective: str, search_seeds: int, thresholds, model, device, dtype,
            show_progress: bool):
    """The recipe search: the best candidate that passes the quality gates, or a one-line refusal."""
    from fragcli.recipe import default_candidates, search_recipe, unusable_levers

    ctx = profile.context
    loaded = load_profiled_model(ctx, model, device, dtype)
    left_out = unusable_levers(profile, objective, options)  # what this model cannot use: said, then left out
    result = search_recipe(profile, loaded, objective, seeds=ctx["seeds"][:search_seeds],
                           candidates=default_candidates(objective, fixed=options, left_out=left_out),
                           thresholds=thresholds, show_progress=show_progress, left_out=left_out)
    if result.chosen is None:
        raise result.refusal()
    return result, loaded


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
