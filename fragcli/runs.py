"""Running a model with or without a fragment, with fallback, and recording run.json (used by generate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fragcli.errors import FragError


def load_with_fragment(spec: str, fragment: str | None, prompt: str, device: str, dtype: str, strict: bool,
                       on_fallback: Callable[[str], None] | None = None):
    """Load ``spec`` and apply ``fragment`` (a folder or 'auto'); returns (loaded, fragment_dir | None, reason | None).

    A refused fragment falls back to a fresh copy of the full model (unless ``strict``: then the FragError propagates).
    """
    from fragcli.fragment import find_fragment, load_fragment
    from fragcli.models import load_model

    loaded = load_model(spec, device, dtype)
    if not fragment:
        return loaded, None, None
    if fragment == "auto":
        found = find_fragment(loaded.hash, prompt)
        if found is None:
            reason = "no fragment under fragments/ matches this model and prompt"
            if strict:
                raise FragError(f"--fragment auto: {reason}", "run frag extract for this prompt, or drop --strict")
            if on_fallback:
                on_fallback(f"{reason}; running the full model")
            return loaded, None, reason
        fragment = str(found)
    try:
        load_fragment(loaded, fragment)
        return loaded, Path(fragment).resolve(), None
    except FragError as exc:
        if strict:
            raise
        reason = exc.one_line()
        if on_fallback:
            on_fallback(f"fragment refused ({reason}); running the full model")
        if getattr(loaded.pipe, "_frag_fragment", None):  # half-applied: start again from the base model
            loaded = load_model(spec, device, dtype)
        return loaded, None, reason


def run_generation(spec: str, prompt: str, fragment: str | None, seeds: list[int], out: Path, *, steps=None,
                   guidance=None, negative_prompt="", width=None, height=None, batch_size=1, device="auto",
                   dtype="auto", strict=False, show_progress=True, on_fallback=None) -> dict:
    """Generate ``seeds`` into ``out`` (PNGs + run.json, atomically); returns the run record (a ``RunRecord`` dump)."""
    from fragcli.console import progress
    from fragcli.generation import generate, resolve_settings
    from fragcli.memory import PeakMemory, param_count, weight_bytes
    from fragcli.paths import atomic_write_json, staged_dir
    from fragcli.profiling.run import versions
    from fragcli.records import RunRecord

    loaded, frag_dir, reason = load_with_fragment(spec, fragment, prompt, device, dtype, strict, on_fallback)
    s = resolve_settings(loaded, prompt, steps, guidance, width, height, negative_prompt)
    with PeakMemory(loaded.device) as peak, progress("generating", len(seeds) * s.steps, show_progress) as adv:
        result = generate(loaded.pipe, s, seeds, loaded.device, batch_size, advance=adv)
    run = RunRecord(
        out=str(out), model=loaded.describe(), fragment=str(frag_dir) if frag_dir else None, fallback_reason=reason,
        settings=s.as_dict(), seeds=seeds, batch_size=batch_size,
        per_image_s={str(k): v for k, v in result.seconds.items()}, total_s=result.total_s,
        images_per_min=result.images_per_min, memory={**peak.as_dict(), "weight_bytes": weight_bytes(loaded.pipe)},
        params=param_count(loaded.pipe), images={str(seed): f"seed-{seed}.png" for seed in seeds}, versions=versions(),
    ).dump()
    with staged_dir(out) as tmp:
        for seed, img in result.images.items():
            img.save(tmp / f"seed-{seed}.png")
        atomic_write_json(tmp / "run.json", run)
    return run
