"""Issue 34, nothing lost: a property test over random trees of user files and frag outputs.

Each seeded tree is FRAG_HOME (and the working directory). It holds the inputs of every command (``run/profile``,
``run/fragment``, and ``fragments/auto``, which ``--fragment auto`` resolves to), one untouched frag output
(``spare``, at a random depth), frag outputs that a user changed (a file added at any depth, a frag file edited,
a folder added, a symlink added, an older marker without hashes, no marker, a broken marker), user folders of
random files at random depths, frag's own cache (``.frag``), and odd paths (the filesystem root, a file, a path
below a file, symbolic links, a read-only folder, a path under ``.frag``). Every command runs with ``--overwrite``
onto every one of them. The properties:

- no user byte changes, ever: every file outside the replaced output is byte-identical afterwards (the only
  exception: ``validate``/``bench`` update their input fragment's manifest, a file frag wrote, and its marker);
- a refusal changes nothing on disk at all and is one ``error:`` line with exit code 2;
- only an output that frag wrote and nobody touched (``spare``), or a new folder, is written; every such case
  succeeds (the rule is not "refuse everything").

Tiny model, 2 steps, one seed; the inputs are made once per module and copied. Each command really overwrites
``spare`` once (in the first tree); every other case that passes the output check is a dry run, stopped right
after ``check_out_dir`` (nothing may have changed then either).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import stat
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from fragcli.errors import FragError
from fragcli.paths import MARKER
from tests.helpers import assert_one_line_error

PROMPT = "a red circle"
TINY = ["-m", "tiny", "--seeds", "1", "--steps", "2"]
TREES = (0, 1)
_COMMAND = []


def run_cli(*args):
    """``tests.helpers.run_cli`` with the click command built once (typer rebuilds it on every call: 80 ms)."""
    from click.testing import CliRunner
    from typer.main import get_command

    from fragcli.cli.app import app

    if not _COMMAND:
        _COMMAND.append(get_command(app))
    return CliRunner().invoke(_COMMAND[0], [str(a) for a in args])


COUNTS: dict[str, Counter] = defaultdict(Counter)
REASONS: Counter = Counter()


def _reason(line: str) -> str:
    line = re.sub(r"/\S*", "", line)  # the paths (a tree's folder names hold words such as 'folder')
    for key in ("an input", "filesystem root", "symbolic link", "is a file", "FRAG_HOME", "working directory",
                "by an older frag", "frag did not write it", "is not frag's", "did not create", "did not write",
                "changed since"):
        if key in line:
            return key
    return line
TIMES: dict = defaultdict(list)


def commands(t: Path) -> dict[str, list]:
    run = t / "run"
    return {
        "profile": ["profile", PROMPT, *TINY],
        "extract": ["extract", run / "profile"],
        "generate": ["generate", PROMPT, "--fragment", "auto", *TINY],
        "validate": ["validate", run / "fragment", "--seeds", "1", "--paraphrase-seeds", "1", "--profile",
                     run / "profile"],
        "bench": ["bench", run / "fragment", "--variants", "1", "--repeats", "1", "--no-memory", "--no-fidelity",
                  "--steps", "2"],
        "sweep": ["sweep", run / "profile", "--values", "0.9", "--seeds", "1", "--paraphrase-seeds", "1"],
        "report": ["report", "--run", run, "--compare", "none"],
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A profile, a fragment and a generate output of tiny, made once (copied into every tree)."""
    root = tmp_path_factory.mktemp("made")
    r = run_cli("profile", PROMPT, *TINY, "--out", root / "profile")
    assert r.exit_code == 0, r.output
    r = run_cli("extract", root / "profile", "--out", root / "fragment")
    assert r.exit_code == 0, r.output
    r = run_cli("generate", PROMPT, *TINY, "--out", root / "generate")
    assert r.exit_code == 0, r.output
    return root


# ---------------------------------------------------------------------------------------------- the tree


