"""Where frag keeps its files (everything under FRAG_HOME) and how it writes them (atomically)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fragcli.errors import FragError

try:
    import fcntl  # POSIX: output locks are flock()s, which the kernel drops when their process dies (even kill -9)
except ImportError:  # pragma: no cover - Windows
    fcntl = None


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


def crash_point(point: str, path: Path) -> None:
    """Test hook (tests/test_crash.py), inert unless ``FRAG_TEST_CRASH_AT`` is set: ``FRAG_TEST_CRASH_AT=<point>``
    or ``<point>:<name>`` makes this process die here at once, as ``kill -9`` would (``os._exit(137)``: no clean-up,
    no ``finally``), when ``point`` matches and, if given, ``path``'s name is ``name``. The points: ``write`` (an
    atomic write's temp file is written, not yet renamed), ``staged`` (a staged folder is complete, the swap not
    begun), ``swap-moved-old`` (the previous folder is moved aside, the new one not yet in), ``swap-moved-new`` (the
    new folder is in; the old copy and the lock are not yet removed)."""
    want = os.environ.get("FRAG_TEST_CRASH_AT")
    if want:
        name, _, target = want.partition(":")
        if name == point and target in ("", Path(path).name):
            os._exit(137)


# Temp names carry the writer's pid (``.<name>.<pid>.<random>.tmp``), so that those of dead processes can be removed.
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it. When ``path`` is a file of a
    finished frag output, unchanged since frag wrote it (an in-place update), its markers record the new bytes."""
    path = Path(path)
    _check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        crash_point("write", path)
        from fragcli.outputs import owners, rewritten

        found = owners(path)  # finished frag outputs listing this file as frag wrote it (an in-place update)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if found:
        with contextlib.suppress(OSError, FragError):  # a marker left stale only makes a later overwrite refuse
            rewritten(found, data)


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
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, huge integers
        raise FragError(f"{what} {path} is malformed ({str(exc)[:120]})", "re-run the stage that wrote it") from None
    except RecursionError:
        raise FragError(f"{what} {path} is nested too deeply to be a frag file", "re-run the stage that wrote it") from None


MARKER = ".frag-output.json"  # written into every folder frag builds: what it wrote, so --overwrite can tell
PROTECT_HINT = "choose a new --out folder (e.g. a sub-folder)"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _dead(pid: str | int | None) -> bool:
    """A pid (as text from a file name, or a number) whose process is gone."""
    if isinstance(pid, str):
        pid = int(pid) if pid.isdigit() else None
    return pid is not None and not _pid_alive(pid)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def recover_swap(out: Path) -> str | None:
    """Finish or undo a folder swap that a crash interrupted; returns what was done, for the user, or None.

    A swap renames ``out`` to ``.out.old-PID``, the staged folder to ``out``, then deletes the old copy. A crash
    between the renames leaves ``out`` absent: the old copy is put back. After the second rename only the
    clean-up is left: the old copy is deleted. Staging folders and temp files of dead processes are deleted, beside
    ``out`` and inside it when frag wrote it (an in-place update such as a manifest's). Only what belongs to dead processes is
    touched, and a concurrent recovery by another process is harmless (whoever renames first wins).
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return None
    note = None
    old_prefix = f".{out.name}.old-"
    olds, stale = [], []
    for name in _entries(parent):
        path = parent / name
        if name.startswith(old_prefix):
            if _dead(name[len(old_prefix):]) and path.is_dir():
                olds.append(path)
        else:
            m = _TMP_NAME.match(name)
            if m and m["target"] == out.name and _dead(m["pid"]):
                stale.append(path)
    olds.sort(key=_mtime)
    if olds and not os.path.lexists(out):
        newest = olds.pop()
        try:
            os.replace(newest, out)
            note = f"restored {out} from a swap that was interrupted (a crash or kill during an earlier write)"
        except OSError:
            pass  # another process restored it first
    for path in olds + stale:
        _remove(path)
    if out.is_dir() and not out.is_symlink() and (out / MARKER).is_file():  # only in a folder frag wrote
        for name in _entries(out):
            m = _TMP_NAME.match(name)
            if m and _dead(m["pid"]) and (out / name).is_file():
                _remove(out / name)
    return note


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _key(out: Path) -> Path:
    return Path(out).expanduser().resolve()


_HELD: dict[Path, int | None] = {}  # out -> the open, flock()ed lock file (None: a pid-file lock, no flock)
_CHECKED: dict[Path, bool] = {}  # out -> whether --overwrite was given when check_out_dir passed it


def release_held_locks() -> None:
    """Release every output lock this process still holds (the CLI calls it when a command ends, however)."""
    for out in list(_HELD):
        release_lock(out)


def _holder(lock: Path) -> int:
    """The pid in a lock held by another process (it writes its pid just after taking it: wait a moment for it)."""
    pid = 0
    for _ in range(50):
        try:
            pid = int(lock.read_text().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _pid_alive(pid):
            break
        time.sleep(0.01)
    return pid


class OutputLocked(FragError):
    """Another live frag process holds this folder's lock."""


