"""The fragment library's side on disk and in the model (``fragcli.library`` is the index): adopting fragments found
under fragments/, ``verify`` (scan), the prompt embedding from the model's own text encoder, extract's registration
hook, the size cap (``config.yaml``) with LRU eviction, and deletion by frag's output rule (``fragcli.outputs``)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError
from fragcli.library import REPLACED, Entry, drop, entries, get, problem, register


def folder_size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        return -1.0
    n = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / n) if n > 0 and math.isfinite(n) else -1.0


def adopt(model_hash: str | None = None, *, db: Path | None = None, full: bool = False) -> list[str]:
    """Register the finished fragments under fragments/ (for ``model_hash``, or any) that the index does not know
    (their embeddings are computed by the next lookup): every artifact present with its size (``full``: its hash
    too); what was added."""
    from fragcli.fragment import verify_fragment
    from fragcli.manifest import read_manifest
    from fragcli.paths import fragments_dir, inside

    root = fragments_dir()
    if not root.is_dir():
        return []
    known = {e.folder for e in entries(db=db)}
    added = []
    for mf in sorted(root.glob("*/manifest.json")):
        folder = mf.parent.resolve()
        if folder.name.startswith(".") or str(folder) in known:
            continue
        try:
            m = read_manifest(folder)
            if model_hash is not None and m.base_model.hash != model_hash:
                continue
            if full:
                verify_fragment(folder, None)
            elif not all(inside(folder, r).is_file() and inside(folder, r).stat().st_size == a.bytes
                         for r, a in m.artifacts.items()):
                continue
            added.append(register(folder, db=db).name)
        except (FragError, OSError):
            continue  # malformed, or being written or deleted meanwhile
    return added


def prompt_embedding(loaded, prompt: str):
    """The mean over all token positions (padding included: what the denoiser is conditioned on) of the model's own
    text-encoder output for ``prompt`` (float32 numpy vector): the pipeline is run as frag calls it and stopped right
    after ``encode_prompt`` (no denoising step runs). On the shapes model this separated paraphrases from other
    scenes better than a mean over the prompt's own tokens (thresholds.yaml, fragment_min_similarity)."""
    import numpy as np
    import torch

    from fragcli.generation import resolve_settings, run_batch
    from fragcli.techniques.prompt_embeds import _spy_call

    s = resolve_settings(loaded, prompt)
    one = s.__class__(**{**s.as_dict(), "steps": 1})
    with torch.no_grad():
        _args, out = _spy_call(loaded.pipe, lambda: run_batch(loaded.pipe, one, [0], loaded.device, prompt=prompt))
    items = out if isinstance(out, tuple) else (out,)
    first = next((t for t in items if t is not None and t.is_floating_point() and t.dim() >= 2), None)
    if first is None:
        raise FragError("the text encoder returned no embedding tensor", "use --fragment with a folder instead")
    t = first[:1].float()
    vec = t.mean(dim=tuple(range(1, t.dim() - 1))) if t.dim() > 2 else t
    return np.asarray(vec.reshape(-1).cpu().numpy(), dtype="<f4")


def register_extracted(folder: Path, loaded, prompt: str) -> Entry | None:
    """``frag extract``'s hook, once the fragment folder is complete: register it with its prompt's embedding
    (from ``loaded``'s text encoder). The library is a cache: a failure here is a warning, never a failed extract."""
    from fragcli.console import warn

    vec = None
    try:
        vec = prompt_embedding(loaded, prompt)
    except Exception as exc:  # noqa: BLE001 - e.g. a pipeline without encode_prompt: registered without one
        warn(f"fragment library: no prompt embedding for {Path(folder).name} ({str(exc).splitlines()[0][:120]}); "
             "only this exact prompt will find it")
    try:
        return register(folder, vec)
    except FragError as exc:
        warn(f"fragment library: {Path(folder).name} not registered ({exc.one_line()})")
    return None


