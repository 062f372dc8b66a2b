"""The one rule for output folders (issue 34): ``--overwrite`` removes only what frag recorded writing.

Every folder frag builds (``paths.staged_dir``) gets a marker, ``.frag-output.json`` (``OutputMarker``): every
file it wrote, at any depth, with its SHA-256 and size, and every folder it created. ``--overwrite`` replaces an
output only when everything in it is on that list, unchanged: a file or folder it does not list, a symbolic link,
or a listed file whose bytes changed (the user edited it: it is theirs now) makes frag refuse with one line naming
it. A folder without a valid marker is never frag's, whatever it holds; an output of an older frag, whose marker
lists no hashes, is refused with a fix (delete it yourself, or choose a new --out) rather than guessed at.

When frag itself rewrites a file of a finished output in place (``frag validate``/``frag bench`` updating a
fragment's manifest), the markers listing it are updated, but only where the file was still as frag wrote it.

``check_target`` is the check of a typed ``--out`` path that runs before anything is loaded or written: not the
filesystem root, a file, a path below a file, a symbolic link, an unwritable place, nor an input of the command
(explicit paths, the fragment ``--fragment auto`` resolves to, the model's folder, frag's caches): an output may
not be, contain, or sit inside an input (symlinks resolved). ``command_inputs`` lists those inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragcli.errors import FragError
from fragcli.paths import MARKER, PROTECT_HINT, atomic_write_json, cache_dir, frag_home, model_cache_dir

OLD_HINT = ("delete it yourself if nothing in it is yours, or choose a new --out (frag now records every file it "
            "writes, with its hash)")
_CHUNK = 4 * 1024 * 1024


class MarkedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(description="SHA-256 of the file's bytes as frag wrote them")
    bytes: int = Field(description="its size")


class OutputMarker(BaseModel):
    """``.frag-output.json``, in every folder frag builds: what frag wrote there, so that ``--overwrite`` removes
    exactly that (``fragcli.outputs``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type_: Literal["frag.output"] = Field("frag.output", alias="_type")
    schema_version: Literal[2] = 2
    files: dict[str, MarkedFile] = Field(description="every file frag wrote, at any depth (relative POSIX path; "
                                         "the marker itself excluded)")
    dirs: list[str] = Field(description="every folder frag created inside (relative POSIX path)")
    pid: int = Field(description="the process that wrote the folder")
    written: str = Field(description="when (UTC, ISO 8601)")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


def hash_file(path: Path) -> MarkedFile:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return MarkedFile(sha256=digest.hexdigest(), bytes=size)


def _walk(folder: Path):
    """(relative POSIX path, path, lstat) of every entry under ``folder``, symlinks not followed; the top-level
    marker skipped. An unreadable folder is a FragError."""
    def fail(exc: OSError):
        raise FragError(f"cannot read {exc.filename}: {exc.strerror}", "fix its permissions, or choose another --out")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail):
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if rel == MARKER:
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue  # vanished meanwhile
            yield rel, path, st


