"""Find a run's files (profile, fragment, validation, bench) by name and ``_type``, liberally.

``--run DIR`` may be a run folder laid out any way: the files are searched for up to ``MAX_DEPTH`` folders deep
(hidden folders, e.g. half-written staging folders, are skipped). A file with a known name but another
``_type`` is skipped with a note; every other file is validated with its model (manifests with
``fragcli.manifest.read_manifest``, which migrates version 1; bench.json with ``fragcli.bench.read_bench``; the rest
with ``fragcli.records``), so a malformed, wrong-typed or newer one is a one-line FragError naming file and field.
Each ``Source`` holds the validated record as its JSON dict.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fragcli.errors import FragError
from fragcli.hypotheses import Source
from fragcli.paths import read_json

MAX_DEPTH = 3
KNOWN: dict[str, str] = {
    "context.json": "frag.profile",
    "manifest.json": "frag.fragment",
    "selection.json": "frag.selection",
    "validation.json": "frag.validation",
    "bench.json": "frag.bench",
}


@dataclass
class RunFiles:
    """Everything found for one run. ``Source.path`` is shown as evidence (relative to the searched folder)."""

    root: Path
    profile: Source | None = None
    profile_parquet: Path | None = None
    blocks_parquet: Path | None = None
    manifest: Source | None = None
    manifest_sha256: str | None = None
    selection: Source | None = None
    validations: list[Source] = field(default_factory=list)  # the run's own
    sweep: list[Source] = field(default_factory=list)  # from --sweep folders
    primary: Source | None = None  # the validation of this run's fragment
    bench: Source | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # role -> path, for the report's provenance

    @property
    def points(self) -> list[Source]:
        """Every validation point (the run's and the sweeps'), for H1 and the quality-vs-retention plot."""
        seen, out = set(), []
        for src in [*self.validations, *self.sweep]:
            key = os.path.realpath(src.file or src.path)
            if key not in seen:
                seen.add(key)
                out.append(src)
        return out

    def model(self) -> dict[str, Any]:
        """``{name, hash}`` from the first file that names the model; a note when files disagree."""
        found = []
        for src, keys in ((self.manifest, ("base_model",)), (self.profile, ("model",)),
                          (self.primary, ("model",)), (self.bench, ("model",))):
            m = src.data.get(keys[0]) if src else None
            if isinstance(m, dict) and m.get("name"):
                found.append({"name": str(m["name"]), "hash": m.get("hash")})
        if not found:
            return {"name": "unknown", "hash": None}
        hashes = {f["hash"] for f in found if f["hash"]}
        if len(hashes) > 1:
            self.notes.append(f"the run's files name different model hashes ({', '.join(sorted(h[:12] for h in hashes))})")
        return found[0]


def _walk(root: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Files with a known name under ``root``, at most ``MAX_DEPTH`` folders deep, sorted shallowest first.

    Folders in ``exclude`` (the ``--sweep`` folders, when they sit inside the run) are not searched.
    """
    out = []
    base_depth = len(root.parts)
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).parts) - base_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < MAX_DEPTH
                         and (Path(folder) / d).resolve() not in exclude)
        out.extend(Path(folder) / f for f in files if f in KNOWN)
    return sorted(out, key=lambda p: (len(p.parts), str(p)))