# ------------------------------------------------------------------------------------ size cap, LRU, deletion

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """``500MiB``, ``2GB``, ``1.5G``, ``1000`` (bytes) -> bytes; a one-line FragError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise FragError(f"size {text!r} is not a size", "write e.g. 500MiB, 2GB or 1000000 (bytes)")
        value, unit = float(m.group(1)), m.group(2).lower()
    if value < 0:
        raise FragError(f"size {text!r} is negative", "write e.g. 500MiB")
    return int(value * _UNITS[unit])


class LibraryConfig(BaseModel):
    """``$FRAG_HOME/config.yaml``: settings of the fragment library (every key optional)."""

    model_config = ConfigDict(extra="forbid")

    max_size: str | int | None = Field(None, description="size cap of the library for frag cache prune "
                                       "(e.g. 500MiB); null: no cap")


def config_path() -> Path:
    from fragcli.paths import frag_home

    return frag_home() / "config.yaml"


def load_config(path: Path | None = None) -> LibraryConfig:
    import yaml
    from pydantic import ValidationError

    path = Path(path) if path else config_path()
    if not path.is_file():
        return LibraryConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        cfg = LibraryConfig.model_validate(data)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FragError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})", f"fix {path}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise FragError(f"{path}: {'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}",
                        "the only key is max_size (e.g. max_size: 500MiB)") from None
    if cfg.max_size is not None:
        parse_size(cfg.max_size)
    return cfg


def delete_fragment(folder: Path) -> None:
    """Delete a fragment folder frag wrote (its marker lists everything in it, unchanged), holding its output lock;
    a one-line FragError, and nothing deleted, otherwise. Renamed aside first, so no reader sees half a folder."""
    from fragcli.outputs import check_replaceable
    from fragcli.paths import acquire_lock, release_lock

    folder = Path(folder)
    acquire_lock(folder, "wait for the command using it to finish, then retry")
    try:
        check_replaceable(folder)
        aside = folder.with_name(f".{folder.name}.rm-{os.getpid()}")
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        release_lock(folder)


def remove(ref: str, *, db: Path | None = None) -> Entry:
    """``frag cache rm``: delete one fragment (if frag wrote it) and its row."""
    e = get(ref, db=db)
    if Path(e.folder).is_dir():
        delete_fragment(Path(e.folder))
    drop(e.folder, db=db)
    return e


def prune(max_bytes: int, *, db: Path | None = None, warn: Callable[[str], None] | None = None,
          dry_run: bool = False) -> dict[str, Any]:
    """Evict least-recently-used fragments (never used: oldest first) until the library fits ``max_bytes``.
    Entries whose folder is gone are dropped first; a folder frag did not write is kept (and said)."""
    kept, removed, refused = [], [], []
    live = []
    for e in entries(db=db):
        if not Path(e.folder).is_dir():
            drop(e.folder, db=db)
            continue
        live.append(e)
    total = sum(e.size_bytes for e in live)
    for e in sorted(live, key=lambda e: (e.last_used or e.created, e.created)):
        if total <= max_bytes:
            kept.append(e.name)
            continue
        try:
            if dry_run:
                from fragcli.outputs import check_replaceable

                check_replaceable(Path(e.folder))  # what the deletion would refuse, said now
            else:
                delete_fragment(Path(e.folder))
                drop(e.folder, db=db)
            removed.append(e.name)
            total -= e.size_bytes
        except FragError as exc:
            refused.append(f"{e.name}: {exc.one_line()}")
            kept.append(e.name)
            if warn:
                warn(f"kept {e.name}: {exc.one_line()}")
    return {"max_bytes": max_bytes, "total_bytes": total, "removed": removed, "kept": kept, "refused": refused,
            "dry_run": dry_run}


def scan(*, db: Path | None = None, full: bool = True,
         warn: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """``frag cache verify``: re-check every entry (hashes with ``full``), drop the bad ones, and register the
    finished fragments under fragments/ the index does not know yet (their embeddings come with the next lookup)."""
    ok, dropped = [], []
    for e in entries(db=db):
        why = problem(e, full=full)
        if why is not None and why.endswith(REPLACED):
            with contextlib.suppress(FragError, OSError):
                e = register(Path(e.folder), db=db)
                why = problem(e, full=full)
        if why is None:
            with contextlib.suppress(FragError, OSError):
                register(Path(e.folder), db=db)  # the quality/performance blocks validate and bench added since
            ok.append(e.name)
            continue
        drop(e.folder, db=db)
        dropped.append(f"{e.name}: {why}")
        if warn:
            warn(f"fragment library: dropped {e.name} ({why})")
    added = adopt(db=db, full=full)
    return {"ok": ok, "dropped": dropped, "added": added}
