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


MARKER = ".frag-output.json"  # written into every folder frag builds: what it wrote, so --overwrite can tell
PROTECT_HINT = "choose a new --out folder (e.g. a sub-folder)"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _sibling_pid(path: Path, prefix: str) -> int | None:
    """``.out.old-1234`` / ``.out.1234.abc.tmp`` / ``.out.lock`` content -> 1234."""
    rest = path.name[len(prefix):]
    digits = rest.split(".")[0].split("-")[-1]
    return int(digits) if digits.isdigit() else None


def recover_swap(out: Path) -> str | None:
    """Finish or undo a folder swap that a crash interrupted; returns what was done, for the user, or None.

    A swap renames ``out`` to ``.out.old-PID``, the staged folder to ``out``, then deletes the old copy. A crash
    between the renames leaves ``out`` absent: the old copy is put back. After the second rename only the
    clean-up is left: the old copy is deleted. Staging folders of dead processes are deleted.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return None
    note = None
    olds = sorted((p for p in parent.glob(f".{out.name}.old-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if not _pid_alive(_sibling_pid(p, f".{out.name}.old-") or -1)]
    if olds and not out.exists():
        os.replace(olds.pop(), out)
        note = f"restored {out} from a swap that was interrupted (a crash or kill during an earlier write)"
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{out.name}.*.tmp"):
        pid = _sibling_pid(p, f".{out.name}.")
        if p.is_dir() and pid is not None and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    return note


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


_HELD: set[Path] = set()
_CHECKED: dict[Path, bool] = {}  # out -> whether --overwrite was given when check_out_dir passed it


def release_held_locks() -> None:
    """Release every output lock this process still holds (the CLI calls it when a command ends, however)."""
    for out in list(_HELD):
        release_lock(out)


def acquire_lock(out: Path) -> None:
    """Hold ``out`` for this process (``.out.lock`` with our pid); a live holder is refused, a dead one replaced."""
    lock = _lock_path(out)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return  # ours already (an earlier call in this process)
            if pid and _pid_alive(pid):
                raise FragError(f"{out} is being written by another frag process (pid {pid})",
                                "wait for it to finish, or choose another --out") from None
            with contextlib.suppress(OSError):
                lock.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        _HELD.add(Path(out))
        return
    raise FragError(f"cannot lock {out}", "retry, or choose another --out")


def release_lock(out: Path) -> None:
    _HELD.discard(Path(out))
    lock = _lock_path(Path(out))
    try:
        if int(lock.read_text().strip() or "0") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def frag_wrote(folder: Path) -> tuple[bool, list[str]]:
    """Whether frag wrote ``folder`` (its marker, or for older outputs a frag record file), and the entries in it
    that frag did not write (empty when it cannot tell)."""
    marker = folder / MARKER
    entries = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    if marker.is_file():
        try:
            wrote = set(json.loads(marker.read_text(encoding="utf-8")).get("files", []))
        except (OSError, ValueError, AttributeError, UnicodeDecodeError):
            wrote = set()
        return True, [e for e in entries if e not in wrote]
    for p in folder.glob("*.json"):
        try:
            if p.stat().st_size < 50_000_000 and str(json.loads(p.read_text(encoding="utf-8")).get("_type", "")
                                                     ).startswith("frag."):
                return True, []
        except (OSError, ValueError, AttributeError, UnicodeDecodeError):
            continue
    return False, entries


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be replaced: FRAG_HOME, the working directory, the home folder, or a parent of one."""
    for label, p in (("FRAG_HOME", frag_home()), ("the working directory", Path.cwd().resolve()),
                     ("your home folder", Path.home().resolve())):
        if out == p:
            return f"it is {label}"
        if out in p.parents:
            return f"it contains {label} ({p})"
    return None


def check_out_dir(out: Path, overwrite: bool, inputs: tuple | list = ()) -> Path:
    """Check ``--out`` before any work: refuse a file, a folder that is not empty (unless ``overwrite`` and frag
    wrote it), an input of this command or a folder holding one, FRAG_HOME, the working directory and their
    parents; recover an interrupted swap; lock the folder for this process; check it is writable."""
    out = Path(out).expanduser().resolve()
    note = recover_swap(out)
    if note:
        from fragcli.console import warn

        warn(note)
    if out.exists() and not out.is_dir():
        raise FragError(f"--out {out} is a file, not a folder", "choose another --out path")
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or out in src.parents:
            raise FragError(f"--out {out} {'is' if out == src else 'contains'} an input of this command ({src})",
                            PROTECT_HINT)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FragError(f"output folder {out} exists and is not empty", "pass --overwrite or choose another --out")
        why = _protected(out)
        if why:
            raise FragError(f"refusing to overwrite {out}: {why}", PROTECT_HINT)
        ours, foreign = frag_wrote(out)
        if not ours:
            raise FragError(f"refusing to overwrite {out}: frag did not write it", PROTECT_HINT)
        if foreign:
            raise FragError(f"refusing to overwrite {out}: it holds files frag did not write ({', '.join(foreign[:3])})",
                            "move them away, or " + PROTECT_HINT)
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FragError(f"cannot create {out}: {probe} is a file", "choose another --out path")
    if not os.access(probe, os.W_OK):
        raise FragError(f"cannot write to {probe}", "choose a writable --out folder")
    if out.parent.is_dir():
        acquire_lock(out)  # else staged_dir takes it once the parent exists (nothing is created before the work)
    _CHECKED[out] = overwrite
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Build a folder's contents in a temp folder beside it, then swap it in only on success.

    On any error (or Ctrl-C) the temp folder is removed and ``out`` is left exactly as it was. A crash during the
    swap is repaired by the next ``check_out_dir``/``staged_dir`` on the same folder (``recover_swap``). The folder
    gets frag's marker (``.frag-output.json``, the entries frag wrote) and the folder's lock is released.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(out)
    resolved = out.resolve()
    if resolved in _CHECKED:
        acquire_lock(resolved)
        if not _CHECKED[resolved] and out.is_dir() and any(out.iterdir()):
            release_lock(resolved)
            raise FragError(f"output folder {out} was written by another process meanwhile",
                            "pass --overwrite or choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        atomic_write_json(tmp / MARKER, {"_type": "frag.output", "files": files, "pid": os.getpid(),
                                         "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _CHECKED.pop(resolved, None)
        release_lock(resolved)


def inside(base: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``base`` and refuse any path that escapes it (``..``, absolute, symlinks)."""
    base = Path(base).resolve()
    if not rel or os.path.isabs(rel) or "\\" in rel:
        raise FragError(f"path {rel!r} is not a relative path inside {base}", "rebuild the fragment with frag extract")
    target = (base / rel).resolve()
    if base != target and base not in target.parents:
        raise FragError(f"path {rel!r} escapes the folder {base}", "refusing it; rebuild the fragment with frag extract")
    return target
