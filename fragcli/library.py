"""The fragment library (issue 14): an index of fragments under FRAG_HOME, searched by prompt similarity.

``$FRAG_HOME/.frag/library.sqlite`` (SQLite from the standard library, WAL journal, a busy timeout, so several
``frag`` processes read and write it at once) holds one row per fragment folder (``Entry``): its base model hash,
prompt, the prompt's text embedding (the mean over tokens of what the model's own text encoder makes of the prompt,
a float32 blob; ``prompt_embedding``), techniques, size on disk, the quality/performance summaries of its manifest,
when it was created and last used, and how often. A second table caches the embeddings of prompts looked up (so a
repeated ``--fragment auto`` wording does not need the encoder again), a third counts hits and misses.

The index is a cache of what is on disk, never the truth: a folder moved, deleted or changed behind its back (its
manifest's hash differs from the one registered) is dropped with a warning when a lookup or ``verify`` meets it,
and never used. Deleting (``remove``, ``prune``) follows the output rule of ``fragcli.outputs``: only a folder
whose marker lists everything in it, unchanged, is deleted; anything else is refused and left where it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fragcli.errors import FragError

DB_NAME = "library.sqlite"
BUSY_MS = 30_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS fragments (
  folder TEXT PRIMARY KEY, name TEXT NOT NULL, model_hash TEXT NOT NULL, model_name TEXT NOT NULL,
  prompt TEXT NOT NULL, prompt_norm TEXT NOT NULL, embedding BLOB, techniques TEXT NOT NULL, recipe TEXT,
  size_bytes INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL, quality TEXT, performance TEXT, reuse TEXT,
  created TEXT NOT NULL, registered TEXT NOT NULL, last_used TEXT, use_count INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS fragments_model ON fragments (model_hash);
CREATE TABLE IF NOT EXISTS prompts (
  model_hash TEXT NOT NULL, prompt_norm TEXT NOT NULL, embedding BLOB NOT NULL, PRIMARY KEY (model_hash, prompt_norm));
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Entry(BaseModel):
    """One fragment in the library (a row of ``fragments``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    folder: str = Field(description="absolute path of the fragment folder")
    model_hash: str = Field(description="the base model's hash (manifest base_model.hash)")
    model_name: str
    prompt: str
    embedding: list[float] | None = Field(None, description="mean text-encoder embedding of the prompt (None: not "
                                          "computed yet; filled in by the next lookup on this model)")
    techniques: list[str]
    recipe: str | None = Field(None, description="the recipe objective, when a search chose the levers")
    size_bytes: int
    manifest_sha256: str = Field(description="the manifest's identity when registered (``identity``): a change means "
                                 "another fragment now sits in the folder")
    quality: dict[str, Any] | None = None
    performance: dict[str, Any] | None = None
    reuse: dict[str, Any] | None = Field(None, description="the manifest's reuse block (frag validate's paraphrase "
                                         "pass rate): a fragment that failed on paraphrases serves only its prompt")
    created: str
    registered: str
    last_used: str | None = None
    use_count: int = 0

    def summary(self) -> dict[str, Any]:
        out = self.model_dump(exclude={"embedding"})
        out["has_embedding"] = self.embedding is not None
        return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def normal(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def db_path() -> Path:
    from fragcli.paths import cache_dir

    return cache_dir() / DB_NAME


@contextlib.contextmanager
def connect(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    """A connection to the index (created on first use): WAL journal, busy timeout; committed on success."""
    path = Path(path) if path else db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=BUSY_MS / 1000, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise FragError(f"the fragment library {path} cannot be opened ({exc})",
                        "check FRAG_HOME is writable") from None
    try:
        con.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        for _ in range(50):  # switching to WAL needs a moment without readers the first time
            try:
                if con.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                    break
            except sqlite3.OperationalError:
                pass
            time.sleep(0.05)
        con.executescript(_SCHEMA)
        if "reuse" not in {row[1] for row in con.execute("PRAGMA table_info(fragments)")}:
            with contextlib.suppress(sqlite3.OperationalError):  # an index of this morning's frag; another may race
                con.execute("ALTER TABLE fragments ADD COLUMN reuse TEXT")
        yield con
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise FragError(f"the fragment library {path} stayed locked by another frag process for "
                            f"{BUSY_MS // 1000} s", "retry when the other frag commands are done") from None
        raise FragError(f"the fragment library {path} is unusable ({exc})",
                        f"delete {path} and run frag cache verify to rebuild it") from None
    except sqlite3.DatabaseError as exc:
        raise FragError(f"the fragment library {path} is unusable ({exc})",
                        f"delete {path} and run frag cache verify to rebuild it") from None
    finally:
        con.close()


@contextlib.contextmanager
def _write(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _blob(vec) -> bytes | None:
    import numpy as np

    return None if vec is None else np.asarray(vec, dtype="<f4").tobytes()


def _vec(blob: bytes | None) -> list[float] | None:
    import numpy as np

    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(float).tolist()


_COLS = ("name", "folder", "model_hash", "model_name", "prompt", "embedding", "techniques", "recipe", "size_bytes",
         "manifest_sha256", "quality", "performance", "reuse", "created", "registered", "last_used", "use_count")


def _entry(row: tuple) -> Entry:
    d = dict(zip(_COLS, row, strict=True))
    d["embedding"] = _vec(d["embedding"])
    for key in ("techniques", "quality", "performance", "reuse"):
        d[key] = json.loads(d[key]) if d[key] else None
    return Entry(**d)


def _select(con, where: str = "", args: tuple = ()) -> list[Entry]:
    rows = con.execute(f"SELECT {', '.join(_COLS)} FROM fragments {where}", args).fetchall()
    return [_entry(r) for r in rows]


def identity(manifest) -> str:
    """What makes a fragment this fragment: name, creation time, base model and artifact hashes (not the quality or
    performance blocks that validate and bench write into the manifest later)."""
    core = {"name": manifest.name, "created": manifest.created, "model": manifest.base_model.hash,
            "artifacts": {k: a.sha256 for k, a in sorted(manifest.artifacts.items())}}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def register(folder: Path, embedding=None, *, db: Path | None = None) -> Entry:
    """Add (or refresh) the finished fragment ``folder``; ``embedding``: its prompt's (None: computed later)."""
    from fragcli import library_disk as disk
    from fragcli.manifest import read_manifest

    folder = Path(folder).resolve()
    m = read_manifest(folder)
    recipe = None
    if (folder / "recipe.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8")).get("objective")
    dump = lambda block: json.dumps(block.model_dump(mode="json")) if block is not None else None  # noqa: E731
    values = dict(
        folder=str(folder), name=m.name, model_hash=m.base_model.hash, model_name=m.base_model.name,
        prompt=m.profiling.prompt, prompt_norm=normal(m.profiling.prompt), embedding=_blob(embedding),
        techniques=json.dumps([t.name for t in m.techniques]), recipe=recipe, size_bytes=disk.folder_size(folder),
        manifest_sha256=identity(m), quality=dump(m.quality), performance=dump(m.performance), reuse=dump(m.reuse),
        created=m.created, registered=now(),
    )
    with connect(db) as con, _write(con):
        old = con.execute("SELECT embedding, manifest_sha256, last_used, use_count FROM fragments WHERE folder=?",
                          (str(folder),)).fetchone()
        if old is not None and old[1] == values["manifest_sha256"]:
            values["embedding"] = values["embedding"] or old[0]
            values["last_used"], values["use_count"] = old[2], old[3]
        cols = ", ".join(values)
        con.execute(f"INSERT OR REPLACE INTO fragments ({cols}) VALUES ({', '.join('?' * len(values))})",
                    tuple(values.values()))
        return _select(con, "WHERE folder=?", (str(folder),))[0]


def entries(*, db: Path | None = None, model_hash: str | None = None) -> list[Entry]:
    with connect(db) as con:
        if model_hash:
            return _select(con, "WHERE model_hash=? ORDER BY folder", (model_hash,))
        return _select(con, "ORDER BY folder")


def get(ref: str, *, db: Path | None = None) -> Entry:
    """An entry by name or folder; a one-line FragError when none (or several) match."""
    with connect(db) as con:
        found = _select(con, "WHERE folder=? OR name=?", (str(Path(ref).expanduser().resolve()), ref))
    if not found:
        raise FragError(f"no fragment {ref!r} in the library", "see frag cache list")
    if len(found) > 1:
        raise FragError(f"{len(found)} fragments are called {ref!r}", "pass the fragment's folder instead")
    return found[0]


def drop(folder: str, *, db: Path | None = None) -> bool:
    with connect(db) as con, _write(con):
        return con.execute("DELETE FROM fragments WHERE folder=?", (str(folder),)).rowcount > 0


REPLACED = "holds another fragment than the one registered (replaced or edited)"


def problem(entry: Entry, *, full: bool = False) -> str | None:
    """Why ``entry`` cannot be used as registered (moved, deleted, replaced, corrupt), or None. ``full`` re-hashes
    every artifact (``verify``); otherwise the manifest's hash and the artifacts' presence and sizes are checked."""
    from fragcli.fragment import verify_fragment
    from fragcli.manifest import read_manifest
    from fragcli.paths import inside

    folder = Path(entry.folder)
    if not folder.is_dir():
        return f"its folder {folder} was moved or deleted"
    try:
        m = read_manifest(folder)
        if identity(m) != entry.manifest_sha256:
            return f"{folder} {REPLACED}"
        if full:
            verify_fragment(folder, None)
        else:
            for rel, art in m.artifacts.items():
                path = inside(folder, rel)
                if not path.is_file() or path.stat().st_size != art.bytes:
                    return f"its artifact {rel} is missing or has the wrong size"
    except FragError as exc:
        return exc.one_line()
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    return None


def _bump(con, key: str) -> None:
    con.execute("INSERT INTO counters (key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
                (key,))


def counters(*, db: Path | None = None) -> dict[str, int]:
    with connect(db) as con:
        got = dict(con.execute("SELECT key, value FROM counters").fetchall())
    return {"hits": got.get("hits", 0), "misses": got.get("misses", 0)}


def record(folder: str | None, *, db: Path | None = None) -> None:
    """Count a ``--fragment auto`` lookup: a hit on ``folder`` (its last-used time and use count move), or a miss."""
    with connect(db) as con, _write(con):
        if folder is None:
            _bump(con, "misses")
            return
        _bump(con, "hits")
        con.execute("UPDATE fragments SET last_used=?, use_count=use_count+1 WHERE folder=?", (now(), str(folder)))


class Candidate(BaseModel):
    """One fragment of the library for this model, as the lookup saw it."""

    name: str
    folder: str
    similarity: float | None = Field(description="cosine similarity to the prompt (null: not computable)")
    rejected: str | None = Field(None, description="why it was not chosen (null: chosen)")


class Lookup(BaseModel):
    """What ``--fragment auto`` decided (recorded in run.json as ``library``)."""

    prompt: str = Field(description="the prompt asked for")
    min_similarity: float = Field(description="the threshold (--min-similarity, else fragment_min_similarity)")
    chosen: str | None = Field(None, description="the fragment folder chosen (null: the full model)")
    similarity: float | None = Field(None, description="cosine similarity of the chosen fragment's prompt embedding")
    exact: bool = Field(False, description="the chosen fragment was built for this very prompt")
    candidates: list[Candidate] = Field(default_factory=list)
    dropped: list[str] = Field(default_factory=list, description="entries dropped from the index: folder, why")


def _fresh(e: Entry, db) -> Entry:
    """``e`` with the reuse block its manifest holds now (frag validate writes it after the fragment is registered)."""
    from fragcli.manifest import read_manifest

    with contextlib.suppress(FragError, OSError):
        reuse = read_manifest(Path(e.folder)).reuse
        if (reuse.model_dump(mode="json") if reuse else None) != e.reuse:
            return register(Path(e.folder), db=db)
    return e


def cached_embedding(model_hash: str, prompt: str, *, db: Path | None = None) -> list[float] | None:
    with connect(db) as con:
        row = con.execute("SELECT embedding FROM prompts WHERE model_hash=? AND prompt_norm=?",
                          (model_hash, normal(prompt))).fetchone()
    return _vec(row[0]) if row else None


def _store_embedding(con, model_hash: str, prompt: str, vec) -> None:
    con.execute("INSERT OR REPLACE INTO prompts (model_hash, prompt_norm, embedding) VALUES (?, ?, ?)",
                (model_hash, normal(prompt), _blob(vec)))


def lookup(model_hash: str, prompt: str, embed: Callable[[str], Any] | None, min_similarity: float, *,
           db: Path | None = None, warn: Callable[[str], None] | None = None, exclude=(),
           min_reuse: float | None = None) -> Lookup:
    """The library's best fragment for ``prompt`` on ``model_hash``: an exact prompt match first, else the most
    similar prompt (cosine of embeddings) at or above ``min_similarity``. ``embed(text)`` gives a prompt's
    embedding (None: only exact matches and cached embeddings count). Entries whose folder is gone or changed
    are dropped from the index (``warn`` tells) and never chosen; ``exclude``: folders refused already. A fragment
    whose recorded paraphrase pass rate (``frag validate``) is below ``min_reuse`` serves only its own prompt."""
    out = Lookup(prompt=prompt, min_similarity=min_similarity)
    from fragcli import library_disk as disk

    disk.adopt(model_hash, db=db)
    found = [e for e in entries(db=db, model_hash=model_hash) if e.folder not in set(map(str, exclude))]
    alive = []
    for e in found:
        why = problem(e)
        if why is not None and why.endswith(REPLACED):  # frag wrote another fragment there: index that one
            with contextlib.suppress(FragError, OSError):
                e = register(Path(e.folder), db=db)
                why = problem(e) if e.model_hash == model_hash else "now built for another model"
        if why is None:
            alive.append(_fresh(e, db))
            continue
        drop(e.folder, db=db)
        out.dropped.append(f"{e.folder}: {why}")
        if warn:
            warn(f"fragment library: dropped {e.name} ({why})")
    want = normal(prompt)
    exact = sorted((e for e in alive if normal(e.prompt) == want), key=lambda e: e.created, reverse=True)
    query = None
    if not exact:
        query = cached_embedding(model_hash, prompt, db=db)
        if query is None and embed is not None and alive:
            query = embed(prompt)
            with connect(db) as con, _write(con):
                _store_embedding(con, model_hash, prompt, query)
    scored = []
    for e in alive:
        if exact:
            sim = 1.0 if e in exact else None
        else:
            vec = e.embedding
            if vec is None and embed is not None:
                vec = embed(e.prompt)
                with connect(db) as con, _write(con):
                    con.execute("UPDATE fragments SET embedding=? WHERE folder=?", (_blob(vec), e.folder))
            sim = disk.cosine(query, vec) if query is not None and vec is not None else None
        scored.append((e, sim))
    scored.sort(key=lambda p: (p[1] is not None, p[1] or 0.0, p[0].created), reverse=True)
    for e, sim in scored:
        cand = Candidate(name=e.name, folder=e.folder, similarity=None if sim is None else round(sim, 6))
        rate = (e.reuse or {}).get("paraphrase_pass_rate")
        if e not in exact and sim is not None and min_reuse is not None and rate is not None and rate < min_reuse:
            cand.rejected = (f"similarity {sim:.4f}, but only {rate:.0%} of its paraphrases passed frag validate "
                             f"(< {min_reuse:.0%}): it serves its own prompt only")
        elif out.chosen is None and sim is not None and (e in exact or sim >= min_similarity):
            out.chosen, out.similarity, out.exact = e.folder, cand.similarity, e in exact
        elif sim is None:
            cand.rejected = "built for another prompt" if exact else "no embedding of its prompt (model not loaded)"
        elif out.chosen is not None:
            cand.rejected = f"a better match was chosen (similarity {sim:.4f})"
        else:
            cand.rejected = f"similarity {sim:.4f} is below --min-similarity {min_similarity:g}"
        out.candidates.append(cand)
    return out


# The folders and the model: adopt, scan (verify), prompt_embedding, prune, remove (``fragcli.library_disk``).
