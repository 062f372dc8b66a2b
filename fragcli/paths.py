"""Where frag keeps its files (everything under FRAG_HOME) and how it writes them (atomically)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fragcli.errors import FragError


def frag_home() -> Path:
    """The root of all frag state: ``$FRAG_HOME``, default the working directory."""
    return Path(os.environ.get("FRAG_HOME") or os.getcwd()).resolve()


def cache_dir() -> Path:
    """Built-in models and the hash cache live here (``$FRAG_HOME/.frag``)."""
    return frag_home() / ".frag"


def model_cache_dir() -> Path:
    """Where built-in models are generated once (``$FRAG_MODEL_CACHE``, default ``$FRAG_HOME/.frag/models``)."""
    env = os.environ.get("FRAG_MODEL_CACHE")
    return Path(env).resolve() if env else cache_dir() / "models"


def reports_dir() -> Path:
    return frag_home() / "reports"


def fragments_dir() -> Path:
    return frag_home() / "fragments"


def timestamp() -> str:
    """A UTC timestamp that is safe in file names on every OS (no colons)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def safe_name(text: str) -> str:
    """A model id or prompt turned into one path component."""
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.strip())
    out = "-".join(p for p in out.split("-") if p)
    return out[:80] or "model"


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FragError(f"cannot create folder {folder}: {exc.strerror}", "choose a writable --out folder") from None
    if not os.access(folder, os.W_OK):
        raise FragError(f"folder {folder} is not writable", "choose a writable --out folder or fix its permissions")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    _check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or malformed file into a FragError."""
    path = Path(path)
    if not path.is_file():
        raise FragError(f"{what} not found: {path}", "check the path (did the previous stage run?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FragError(f"{what} {path} is malformed ({exc})", "re-run the stage that wrote it") from None


def check_out_dir(out: Path, overwrite: bool) -> Path:
    """Refuse an output folder that exists and is not empty unless ``overwrite``; check it is writable."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FragError(f"--out {out} is a file, not a folder", "choose another --out path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FragError(f"output folder {out} exists and is not empty", "pass --overwrite or choose another --out")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FragError(f"cannot create {out}: {probe} is a file", "choose another --out path")
    if not os.access(probe, os.W_OK):
        raise FragError(f"cannot write to {probe}", "choose a writable --out folder")
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Build a folder's contents in a temp folder beside it, then swap it in only on success.

    On any error (or Ctrl-C) the temp folder is removed and ``out`` is left exactly as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def inside(base: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``base`` and refuse any path that escapes it (``..``, absolute, symlinks)."""
    base = Path(base).resolve()
    if not rel or os.path.isabs(rel) or "\\" in rel:
        raise FragError(f"path {rel!r} is not a relative path inside {base}", "rebuild the fragment with frag extract")
    target = (base / rel).resolve()
    if base != target and base not in target.parents:
        raise FragError(f"path {rel!r} escapes the folder {base}", "refusing it; rebuild the fragment with frag extract")
    return target