def _validated(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (read from ``path``) validated with the model of its file, as that model's JSON dict."""
    from fragcli.records import ProfileContext, ValidationRecord, parse_record

    name = path.name
    if name == "manifest.json":
        from fragcli.manifest import read_manifest

        return read_manifest(path.parent).model_dump(by_alias=True, mode="json")
    if name == "bench.json":
        from fragcli.bench import read_bench

        return read_bench(path).model_dump(by_alias=True, mode="json")
    if name == "selection.json":
        from fragcli.techniques.head_selection import HeadSelection

        return parse_record(HeadSelection, data, path, "re-run frag extract").model_dump(by_alias=True, mode="json")
    cls = {"context.json": ProfileContext, "validation.json": ValidationRecord}[name]
    return parse_record(cls, data, path).dump()


def _load(path: Path, root: Path, notes: list[str]) -> Source | None:
    data = read_json(path, path.name)
    want = KNOWN[path.name]
    rel = f"{root.name}/{path.relative_to(root)}"
    if not isinstance(data, dict) or data.get("_type") != want:
        notes.append(f"skipped {rel}: _type is not {want}")
        return None
    return Source(rel, _validated(path, data), str(path))


def _pick(sources: list[Source], role: str, notes: list[str]) -> Source | None:
    if len(sources) > 1:
        notes.append(f"found {len(sources)} {role} files; used {sources[0].path}")
    return sources[0] if sources else None


def _scan(root: Path, flag: str, exclude: tuple[Path, ...] = ()) -> tuple[dict[str, list[Source]], list[str]]:
    """``{file name: [sources]}`` under ``root``, and notes about skipped files."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FragError(f"{flag} folder not found: {root}", f"pass {flag} an existing run folder")
    root = root.resolve()
    found: dict[str, list[Source]] = {name: [] for name in KNOWN}
    notes: list[str] = []
    for path in _walk(root, exclude):
        src = _load(path, root, notes)
        if src is not None:
            found[path.name].append(src)
    return found, notes


def _linked_manifest(found: dict[str, list[Source]], notes: list[str]) -> Source | None:
    """The manifest of the fragment that a validation.json (``fragment``) or bench.json (``fragment_path``) names."""
    for src in [*found["validation.json"], *found["bench.json"]]:
        folder = src.data.get("fragment") if src.data.get("_type") == "frag.validation" else src.data.get("fragment_path")
        if isinstance(folder, str) and (Path(folder) / "manifest.json").is_file():
            notes.append(f"fragment manifest found through {src.path}: {folder}")
            return _load(Path(folder) / "manifest.json", Path(folder).parent, notes)
    return None


def _folder(src: Source) -> Path:
    return Path(src.file).parent


def _pick_primary(validations: list[Source], manifest: Source | None, manifest_sha: str | None) -> Source | None:
    """The validation of this run's fragment: same manifest hash, then same fragment folder, then validate/."""
    if not validations:
        return None
    if manifest_sha:
        for v in validations:
            if v.data.get("manifest_sha256") == manifest_sha:
                return v
    if manifest is not None:
        frag_dir = _folder(manifest).resolve()
        for v in validations:
            frag = v.data.get("fragment")
            if isinstance(frag, str):
                p = Path(frag)
                p = p if p.is_absolute() else _folder(v) / p
                if p.resolve() in (frag_dir, frag_dir / "manifest.json"):
                    return v
    for v in validations:
        if _folder(v).name.startswith("validate"):
            return v
    return validations[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def collect_run(run: Path, sweeps: list[Path] | None = None) -> RunFiles:
    """Search ``run`` (and each ``--sweep`` folder) for frag's files; FragError when nothing is found."""
    found, notes = _scan(run, "--run", tuple(Path(p).expanduser().resolve() for p in sweeps or []))
    rf = RunFiles(root=Path(run).expanduser().resolve(), notes=notes)
    rf.profile = _pick(found["context.json"], "profile context.json", rf.notes)
    rf.manifest = _pick(found["manifest.json"], "fragment manifest.json", rf.notes)
    rf.bench = _pick(found["bench.json"], "bench.json", rf.notes)
    selections = found["selection.json"]
    if rf.manifest is None:  # the fragment may live elsewhere (fragments/<name>): follow the run's own records
        rf.manifest = _linked_manifest(found, rf.notes)
        if rf.manifest is not None:
            more, _ = _scan(_folder(rf.manifest), "fragment")
            selections = more["selection.json"] + selections
    if rf.manifest is not None:  # the selection beside the manifest wins
        beside = [s for s in selections if _folder(s) == _folder(rf.manifest)]
        selections = beside + [s for s in selections if s not in beside]
    rf.selection = selections[0] if selections else None
    rf.validations = found["validation.json"]
    if not any([rf.profile, rf.manifest, rf.bench, rf.selection, rf.validations]):
        raise FragError(f"no frag files (context.json, manifest.json, validation.json, bench.json) under {rf.root}",
                        "pass --run the folder that frag profile/extract/validate/bench wrote into")
    if rf.profile is not None:
        folder = _folder(rf.profile)
        rf.profile_parquet = folder / "profile.parquet" if (folder / "profile.parquet").is_file() else None
        rf.blocks_parquet = folder / "blocks.parquet" if (folder / "blocks.parquet").is_file() else None
        if rf.profile_parquet is None:
            rf.notes.append(f"no profile.parquet beside {rf.profile.path}")
    if rf.manifest is not None:
        rf.manifest_sha256 = sha256_file(Path(rf.manifest.file))
    for sweep in sweeps or []:
        more, notes = _scan(sweep, "--sweep")
        rf.notes.extend(notes)
        if not more["validation.json"]:
            rf.notes.append(f"--sweep {sweep}: no validation.json found")
        rf.sweep.extend(more["validation.json"])
    rf.primary = _pick_primary(rf.validations, rf.manifest, rf.manifest_sha256)
    if len(rf.validations) > 1 and rf.primary is not None:
        rf.notes.append(f"found {len(rf.validations)} validation.json files; the run's own: {rf.primary.path}")
    for role, src in (("profile", rf.profile), ("manifest", rf.manifest), ("selection", rf.selection),
                      ("validation", rf.primary), ("bench", rf.bench)):
        if src is not None:
            rf.files[role] = src.path
    return rf
