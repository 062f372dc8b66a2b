"""Model identity: a streaming SHA-256 over weight files, cached by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fragcli.errors import FragError
from fragcli.paths import atomic_write_json, cache_dir

WEIGHT_SUFFIXES = (".safetensors",)
_CHUNK = 8 * 1024 * 1024


def _cache_file() -> Path:
    return cache_dir() / "hash-cache.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def sha256_file(path: Path, cache: dict | None = None) -> str:
    """SHA-256 of one file, reading it in chunks; reuses ``cache`` when size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    if cache is not None:
        hit = cache.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache is not None:
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
    return value


def weight_files(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def hash_model_path(root: Path) -> str:
    """The model hash: SHA-256 over the sorted (relative path, file SHA-256) pairs of its weight files."""
    root = Path(root).resolve()
    cache = _load_cache()
    before = dict(cache)
    digest = hashlib.sha256()
    for f in weight_files(root):
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        digest.update(f"{rel}\0{sha256_file(f, cache)}\n".encode())
    if cache != before:
        try:
            atomic_write_json(_cache_file(), cache)
        except (OSError, FragError):
            pass  # a read-only FRAG_HOME only costs a re-hash next time
    return digest.hexdigest()


def hash_state_dict(state: dict) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (for models that live only in memory)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def short(h: str | None) -> str:
    return (h or "")[:12]

