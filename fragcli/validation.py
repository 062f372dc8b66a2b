"""`frag validate`: the fragment against its full model on the same seeds (and on paraphrases), with gates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fragcli.errors import FragError


@dataclass
class ValidateOptions:
    seeds: list[int]
    paraphrases: list[str] | None = None
    paraphrase_seeds: int = 2
    simulate: bool = False
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    clip_model: str | None = None
    clip_weights: Path | None = None
    lpips_weights: Path | None = None
    thresholds: Path | None = None
    profile_dir: Path | None = None
    show_progress: bool = True


def profile_images(profile_dir: Path | None, model_hash: str, s, seeds: list[int]) -> dict[int, Image.Image]:
    """Full-model images the profile already made, where its model and settings match exactly."""
    from fragcli.records import ProfileContext, read_record

    if profile_dir is None or not (Path(profile_dir) / "context.json").is_file():
        return {}
    ctx = read_record(ProfileContext, Path(profile_dir) / "context.json")
    if ctx.model.hash != model_hash or ctx.settings.model_dump() != s.as_dict():
        return {}
    root = Path(profile_dir).resolve()
    out = {}
    for seed in seeds:
        rel = ctx.images.get(str(seed))
        path = Path(profile_dir) / rel if rel else None
        if path and path.is_file() and root in path.resolve().parents:
            out[seed] = Image.open(path).convert("RGB")
    return out


def quality_metrics(loaded, clip_model=None, clip_weights=None, lpips_weights=None):
    """The metrics ``frag validate`` uses for ``loaded``'s images (the model's judge when it ships one)."""
    from fragcli.metrics import load_metrics

    judge = None
    if loaded.defaults.get("judge") and clip_weights is None:
        from fragcli.judge import load_judge

        judge = load_judge(device=loaded.device)
    return load_metrics(clip_model, clip_weights, lpips_weights, judge=judge, device=loaded.device)


def validate_fragment(fragment_dir: Path, o: ValidateOptions) -> dict:
    """Generate full and fragment images on the same seeds, compare, gate.

    Returns ``{"record": the validation.json dict (a ``ValidationRecord`` dump), "full": images, "frag": images}``.
    """
    from fragcli.console import progress
    from fragcli.fragment import apply_fragment, check_fragment, reloader, verify_fragment
    from fragcli.generation import generate, resolve_settings
    from fragcli.memory import param_count, weight_bytes
    from fragcli.metrics import aggregate, compare_images
    from fragcli.models import load_model
    from fragcli.models.hashing import sha256_file
    from fragcli.records import ValidationRecord
    from fragcli.techniques.stack import mask_stack, steps_from_entries
    from fragcli.thresholds import check_image, load_thresholds

    thresholds = load_thresholds(o.thresholds)
    fragment_dir = Path(fragment_dir).resolve()
    manifest = verify_fragment(fragment_dir, None)
    loaded = load_model(o.model or manifest.base_model.spec, o.device, o.dtype)
    if loaded.hash != manifest.base_model.hash:
        raise FragError(f"model {loaded.name} ({loaded.hash[:12]}) is not the fragment's base model "
                        f"({manifest.base_model.hash[:12]})", "pass the fragment's base model with --model")
    g = manifest.profiling
    s = resolve_settings(loaded, g.prompt, g.steps, g.guidance, g.width, g.height, g.negative_prompt)
    # every check before any image is made: a fragment that cannot load fails now, not after the full model ran
    checked = None if o.simulate else check_fragment(loaded, fragment_dir)
    steps = steps_from_entries(manifest.techniques) if o.simulate else None
    para = o.paraphrases or []
    p_seeds = o.seeds[: o.paraphrase_seeds]
    metrics = quality_metrics(loaded, o.clip_model, o.clip_weights, o.lpips_weights)
    before = {"params": param_count(loaded.pipe), "weight_bytes": weight_bytes(loaded.pipe)}

    full = profile_images(o.profile_dir, loaded.hash, s, o.seeds)
    reused = sorted(full)
    todo = [seed for seed in o.seeds if seed not in full]
    total = (len(todo) + 2 * len(para) * len(p_seeds) + len(o.seeds)) * s.steps
    with progress("validating (full, then fragment)", total, o.show_progress) as adv:
        if todo:
            full.update(generate(loaded.pipe, s, todo, loaded.device, advance=adv).images)
        full_para = [generate(loaded.pipe, s, p_seeds, loaded.device, prompt=p, advance=adv).images for p in para]
        if o.simulate:
            mask_stack(loaded.denoiser, steps)
        else:
            apply_fragment(checked, reload=reloader(loaded, loaded.pipe))
        after = {"params": param_count(loaded.pipe), "weight_bytes": weight_bytes(loaded.pipe)}
        frag = generate(loaded.pipe, s, o.seeds, loaded.device, advance=adv).images
        frag_para = [generate(loaded.pipe, s, p_seeds, loaded.device, prompt=p, advance=adv).images for p in para]

    comp = compare_images([full[x] for x in o.seeds], [frag[x] for x in o.seeds], s.prompt, metrics.clip,
                          metrics.lpips, metrics.unavailable)
    per_image = []
    for seed, row in zip(o.seeds, comp.per_image, strict=True):
        check = check_image(row, thresholds)
        per_image.append({"seed": seed, **row, "passed": check.passed, "failures": check.failures})
    agg = aggregate(per_image)

    paraphrases = None
    if para:
        rows = []
        for p, fi, gi in zip(para, full_para, frag_para, strict=True):
            c = compare_images([fi[x] for x in p_seeds], [gi[x] for x in p_seeds], p, metrics.clip, metrics.lpips,
                               metrics.unavailable)
            a = aggregate(c.per_image)
            m = {"clip_delta_rel": a["clip_delta_rel"], "lpips": a["lpips_mean"], "ssim": a["ssim_mean"],
                 "phash_distance": a["phash_mean"]}
            check = check_image(m, thresholds)
            rows.append({"prompt": p, "clip_full": a["clip_full_mean"], "clip_fragment": a["clip_fragment_mean"],
                         **m, "passed": check.passed, "failures": check.failures})
        paraphrases = {"prompts": para, "seeds": p_seeds, "per_prompt": rows,
                       "pass_rate": sum(r["passed"] for r in rows) / len(rows)}
    agg_check = check_image({"clip_delta_rel": agg["clip_delta_rel"], "lpips": agg["lpips_mean"],
                             "ssim": agg["ssim_mean"], "phash_distance": agg["phash_mean"]}, thresholds)
    techniques = [{"name": t.name, "version": t.version, "summary": t.summary} for t in manifest.techniques]
    record = ValidationRecord(
        fragment=str(fragment_dir), fragment_name=manifest.name,
        manifest_sha256=sha256_file(fragment_dir / "manifest.json"),
        model={"name": loaded.name, "hash": loaded.hash}, mode="simulate" if o.simulate else "physical",
        prompt=s.prompt, settings=s.as_dict(), seeds=o.seeds, reused_profile_images=reused, techniques=techniques,
        params={"before": before["params"], "after": after["params"]},
        weight_bytes={"before": before["weight_bytes"], "after": after["weight_bytes"]},
        per_image=per_image, aggregate=agg, unavailable=comp.unavailable, paraphrases=paraphrases,
        thresholds=thresholds.flat(), failures=agg_check.failures, passed=agg_check.passed,
    ).dump()
    return {"record": record, "full": full, "frag": frag}


def write_validation(result: dict, out: Path, fragment_dir: Path, update_manifest_blocks: bool = True) -> None:
    """validation.json + grid.png into ``out`` (atomically), and the quality/reuse blocks into the manifest."""
    from fragcli.manifest import update_manifest
    from fragcli.metrics import side_by_side_grid
    from fragcli.paths import atomic_write_json, staged_dir
    from fragcli.records import ValidationRecord

    rec = ValidationRecord.model_validate(result["record"]).dump()  # callers may have added to it
    seeds = rec["seeds"]
    with staged_dir(out) as tmp:
        atomic_write_json(tmp / "validation.json", rec)
        side_by_side_grid([result["full"][x] for x in seeds], [result["frag"][x] for x in seeds], tmp / "grid.png",
                          labels=[f"seed {x}" for x in seeds])
    if update_manifest_blocks and rec["mode"] == "physical":
        a = rec["aggregate"]
        quality = {"seeds": seeds, "samples": len(seeds), "thresholds_passed": rec["passed"],
                   "failures": rec["failures"], "clip_delta_mean": a["clip_delta_rel"],
                   **{k: a[k] for k in ("clip_full_mean", "clip_fragment_mean", "lpips_mean", "ssim_mean",
                                         "phash_mean", "pass_rate")},
                   "unavailable": rec["unavailable"]}
        p = rec["paraphrases"]
        reuse = {"paraphrases_tested": len(p["prompts"]), "paraphrases_passed": sum(r["passed"] for r in p["per_prompt"]),
                 "paraphrase_pass_rate": p["pass_rate"]} if p else None
        update_manifest(fragment_dir, quality=quality, reuse=reuse)


def fidelity(full: dict, frag: dict, seeds: list[int], prompt: str, metrics, thresholds):
    """``frag``'s images against the full model's on ``seeds``: per-image comparison and gates, then the aggregate
    (an ``Aggregate``) and its gate check, as frag validate gates it."""
    from fragcli.metrics import aggregate, compare_images
    from fragcli.records import Aggregate
    from fragcli.thresholds import check_image

    comp = compare_images([full[x] for x in seeds], [frag[x] for x in seeds], prompt, metrics.clip, metrics.lpips,
                          metrics.unavailable)
    rows = [{**row, "passed": check_image(row, thresholds).passed} for row in comp.per_image]
    agg = aggregate(rows)
    check = check_image({"clip_delta_rel": agg["clip_delta_rel"], "lpips": agg["lpips_mean"],
                         "ssim": agg["ssim_mean"], "phash_distance": agg["phash_mean"]}, thresholds)
    return Aggregate.model_validate(agg), check
