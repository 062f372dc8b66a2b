"""Running a model with or without a fragment, with fallback, and recording run.json (used by generate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fragcli.errors import FragError


def _identity(folder: Path):
    """What ``folder`` is right now: its own and its entries' (inode, size, mtime), or None when it cannot be listed.
    A swap (``frag extract --overwrite``), a deletion or an in-place update (a manifest block) changes it."""
    import os

    try:
        st = os.stat(folder)
        items = [("", st.st_dev, st.st_ino)]
        for name in sorted(os.listdir(folder)):
            s = os.stat(folder / name)
            items.append((name, s.st_ino, s.st_size, s.st_mtime_ns))
    except OSError:
        return None
    return tuple(items)


def resolve_auto(spec: str, prompt: str) -> tuple[str, list]:
    """``--fragment auto`` resolved before anything is written: (the fragment folder, or 'auto' when no fragment was
    built for this very prompt, and what it may load, as labelled inputs of the command). 'auto' is decided after
    the model is loaded (``load_with_fragment``: the library's similarity lookup); every fragment it may pick (the
    library's for this model, every folder under fragments/ when the model's hash cannot be known yet) is an input."""
    from fragcli import library
    from fragcli.fragment import find_fragment
    from fragcli.models import peek_hash
    from fragcli.paths import fragments_dir

    model_hash = peek_hash(spec)
    if model_hash is not None:
        match = find_fragment(model_hash, prompt)
        if match is not None:
            return str(match), [("the fragment that --fragment auto resolves to", match)]
        from fragcli.library_disk import adopt

        adopt(model_hash)  # what is under fragments/ and not indexed yet may be chosen too
        found = [Path(e.folder) for e in library.entries(model_hash=model_hash)]
    else:
        root = fragments_dir()
        found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        found += [Path(e.folder) for e in library.entries()]
    return "auto", [("a fragment that --fragment auto may load", p) for p in found]


def _from_library(spec: str, prompt: str, base, min_similarity: float | None, note):
    """The library's decision for ``prompt`` (``fragcli.library.Lookup``); the finished fragments under fragments/
    that the library does not know yet are registered on the way; ``note`` tells of entries dropped (their folder
    moved, deleted or damaged: run.json lists them too)."""
    from fragcli import library
    from fragcli.fragment import find_fragment
    from fragcli.library_disk import prompt_embedding
    from fragcli.models import peek_hash
    from fragcli.thresholds import FRAGMENT_MIN_SIMILARITY, default_thresholds

    model_hash = peek_hash(spec) or base().hash
    find_fragment(model_hash, prompt)  # puts back a fragment hidden by an interrupted swap (the library adopts it)
    threshold = FRAGMENT_MIN_SIMILARITY if min_similarity is None else min_similarity
    return library.lookup(model_hash, prompt, lambda text: prompt_embedding(base(), text), threshold,
                          warn=note, min_reuse=default_thresholds().reuse_pass_rate_min.value)


def _note(message: str) -> None:
    from fragcli.console import err

    err.print(message)


def no_match_hint(prompt: str) -> str:
    return (f'build one: frag profile "{prompt}" && frag extract PROFILE_DIR (or pass --min-similarity lower, '
            "or --fragment FOLDER)")


def load_with_fragment(spec: str, fragment: str | None, prompt: str, device: str, dtype: str, strict: bool,
                       on_fallback: Callable[[str], None] | None = None, evict_text_encoders: bool | None = None,
                       min_similarity: float | None = None, decided: list | None = None):
    """Open ``fragment`` (a folder or 'auto') on ``spec``; returns (loaded, fragment_dir | None, reason | None).

    'auto' asks the fragment library (``fragcli.library.lookup``): a fragment built for this prompt, else the one
    whose prompt embedding is most similar, at ``min_similarity`` or above (default: thresholds.yaml's
    ``fragment_min_similarity``); the decision is appended to ``decided`` (run.json's ``library``) and counted as
    a hit or a miss. A chosen fragment refused as corrupt is dropped from the library.

    The fragment is opened with ``fragcli.loading.open_fragment``, which never loads what the fragment replaces; a
    refused fragment falls back to the full model (unless ``strict``: then the FragError propagates). A fragment
    that another process replaces, deletes or updates while it is being loaded (the folder changed between the
    start and the end of the load) is never used half-and-half: the load is tried once more, then refused.
    """
    from fragcli import library, loading
    from fragcli.models import load_model

    full = []

    def base():
        if not full:
            full.append(load_model(spec, device, dtype))
        return full[0]

    if not fragment:
        return base(), None, None
    reason, changed = None, False
    for _attempt in range(2):
        target = fragment
        if fragment == "auto":
            decision = _from_library(spec, prompt, base, min_similarity, _note if on_fallback else None)
            if decided is not None:
                decided[:] = [decision]
            if decision.chosen is None:
                library.record(None)
                best = max((c.similarity for c in decision.candidates if c.similarity is not None), default=None)
                reason = ("no fragment in the library for this model" if not decision.candidates else
                          f"no library fragment for this model is similar enough (best similarity "
                          f"{'n/a' if best is None else f'{best:.4f}'} < {decision.min_similarity:g})")
                if strict:
                    raise FragError(f"--fragment auto: {reason}", no_match_hint(prompt) + ", or drop --strict")
                if on_fallback:
                    on_fallback(f"{reason}; running the full model; to {no_match_hint(prompt)}")
                return base(), None, reason
            target = decision.chosen
            if full and target:
                full.clear()  # the full model served the embeddings; the fragment loads its own pipeline
        before = _identity(Path(target))
        refusal, loaded = None, None
        try:
            loaded = loading.open_fragment(target, model=spec, device=device, dtype=dtype,
                                           evict_text_encoders=evict_text_encoders)
        except FragError as exc:
            refusal = exc
        except OSError as exc:  # a file vanished between two reads: it changed under us (checked below)
            refusal = FragError(f"fragment {target} could not be read ({exc.strerror}: {exc.filename})",
                                "retry when no other process is writing it")
        changed = _identity(Path(target)) != before
        if refusal is None and not changed:
            if fragment == "auto":
                library.record(target)
            return loaded, Path(target).resolve(), None  # (a folder that cannot be listed cannot load either)
        del loaded
        if fragment == "auto":
            library.record(None)
            if not changed:
                library.drop(target)
                if on_fallback:
                    on_fallback(f"fragment library: dropped {target} ({refusal.one_line()})")
        if not changed:  # an ordinary refusal (stale, corrupt): not worth a second try
            if strict:
                raise refusal
            reason = refusal.one_line()
            break
        reason = FragError(f"fragment {target} was replaced, deleted or updated by another process while it was "
                           "being loaded", "retry when no other process is writing it").one_line()
    if strict and changed:
        raise FragError(reason)
    if on_fallback:
        on_fallback(f"fragment refused ({reason}); running the full model")
    return base(), None, reason


def run_generation(spec: str, prompt: str, fragment: str | None, seeds: list[int], out: Path, *, steps=None,
                   guidance=None, negative_prompt="", width=None, height=None, batch_size=1, device="auto",
                   dtype="auto", strict=False, show_progress=True, on_fallback=None, evict_text_encoders=None,
                   min_similarity=None) -> dict:
    """Generate ``seeds`` into ``out`` (PNGs + run.json, atomically); returns the run record (a ``RunRecord`` dump)."""
    from fragcli.console import progress
    from fragcli.generation import generate, resolve_settings
    from fragcli.memory import PeakMemory, param_count, weight_bytes
    from fragcli.paths import atomic_write_json, staged_dir
    from fragcli.profiling.run import versions
    from fragcli.records import RunRecord

    decided: list = []
    loaded, frag_dir, reason = load_with_fragment(spec, fragment, prompt, device, dtype, strict, on_fallback,
                                                  evict_text_encoders, min_similarity, decided)
    s = resolve_settings(loaded, prompt, steps, guidance, width, height, negative_prompt)
    with PeakMemory(loaded.device) as peak, progress("generating", len(seeds) * s.steps, show_progress) as adv:
        result = generate(loaded.pipe, s, seeds, loaded.device, batch_size, advance=adv)
    run = RunRecord(
        out=str(out), model=loaded.describe(), fragment=str(frag_dir) if frag_dir else None, fallback_reason=reason,
        settings=s.as_dict(), seeds=seeds, batch_size=batch_size,
        per_image_s={str(k): v for k, v in result.seconds.items()}, total_s=result.total_s,
        images_per_min=result.images_per_min, memory={**peak.as_dict(), "weight_bytes": weight_bytes(loaded.pipe)},
        params=param_count(loaded.pipe), images={str(seed): f"seed-{seed}.png" for seed in seeds}, versions=versions(),
        library=decided[0] if decided else None,
    ).dump()
    with staged_dir(out) as tmp:
        for seed, img in result.images.items():
            img.save(tmp / f"seed-{seed}.png")
        atomic_write_json(tmp / "run.json", run)
    return run