def mark(folder: Path) -> OutputMarker:
    """Write ``folder``'s marker listing what is in it now (``staged_dir`` calls it on its staging folder)."""
    files, dirs = {}, []
    for rel, path, st in _walk(Path(folder)):
        if stat.S_ISDIR(st.st_mode):
            dirs.append(rel)
        elif stat.S_ISREG(st.st_mode):
            files[rel] = hash_file(path)
        # anything else (a symlink) is not recorded: frag never writes one, so it can never be taken for frag's
    marker = OutputMarker(files=files, dirs=dirs, pid=os.getpid(),
                          written=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(Path(folder) / MARKER, marker.dump())
    return marker


class OldOutput(FragError):
    """An output of a frag before issue 34: its marker lists no hashes."""


def read_marker(folder: Path) -> OutputMarker:
    """``folder``'s marker, or a FragError saying why frag cannot call the folder its own."""
    folder = Path(folder)
    path = folder / MARKER
    where = f"refusing to overwrite {folder}"
    if path.is_symlink() or not path.is_file():
        raise FragError(f"{where}: frag did not write it (it has no valid {MARKER})", PROTECT_HINT)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise FragError(f"{where}: its {MARKER} is not frag's (unreadable or malformed)", PROTECT_HINT) from None
    if not isinstance(data, dict) or data.get("_type") != "frag.output":
        raise FragError(f"{where}: its {MARKER} is not frag's", PROTECT_HINT)
    version = data.get("schema_version")
    if version is None or version == 1:
        raise OldOutput(f"{where}: it was written by an older frag, whose marker does not list its files' hashes",
                        OLD_HINT)
    if isinstance(version, int) and not isinstance(version, bool) and version > 2:
        raise FragError(f"{where}: it was written by a newer frag (marker schema_version {version})", "upgrade frag")
    try:
        return OutputMarker.model_validate(data)
    except ValidationError:
        raise FragError(f"{where}: its {MARKER} is not a valid frag marker", PROTECT_HINT) from None


def _load(folder: Path) -> OutputMarker | None:
    try:
        return read_marker(folder)
    except FragError:
        return None


def foreign(folder: Path, marker: OutputMarker) -> str | None:
    """The first thing in ``folder`` that frag did not write as it is now, described, or None."""
    dirs = set(marker.dirs)
    for rel, path, st in _walk(Path(folder)):
        if stat.S_ISLNK(st.st_mode):
            return f"a symbolic link frag did not write ({rel})"
        if stat.S_ISDIR(st.st_mode):
            if rel not in dirs:
                return f"a folder frag did not create ({rel}/)"
            continue
        entry = marker.files.get(rel)
        if entry is None or not stat.S_ISREG(st.st_mode):
            return f"a file frag did not write ({rel})"
        if st.st_size != entry.bytes or _verified_hash(path, st) != entry.sha256:
            return f"{rel}, changed since frag wrote it (so it is yours now)"
    return None


_VERIFIED: dict[tuple, str] = {}  # (path, inode, size, mtime) -> SHA-256, this process's earlier checks


def _verified_hash(path: Path, st: os.stat_result) -> str:
    """A file's SHA-256; hashed once per process while unchanged (check_out_dir, then again just before the swap:
    a multi-GB fragment is not hashed twice)."""
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        if len(_VERIFIED) > 100_000:
            _VERIFIED.clear()
        _VERIFIED[key] = hash_file(path).sha256
    return _VERIFIED[key]


def check_replaceable(out: Path) -> None:
    """Refuse (one line naming the file) unless everything in ``out`` is what frag recorded writing there."""
    marker = read_marker(out)
    what = foreign(out, marker)
    if what:
        raise FragError(f"refusing to overwrite {out}: it holds {what}", "move it away, or " + PROTECT_HINT)


# ------------------------------------------------------------------------------ frag rewriting its own files


def owners(path: Path) -> list[tuple[Path, str]]:
    """The frag outputs above ``path`` whose marker lists it, unchanged since frag wrote it: (folder, relative
    path). Called before an atomic write replaces ``path``."""
    path = Path(path).absolute()
    if not path.is_file():
        return []
    found, digest = [], None
    for folder in path.parents:
        rel = path.relative_to(folder).as_posix()
        if rel == MARKER or not (folder / MARKER).is_file():
            continue
        marker = _load(folder)
        entry = marker.files.get(rel) if marker else None
        if entry is None:
            continue
        digest = digest or hash_file(path)
        if digest == entry:
            found.append((folder, rel))
    return found


def rewritten(found: list[tuple[Path, str]], data: bytes) -> None:
    """Record in the markers of ``found`` (from ``owners``) that frag replaced the file with ``data``."""
    entry = MarkedFile(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    for folder, rel in found:
        marker = _load(folder)
        if marker is None or rel not in marker.files:
            continue
        marker.files[rel] = entry
        atomic_write_json(folder / MARKER, marker.dump())  # (which updates the markers above that list this one)


# ------------------------------------------------------------------------------ the typed --out path and inputs


Input = Path | str | tuple[str, Path | str]


def model_input(spec: str | None) -> tuple[str, Path] | None:
    """The model's files on disk, as an input ('the model folder'); built-ins live in frag's model cache (always an
    input) and are not built here. None when it cannot be told without loading (refused later, with the reason)."""
    from fragcli.models import BUILTINS, default_model, resolve_spec

    spec = (spec or default_model()).strip()
    if spec in BUILTINS:
        return None
    try:
        folder, _name, _source = resolve_spec(spec)
    except FragError:
        return None
    return ("the model", folder) if folder is not None else None


def command_inputs(*paths: Input | None, model: str | None | bool = False) -> list[Input]:
    """The inputs of a command: ``paths`` (None skipped) and, unless ``model`` is False, the model's folder."""
    out: list[Input] = [p for p in paths if p is not None]
    if model is not False:
        found = model_input(model or None)
        if found:
            out.append(found)
    return out


def _resolved(p: Path | str) -> Path:
    return Path(p).expanduser().resolve()


def _labelled(item: Input) -> tuple[str, Path]:
    if isinstance(item, tuple):
        return item[0], _resolved(item[1])
    return "", _resolved(item)


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be replaced: FRAG_HOME, the working directory, the home folder, or a parent of one."""
    for label, p in (("FRAG_HOME", frag_home()), ("the working directory", Path.cwd().resolve()),
                     ("your home folder", Path.home().resolve())):
        if out == p:
            return f"it is {label}"
        if out in p.parents:
            return f"it contains {label} ({p})"
    return None


def _not_input(out: Path, label: str, src: Path, strict: bool) -> None:
    what = f"an input of this command ({label + ': ' if label else ''}{src})"
    if out == src:
        raise FragError(f"--out {out} is {what}", PROTECT_HINT)
    if out in src.parents:
        raise FragError(f"--out {out} contains {what}", PROTECT_HINT)
    if strict and src in out.parents:
        raise FragError(f"--out {out} sits inside {what}", "choose a --out outside it")


def check_target(out: Path | str, inputs: Iterable[Input] = (), searched: Iterable[Input] = ()) -> Path:
    """Check a typed ``--out`` before anything is read, loaded or written; returns it resolved.

    ``inputs``: the output may not be one, contain one, or sit inside one; ``searched`` (``frag report --run``):
    it may not be one or contain one (a folder inside it that is no input is fine). frag's caches are always
    inputs. Everything refused is one FragError (exit 2)."""
    typed = Path(out).expanduser()
    raw = typed.absolute()
    if raw.is_symlink():
        raise FragError(f"--out {typed} is a symbolic link (to {os.readlink(raw)})",
                        "pass the folder itself, or choose another --out")
    out = raw.resolve()
    if out == Path(out.anchor):
        raise FragError(f"--out {typed} is the filesystem root", PROTECT_HINT)
    if out.exists() and not out.is_dir():
        raise FragError(f"--out {out} is a file, not a folder", "choose another --out path")
    for item in inputs:
        _not_input(out, *_labelled(item), strict=True)
    for item in searched:
        _not_input(out, *_labelled(item), strict=False)
    if out.is_dir():
        why = _protected(out)
        if why:
            raise FragError(f"refusing to overwrite {out}: {why}", PROTECT_HINT)
    for cache in (("frag's cache", cache_dir()), ("frag's model cache", model_cache_dir())):
        _not_input(out, *_labelled(cache), strict=True)
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FragError(f"cannot create {out}: {probe} is a file", "choose another --out path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FragError(f"cannot write to {probe}", "choose a writable --out folder")
    return out


def profile_inputs(profile_folder: Path, ctx: dict, model: str | None, *files: Input | None) -> list[Input]:
    """The inputs of a command that reads a profile (extract, sweep): the profile, ``files``, and the model it
    runs (``model``, else the profiled one)."""
    from fragcli.models import spec_of

    try:
        spec = model or spec_of(ctx["model"])
    except (KeyError, TypeError):
        spec = model
    return command_inputs(profile_folder, *files, model=spec)
