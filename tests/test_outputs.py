"""Output folders: --overwrite replaces only what frag wrote, swaps are recoverable, one writer at a time."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from fragcli.errors import FragError
from fragcli.paths import MARKER, check_out_dir, recover_swap, release_lock, staged_dir


def _write(out, files=("a.json",)):
    with staged_dir(out) as tmp:
        for f in files:
            (tmp / f).write_text(json.dumps({"_type": "frag.test"}))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staged_dir_marks_what_frag_wrote(tmp_path):
    out = tmp_path / "out"
    _write(out, ("a.json", "b.png"))
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == ["a.json", "b.png"] and marker["_type"] == "frag.output"
    assert marker["schema_version"] == 2 and marker["dirs"] == []
    assert marker["files"]["a.json"]["bytes"] == (out / "a.json").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, lock or old copy left


@pytest.mark.parametrize("where", ["frag_home", "cwd", "parent_of_home"])
def test_overwrite_never_replaces_frag_home_the_cwd_or_their_parents(where, tmp_path, monkeypatch, frag_home):
    (frag_home / "x").write_text("precious")
    monkeypatch.chdir(frag_home)
    target = {"frag_home": frag_home, "cwd": frag_home, "parent_of_home": frag_home.parent}[where]
    with pytest.raises(FragError, match="refusing to overwrite"):
        check_out_dir(target, overwrite=True)
    assert (frag_home / "x").read_text() == "precious"


def test_overwrite_refuses_folders_frag_did_not_write(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "me.jpg").write_bytes(b"jpeg")
    with pytest.raises(FragError, match="frag did not write it"):
        check_out_dir(other, overwrite=True)
    ours = tmp_path / "ours"
    _write(ours)
    (ours / "notes.txt").write_text("mine")  # a user's file inside frag's output
    with pytest.raises(FragError, match=r"a file frag did not write \(notes.txt\)"):
        check_out_dir(ours, overwrite=True)
    assert (other / "me.jpg").exists() and (ours / "notes.txt").exists()


def test_overwrite_replaces_a_folder_frag_wrote(tmp_path):
    out = tmp_path / "out"
    _write(out, ("old.json",))
    assert check_out_dir(out, overwrite=True) == out
    _write(out, ("new.json",))
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.json"]


def test_an_input_or_a_folder_holding_one_is_never_the_output(tmp_path):
    profile = tmp_path / "run" / "profile"
    _write(profile)
    for target in (profile, profile.parent):
        with pytest.raises(FragError, match="an input of this command"):
            check_out_dir(target, overwrite=True, inputs=[profile])


def test_a_crash_between_the_renames_is_restored_on_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    _write(out, ("keep.json",))
    old = tmp_path / f".out.old-{_dead_pid()}"
    os.replace(out, old)  # the crash: the old copy moved aside, the new one never moved in
    note = recover_swap(out)
    assert "restored" in note and (out / "keep.json").exists() and not old.exists()
    _write(out, ("keep.json",))
    os.makedirs(old)  # the crash after the second rename: only the clean-up was left
    check_out_dir(out, overwrite=True)
    release_lock(out)
    assert not old.exists() and (out / "keep.json").exists()


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.{_dead_pid()}.abc123.tmp"
    stale.mkdir()
    (stale / "half.json").write_text("{")
    recover_swap(out)
    assert not stale.exists()


def test_a_second_writer_of_the_same_out_is_refused(tmp_path):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        from fragcli.paths import check_out_dir, staged_dir
        check_out_dir({str(out)!r}, overwrite=True)
        print("locked", flush=True)
        sys.stdin.readline()
        with staged_dir({str(out)!r}) as tmp:
            (tmp / "first.json").write_text("{{}}")
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FragError, match=rf"being written by another frag process \(pid {holder.pid}\)"):
            check_out_dir(out, overwrite=True)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert (out / "first.json").exists()
    check_out_dir(out, overwrite=True)  # released: now ours
    _write(out)


def test_temp_files_of_a_dead_writer_inside_an_output_do_not_block_overwrite(tmp_path):
    """A crash during an in-place update (validate/bench writing the manifest) leaves ``.manifest.json.PID.x.tmp``
    in the folder: once its process is gone it is removed, not taken for a user's file; a live writer's is kept."""
    out = tmp_path / "out"
    _write(out, ("manifest.json",))
    stale = out / f".manifest.json.{_dead_pid()}.k2j4.tmp"
    stale.write_text('{"half')
    assert check_out_dir(out, overwrite=True) == out
    release_lock(out)
    assert not stale.exists() and (out / "manifest.json").exists()
    live = out / f".manifest.json.{os.getpid()}.k2j4.tmp"
    live.write_text("{")
    with pytest.raises(FragError, match="a file frag did not write"):
        check_out_dir(out, overwrite=True)
    assert live.exists()


def test_a_refused_writer_leaves_no_lock_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    _write(out)
    with pytest.raises(FragError, match="exists and is not empty"):
        check_out_dir(out, overwrite=False)
    assert not (tmp_path / ".out.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(str(_dead_pid()))
    check_out_dir(out, overwrite=False)
    assert (tmp_path / ".out.lock").read_text() == str(os.getpid())
    _write(out)
    assert not (tmp_path / ".out.lock").exists()


PROMPT = "a red circle"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from tests.helpers import run_cli

    root = tmp_path_factory.mktemp("outs")
    r = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", root / "profile")
    assert r.exit_code == 0, r.output
    r = run_cli("extract", root / "profile", "--out", root / "fragment")
    assert r.exit_code == 0, r.output
    return root


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(("args", "needle"), [
    (["extract", "{p}", "--out", "{p}", "--overwrite"], "is an input"),
    (["extract", "{p}", "--out", "{root}", "--overwrite"], "contains an input"),
    (["validate", "{f}", "--seeds", "1", "--out", "{f}", "--overwrite"], "is an input"),
    (["bench", "{f}", "--variants", "1", "--out", "{f}", "--overwrite"], "is an input"),
    (["profile", PROMPT, "-m", "tiny", "--out", ".", "--overwrite"], "working directory"),
])
def test_overwrite_never_destroys_an_input_or_the_working_directory(chain, args, needle, monkeypatch):
    from tests.helpers import assert_one_line_error, run_cli

    monkeypatch.chdir(chain)
    before = _tree(chain)
    argv = [a.format(p=chain / "profile", f=chain / "fragment", root=chain) for a in args]
    assert_one_line_error(run_cli(*argv), needle)
    assert _tree(chain) == before


@pytest.mark.parametrize(("args", "needle"), [
    (["--seeds", "99999999999999999999"], "100,000"),
    (["--steps", "100000"], "--steps 100000"),
    (["--width", "65536", "--height", "65536"], "--width 65536"),
    (["--guidance", "nan"], "--guidance nan"),
    (["--width", "0"], "--width 0"),
])
def test_extreme_numbers_are_refused_before_the_model_loads(args, needle, frag_home, monkeypatch):
    from tests.helpers import assert_one_line_error, run_cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("fragcli.models.load_model", no_load)
    for command in (["profile", PROMPT], ["generate", PROMPT]):
        assert_one_line_error(run_cli(*command, "-m", "tiny", *args), needle)
    assert not (frag_home / "reports").exists()


def test_an_unwritable_frag_home_does_not_break_commands_writing_elsewhere(tmp_path, monkeypatch):
    """(root writes through permissions, so the unwritable FRAG_HOME here is a path below a plain file)"""
    from tests.helpers import assert_one_line_error, run_cli

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("FRAG_HOME", str(blocker / "home"))
    monkeypatch.setenv("FRAG_MODEL_CACHE", str(blocker / "models"))
    r = run_cli("profile", PROMPT, "--seeds", "1", "--steps", "1", "--out", tmp_path / "p")  # shapes ships
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "context.json").is_file()
    assert_one_line_error(run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1",
                                  "--out", tmp_path / "q"), "cannot build the built-in model tiny", "FRAG_MODEL_CACHE")


def test_a_fragment_changed_while_it_loads_is_never_used_half_and_half(chain, frag_home, monkeypatch):
    """``generate --fragment``: a fragment folder that changes between the start and the end of its load (another
    process swapped, deleted or updated it) is loaded again from the base model, and refused if it keeps changing."""
    import fragcli.loading
    from fragcli.runs import load_with_fragment
    from tests.helpers import private_copy

    folder = private_copy(chain / "fragment", frag_home)
    real, calls = fragcli.loading.open_fragment, []

    def load_and_change(target, changes, **kw):
        calls.append(target)
        loaded = real(target, **kw)
        if len(calls) <= changes:
            os.utime(folder / "manifest.json")  # as an in-place update or a swap would: the files are not the same
        return loaded

    reasons = []
    monkeypatch.setattr(fragcli.loading, "open_fragment", lambda t, **kw: load_and_change(t, 1, **kw))
    loaded, used, reason = load_with_fragment("tiny", str(folder), PROMPT, "cpu", "auto", False, reasons.append)
    assert used == folder.resolve() and reason is None and not reasons and len(calls) == 2
    assert loaded.pipe._frag_fragment  # the second load

    calls.clear()
    monkeypatch.setattr(fragcli.loading, "open_fragment", lambda t, **kw: load_and_change(t, 99, **kw))
    loaded, used, reason = load_with_fragment("tiny", str(folder), PROMPT, "cpu", "auto", False, reasons.append)
    assert used is None and "was replaced, deleted or updated by another process" in reason and len(calls) == 2
    assert not getattr(loaded.pipe, "_frag_fragment", None)  # the full model, untouched
    assert len(reasons) == 1 and reasons[0].startswith("fragment refused")


def test_fragment_auto_finds_a_fragment_hidden_by_an_interrupted_swap(chain, frag_home, capsys):
    """A kill between the renames of ``extract --overwrite fragments/x`` leaves only ``.x.old-PID``: ``auto`` puts
    it back (as the next writer would) instead of running the full model; a half-deleted fragment is skipped."""
    from fragcli.fragment import find_fragment
    from fragcli.manifest import read_manifest

    fragments = frag_home / "fragments"
    fragments.mkdir()
    hidden = fragments / f".x.old-{_dead_pid()}"
    shutil.copytree(chain / "fragment", hidden)
    shutil.copytree(chain / "fragment", fragments / "y")
    (fragments / "y" / "fragment.safetensors").unlink()  # being deleted by another process
    model_hash = read_manifest(hidden).base_model.hash
    assert find_fragment(model_hash, PROMPT) == fragments / "x"
    assert (fragments / "x" / "manifest.json").is_file() and not hidden.exists()
    assert "restored" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["[" * 100_000, "1" * 5000, "{broken", "\udcff"])
def test_read_json_refuses_deep_huge_or_broken_json_in_one_error(tmp_path, text):
    from fragcli.paths import read_json

    p = tmp_path / "x.json"
    p.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FragError, match="malformed|nested too deeply"):
        read_json(p, "record")


def test_frag_rewriting_its_own_file_keeps_the_output_replaceable(tmp_path):
    """validate/bench rewrite a fragment's manifest in place: the marker follows, in nested outputs too (a sweep's
    point), so the output stays frag's; a file the user edited first stays the user's."""
    from fragcli.paths import atomic_write_text

    outer = tmp_path / "sweep"
    with staged_dir(outer) as tmp:
        _write(tmp / "p90" / "fragment", ("manifest.json",))  # an output built inside another (frag sweep)
        (tmp / "sweep.json").write_text("{}")
    inner = outer / "p90" / "fragment"
    atomic_write_text(inner / "manifest.json", '{"quality": 1}')
    for folder in (inner, outer):
        check_out_dir(folder, overwrite=True)
        release_lock(folder)
    (inner / "manifest.json").write_text('{"quality": "mine"}')  # the user's edit
    atomic_write_text(inner / "manifest.json", '{"quality": 2}')  # frag does not launder it
    for folder in (inner, outer):
        with pytest.raises(FragError, match="manifest.json, changed since frag wrote it"):
            check_out_dir(folder, overwrite=True)


@pytest.mark.parametrize(("how", "needle"), [
    ("nested-file", r"a file frag did not write \(sub/deep/mine.txt\)"),
    ("folder", r"a folder frag did not create \(sub/extra/\)"),
    ("symlink", r"a symbolic link frag did not write \(sub/link\)"),
    ("edited", r"sub/a.json, changed since frag wrote it"),
    ("old-marker", "written by an older frag.*delete it yourself"),
    ("no-marker", "frag did not write it"),
    ("frag-json-no-marker", "frag did not write it"),
])
def test_overwrite_refuses_anything_frag_did_not_write_at_any_depth(tmp_path, how, needle):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "sub" / "deep").mkdir(parents=True)
        (tmp / "sub" / "a.json").write_text(json.dumps({"_type": "frag.test"}))
    sub = out / "sub"
    if how == "nested-file":
        (sub / "deep" / "mine.txt").write_text("mine")
    elif how == "folder":
        (sub / "extra").mkdir()
    elif how == "symlink":
        (sub / "link").symlink_to(tmp_path)
    elif how == "edited":
        (sub / "a.json").write_text(json.dumps({"_type": "frag.test", "mine": True}))
    elif how == "old-marker":
        (out / MARKER).write_text(json.dumps({"_type": "frag.output", "files": ["sub"], "pid": 1, "written": "x"}))
    else:
        (out / MARKER).unlink()
        if how == "frag-json-no-marker":
            (out / "context.json").write_text(json.dumps({"_type": "frag.profile"}))
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(FragError, match=needle):
        check_out_dir(out, overwrite=True)
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_odd_out_paths_are_refused_in_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for path, needle in ((tmp_path.anchor, "filesystem root"), (afile, "is a file"), (afile / "x", "is a file"),
                         (link, "symbolic link")):
        with pytest.raises(FragError, match=needle) as info:
            check_out_dir(path, overwrite=True)
        assert "\n" not in info.value.one_line()
    assert afile.read_text() == "mine" and link.is_symlink() and not (tmp_path / "nowhere").exists()