def _refuse(out: Path, pid: int, fix: str) -> FragError:
    return OutputLocked(f"{out} is being written by another frag process (pid {pid or 'unknown'})", fix)


LOCKED_HINT = "wait for it to finish, or choose another --out"


def acquire_lock(out: Path, fix: str = LOCKED_HINT) -> None:
    """Hold ``out`` for this process (``.out.lock`` holding our pid); a live holder is refused, a dead one replaced.

    On POSIX the lock is an ``flock`` on that file, which the kernel releases when its process dies, so a lock left
    by a crash or ``kill -9`` is taken over with no guessing; elsewhere the pid in the file decides.
    """
    out = _key(out)
    if out in _HELD:
        return  # ours already (an earlier call in this process)
    lock = _lock_path(out)
    if fcntl is not None:
        for _ in range(5):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise FragError(f"cannot lock {out}: {exc.strerror}", "choose a writable --out folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _refuse(out, _holder(lock), fix) from None
            except OSError:  # this file system has no flock: fall back to the pid in the file
                os.close(fd)
                break
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except OSError:
                same = False
            if not same:  # its holder released (and removed) it between our open and our flock: again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            _HELD[out] = fd
            return
        else:
            raise FragError(f"cannot lock {out}", "retry, or choose another --out")
    _acquire_pid_file(out, lock, fix)


def _acquire_pid_file(out: Path, lock: Path, fix: str) -> None:
    for _ in range(3):
        tmp = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(str(os.getpid()))
            os.link(tmp, lock)  # atomic, and the lock is never seen empty
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                raise _refuse(out, pid, fix) from None
            with contextlib.suppress(OSError):
                lock.unlink()  # stale: its process is gone
            continue
        except OSError as exc:
            raise FragError(f"cannot lock {out}: {exc.strerror}", "choose a writable --out folder") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _HELD[out] = None
        return
    raise FragError(f"cannot lock {out}", "retry, or choose another --out")


def release_lock(out: Path) -> None:
    out = _key(out)
    lock = _lock_path(out)
    if out not in _HELD:
        return
    fd = _HELD.pop(out)
    if fd is not None:
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                lock.unlink()  # while we still hold it; a process that opened it meanwhile sees it gone and retries
        except OSError:
            pass
        finally:
            os.close(fd)
        return
    try:
        if int(lock.read_text().strip() or "0") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def check_out_dir(out: Path, overwrite: bool, inputs: tuple | list = (), searched: tuple | list = ()) -> Path:
    """Check ``--out`` before any work (``fragcli.outputs``: the one rule): refuse the filesystem root, a file, a
    symbolic link, an unwritable place, an input of this command (``inputs``: the output may not be, contain or sit
    inside one; ``searched``: not be or contain one; frag's caches always), FRAG_HOME, the working directory and
    their parents, and a folder that is not empty unless ``overwrite`` and everything in it is what frag recorded
    writing; lock the folder for this process (a second writer is refused before it touches anything); recover an
    interrupted swap."""
    from fragcli.outputs import check_replaceable, check_target

    out = check_target(out, inputs, searched)
    if out.parent.is_dir():
        acquire_lock(out)  # else staged_dir takes it once the parent exists (nothing is created before the work)
    try:
        note = recover_swap(out)
        if note:
            from fragcli.console import warn

            warn(note)
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise FragError(f"output folder {out} exists and is not empty",
                                "pass --overwrite or choose another --out")
            check_replaceable(out)
    except BaseException:
        release_lock(out)
        raise
    _CHECKED[out] = overwrite
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Build a folder's contents in a temp folder beside it, then swap it in only on success.

    On any error (or Ctrl-C) the temp folder is removed and ``out`` is left exactly as it was. A crash during the
    swap is repaired by the next ``check_out_dir``/``staged_dir`` on the same folder (``recover_swap``). The folder
    is locked while it is built (a second writer is refused), gets frag's marker (``.frag-output.json``, the entries
    frag wrote), and its lock is released at the end.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    resolved = _key(out)
    try:  # (the lock is held already when check_out_dir passed this folder)
        acquire_lock(resolved, LOCKED_HINT if resolved in _CHECKED else "wait for it to finish, then retry")
        recover_swap(out)
        if resolved in _CHECKED and not _CHECKED[resolved] and out.is_dir() and any(out.iterdir()):
            raise FragError(f"output folder {out} was written by another process meanwhile",
                            "pass --overwrite or choose another --out")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any other folder
        try:
            yield tmp
            from fragcli.outputs import check_replaceable, mark

            mark(tmp)
            crash_point("staged", out)
            if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
                check_replaceable(out)  # again, just before it goes: nothing the user added meanwhile is lost
            old = None
            try:
                if os.path.lexists(out):
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    if os.path.lexists(old):
                        _remove(old)
                    os.replace(out, old)
                    crash_point("swap-moved-old", out)
                os.replace(tmp, out)
            except BaseException:
                if old is not None and not os.path.lexists(out):
                    with contextlib.suppress(OSError):
                        os.replace(old, out)  # interrupted between the renames: put the previous one back
                raise
            crash_point("swap-moved-new", out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
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