def _user_files(rng: random.Random, folder: Path, depth: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(rng.randint(1, 3)):
        (folder / f"note{i}{rng.choice(['.txt', '.json', '.png', ''])}").write_bytes(rng.randbytes(rng.randint(0, 64)))
    if depth > 0 and rng.random() < 0.6:
        _user_files(rng, folder / rng.choice(["sub", "images", "data"]), depth - 1)


def _tamper(rng: random.Random, folder: Path, how: str) -> None:
    frag_files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    dirs = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
    if how == "user-file":  # at any depth, e.g. under images/
        (rng.choice(dirs) / "mine.txt").write_bytes(rng.randbytes(16))
    elif how == "edited":  # a file frag wrote, changed by the user: the user's now
        with open(rng.choice(frag_files), "ab") as fh:
            fh.write(b"\n# my edit")
    elif how == "user-folder":  # (with a file in it: an empty folder is fine to write into)
        keep = rng.choice(dirs) / "keep"
        keep.mkdir()
        (keep / ".keep").write_bytes(b"")
    elif how == "symlink":
        (rng.choice(dirs) / "link").symlink_to(folder.parent)
    elif how == "old-marker":  # frag before issue 34: top-level names, no hashes
        names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
        (folder / MARKER).write_text(json.dumps({"_type": "frag.output", "files": names, "pid": 1,
                                                 "written": "2026-01-01T00:00:00+00:00"}))
    elif how == "no-marker":  # frag.* JSON inside, but no marker: not frag's
        (folder / MARKER).unlink()
    elif how == "broken-marker":
        (folder / MARKER).write_text("{not json")
    else:
        raise AssertionError(how)


TAMPERS = ("user-file", "edited", "user-folder", "symlink", "old-marker", "no-marker", "broken-marker")


def build_tree(seed: int, t: Path, made: Path) -> dict[str, set[Path]]:
    """The tree for ``seed``; returns the folders that may be written ('new': absent or empty; 'spare': a
    pristine frag output that is no input) by name."""
    rng = random.Random(seed)
    kinds = ["profile", "fragment", "generate"]
    shutil.copytree(made / "profile", t / "run" / "profile")
    shutil.copytree(made / "fragment", t / "run" / "fragment")
    shutil.copytree(made / "fragment", t / "fragments" / "auto")
    users = [t / f"u{i}" for i in range(rng.randint(2, 3))]
    for u in users:
        _user_files(rng, u, depth=1)
    places = [t, *users]
    spare = rng.choice(places) / "spare"
    shutil.copytree(made / rng.choice(kinds), spare)
    for i, how in enumerate(rng.sample(TAMPERS, k=3 if seed else len(TAMPERS))):
        where = rng.choice(places) / f"t{i}-{how}"
        if rng.random() < 0.4:
            where = where.parent / "deep" / where.name
        shutil.copytree(made / rng.choice(kinds), where)
        _tamper(rng, where, how)
    (t / ".frag").mkdir(exist_ok=True)
    (t / ".frag" / "notes.txt").write_text("frag's cache")
    (t / "readonly").mkdir()
    (t / "readonly" / "x.txt").write_text("mine")
    os.chmod(t / "readonly", 0o555)
    (t / "link-to-spare").symlink_to(spare)
    (t / "link-to-u0").symlink_to(users[0])
    return {"spare": {spare}, "new": {t / "new-out"}}


#: What each command reads in the tree: an output may not be, contain or sit inside one of these.
READS = {"profile": (), "extract": ("run/profile",), "generate": ("fragments/auto",),
         "validate": ("run/fragment", "run/profile"), "bench": ("run/fragment",), "sweep": ("run/profile",),
         "report": ("run/profile", "run/fragment")}
PRISTINE = ("run/profile", "run/fragment", "fragments/auto")  # frag outputs nobody touched


def writable_by(name: str, t: Path, writable: dict[str, set[Path]]) -> set[Path]:
    """Where ``name`` may write: ``spare``, a new folder, and the untouched frag outputs it does not read."""
    return writable["spare"] | writable["new"] | {t / rel for rel in PRISTINE if rel not in READS[name]}


def targets(t: Path, seed: int) -> list[Path]:
    """Every folder of the tree (symlinks not followed), and the odd paths."""
    found = [t]
    for dirpath, dirnames, _ in os.walk(t):
        found += [Path(dirpath) / d for d in sorted(dirnames)]
    some_file = next(p for p in sorted(t.glob("u*/note*")) if p.is_file())
    odd = [Path("/"), some_file, some_file / "below", t / ".frag" / "sub", t / "link-to-spare", t / "link-to-u0"]
    return list(dict.fromkeys(found + odd + [t / "new-out"]))  # (os.walk lists symlinked folders too)


_HASHES: dict[tuple, str] = {}


def _sha256(p: Path) -> str:
    """A file's SHA-256, reused while its (inode, size, mtime) are unchanged (any write changes the mtime)."""
    st = p.stat()
    key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _HASHES[key]


def snapshot(t: Path) -> dict[str, bytes | str]:
    """Every entry under ``t``: a file's hash, a symlink's target, 'dir'."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(t):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(t))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = _sha256(p)
    return out


def _cache(rel: str) -> bool:
    return (rel == ".frag" or rel.startswith(".frag/")) and rel != ".frag/notes.txt"  # frag's hash caches


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and not _cache(k)}


# ---------------------------------------------------------------------------------------------- the property


@pytest.mark.parametrize("seed", TREES)
def test_overwrite_never_changes_a_user_byte(seed, tmp_path, made, frag_home, monkeypatch):
    t = frag_home
    monkeypatch.chdir(t)
    writable = build_tree(seed, t, made)
    template = tmp_path / "template"
    shutil.copytree(t, template, symlinks=True)
    cases = [(name, argv, target) for target in targets(t, seed) for name, argv in commands(t).items()]
    (spare,) = writable["spare"]
    real = {name: spare if seed == TREES[0] else None for name in READS}  # one real overwrite per command
    for name, argv, target in cases:
        allowed = writable_by(name, t, writable)
        dry = target in allowed and real[name] != target
        before = snapshot(t)
        t0 = time.perf_counter()
        with _dry_run(monkeypatch, dry), _no_model(monkeypatch, target not in allowed):
            result = run_cli(*argv, "--out", target, "--overwrite")
        TIMES[name, result.exit_code == 0].append(time.perf_counter() - t0)
        after = snapshot(t)
        if dry:  # the whole output check passed (then the run stopped): nothing may have changed either
            COUNTS[name]["passed the check (dry)"] += 1
            assert_one_line_error(result, DRY)
            assert not _changed(before, after), (name, target, sorted(_changed(before, after)))
            continue
        if result.exit_code != 0:
            COUNTS[name]["refused"] += 1
            assert target not in allowed, (name, target, result.output)
            REASONS[_reason(assert_one_line_error(result))] += 1
            assert not _changed(before, after), (name, target, sorted(_changed(before, after)), result.output)
            continue
        assert target in allowed, f"{name} wrote over {target}, which frag may not replace: {result.output}"
        COUNTS[name]["created" if target in writable["new"] else "removed"] += 1
        rel_target = str(target.relative_to(t))
        in_place = {"validate": "run/fragment/", "bench": "run/fragment/"}.get(name)
        for rel, digest in before.items():
            if rel == rel_target or rel.startswith(rel_target + "/") or _cache(rel):
                continue
            if in_place and rel in (in_place + "manifest.json", in_place + MARKER):
                continue  # the input fragment's quality/performance block, and its marker
            assert after.get(rel) == digest, (name, target, rel)
        assert (target / MARKER).is_file()
        _restore(t, template)
    total = sum(sum(c.values()) for c in COUNTS.values())
    assert total >= len(cases)
    print(f"\noverwrite cases (trees so far): {dict((k, dict(v)) for k, v in sorted(COUNTS.items()))}")
    print({f"{k[0]}:{'ok' if k[1] else 'refused'}": (len(v), round(sum(v), 1)) for k, v in sorted(TIMES.items())})
    print(f"refusals by reason: {dict(REASONS.most_common())}")


DRY = "[dry run] the output check passed"


@contextlib.contextmanager
def _dry_run(monkeypatch, dry: bool):
    """With ``dry``, every command stops with a one-line error right after ``check_out_dir`` passes its --out (a
    real run of each command per tree is enough; the check is what is tested everywhere else)."""
    if not dry:
        yield
        return
    import fragcli.paths
    import fragcli.report.build

    real = fragcli.paths.check_out_dir

    def check_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise FragError(DRY)

    with monkeypatch.context() as m:
        m.setattr(fragcli.paths, "check_out_dir", check_then_stop)
        m.setattr(fragcli.report.build, "check_out_dir", check_then_stop)
        yield


@contextlib.contextmanager
def _no_model(monkeypatch, refused: bool):
    """Where the command must refuse, it must do so before any model loads."""
    if not refused:
        yield
        return

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the output was refused")

    with monkeypatch.context() as m:
        m.setattr("fragcli.models.load_model", no_load)
        m.setattr("fragcli.models.load_components", no_load)
        yield


def _restore(t: Path, template: Path) -> None:
    """Put the tree back as it was built (after a command replaced ``spare`` or made ``new-out``)."""
    for p in [t, *t.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, stat.S_IRWXU)
    for child in list(t.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    shutil.copytree(template, t, symlinks=True, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------- named cases


def test_report_never_replaces_the_run_it_reads(made, frag_home, monkeypatch):
    monkeypatch.chdir(frag_home)
    run = frag_home / "run"
    shutil.copytree(made / "profile", run)  # the run folder is itself a profile, written by frag
    before = snapshot(frag_home)
    assert_one_line_error(run_cli("report", "--run", run, "--compare", "none", "--out", run, "--overwrite"),
                          "input")
    assert not _changed(before, snapshot(frag_home))


def test_generate_never_replaces_the_fragment_auto_resolves_to(made, frag_home, monkeypatch):
    monkeypatch.chdir(frag_home)
    auto = frag_home / "fragments" / "red"
    shutil.copytree(made / "fragment", auto)
    before = snapshot(frag_home)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("fragcli.models.load_model", no_load)
    assert_one_line_error(run_cli("generate", PROMPT, "--fragment", "auto", *TINY, "--out", auto, "--overwrite"),
                          "input", str(auto))
    assert not _changed(before, snapshot(frag_home))


def test_a_user_file_under_images_blocks_overwrite_and_is_named(made, frag_home, monkeypatch):
    monkeypatch.chdir(frag_home)
    out = frag_home / "out"
    shutil.copytree(made / "profile", out)
    (out / "images" / "my-photo.png").write_bytes(b"mine")
    before = snapshot(frag_home)
    assert_one_line_error(run_cli("profile", PROMPT, *TINY, "--out", out, "--overwrite"), "images/my-photo.png")
    assert not _changed(before, snapshot(frag_home))


def test_an_output_of_an_older_frag_is_refused_with_a_fix(made, frag_home, monkeypatch):
    monkeypatch.chdir(frag_home)
    out = frag_home / "out"
    shutil.copytree(made / "generate", out)
    _tamper(random.Random(0), out, "old-marker")
    assert_one_line_error(run_cli("profile", PROMPT, *TINY, "--out", out, "--overwrite"), "older frag",
                          "delete it yourself")


@pytest.mark.parametrize("where", ["model", "frag_cache"])
def test_no_output_in_the_model_folder_or_frag_caches(where, frag_home, monkeypatch):
    from fragcli.models.builtin import builtin_folder
    from fragcli.paths import cache_dir

    monkeypatch.chdir(frag_home)
    target = {"model": lambda: builtin_folder("tiny") / "unet",
              "frag_cache": lambda: cache_dir() / "x"}[where]()
    assert_one_line_error(run_cli("profile", PROMPT, *TINY, "--out", target, "--overwrite"), "input")


@pytest.mark.parametrize(("args", "needle"), [
    (["report", "--run", "/"], "filesystem root"),
    (["report", "--run", "{p}", "--compare", "{file}"], "--compare"),
    (["report", "--run", "{p}", "--gate", "/"], "thresholds"),
    (["report", "--run", "{p}", "--out", "{p}/sub", "--overwrite"], "sits inside an input"),
    (["validate", "{f}", "--profile", "{file}", "--out", "{home}/v"], "profile context"),
    (["validate", "/", "--out", "{home}/v"], ""),
    (["bench", "{file}", "--out", "{home}/b"], ""),
    (["extract", "{file}", "--out", "{home}/e"], ""),
    (["sweep", "{home}/.frag", "--out", "{home}/s"], ""),
    (["generate", PROMPT, "--fragment", "", "--out", "{home}/g"], "--fragment is empty"),
    (["profile", PROMPT, "-m", "", "--out", "{home}/p"], "--model is empty"),
    (["profile", PROMPT, *TINY, "--out", "{home}/.frag/models", "--overwrite"], "frag's cache"),
    (["extract", "{p}", "--out", "{p}/images/x"], "sits inside an input"),
])
def test_odd_paths_anywhere_are_one_line_before_any_model_loads(args, needle, made, frag_home, monkeypatch):
    monkeypatch.chdir(frag_home)
    (frag_home / ".frag").mkdir()
    afile = frag_home / "afile"
    afile.write_text("mine")
    p = frag_home / "run" / "profile"
    shutil.copytree(made / "profile", p)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr("fragcli.models.load_model", no_load)
    before = snapshot(frag_home)
    argv = [a.format(p=p, f=made / "fragment", file=afile, home=frag_home) for a in args]
    assert_one_line_error(run_cli(*argv), needle)
    assert not _changed(before, snapshot(frag_home))
