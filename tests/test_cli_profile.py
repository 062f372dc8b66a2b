"""`frag profile` end to end on the tiny model, and its refusals of bad input."""

import json
import os

import pyarrow.parquet as pq
import pytest

from fragcli.profiling.recorder import BLOCK_COLUMNS, HEAD_COLUMNS
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="session")
def profile_dir(session_dir):
    out = session_dir / "profile-a"
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "0,1", "--steps", "4", "--profile-steps", "2",
                     "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_profile_writes_documented_files(profile_dir):
    for name in ("profile.parquet", "blocks.parquet", "context.json", "images/seed-0.png", "images/seed-1.png"):
        assert (profile_dir / name).is_file(), name
    table = pq.read_table(profile_dir / "profile.parquet")
    assert table.column_names == list(HEAD_COLUMNS)
    ctx = json.loads((profile_dir / "context.json").read_text())
    modules = len(set(table.column("module").to_pylist()))
    assert modules == 14
    assert table.num_rows == modules * 8 * 2 * 2  # modules x heads x seeds x profiled steps
    assert sorted(set(table.column("step").to_pylist())) == ctx["profiled_steps"] == [0, 3]
    blocks = pq.read_table(profile_dir / "blocks.parquet")
    assert blocks.column_names == list(BLOCK_COLUMNS)
    assert set(blocks.column("step").to_pylist()) == {0, 1, 2, 3}
    assert ctx["seeds"] == [0, 1] and ctx["steps"] == 4
    assert len(ctx["model"]["hash"]) == 64 and ctx["model"]["name"] == "tiny"
    assert len(ctx["text_embedding_hash"]) == 64
    assert ctx["timings"]["overhead_ratio"] > 0 and ctx["memory"]["weight_bytes"] > 0
    assert ctx["rows"]["profile"] == table.num_rows


def test_same_seeds_give_identical_parquet(profile_dir, tmp_path):
    again = tmp_path / "again"
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "0,1", "--steps", "4", "--profile-steps", "2",
                     "--out", again, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(again)
    assert pq.read_table(again / "profile.parquet").equals(pq.read_table(profile_dir / "profile.parquet"))


def test_default_out_is_under_frag_home(frag_home):
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1")
    assert result.exit_code == 0, result.output
    written = list((frag_home / "reports" / "tiny").glob("*/profile/context.json"))
    assert len(written) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["", "-m", "tiny"], "prompt is empty"),
        (["   ", "-m", "tiny"], "prompt is empty"),
        ([PROMPT, "-m", "tiny", "--seeds", "1-x"], "--seeds"),
        ([PROMPT, "-m", "tiny", "--steps", "0"], "--steps"),
        ([PROMPT, "-m", "no-such-model"], "unknown model"),
        ([PROMPT, "-m", "./missing/folder"], "does not exist"),
        ([PROMPT, "-m", "someone/not-cached"], "not in the local hugging face cache"),
        ([PROMPT, "-m", "tiny", "--width", "65"], "multiple of 8"),
        ([PROMPT, "-m", "tiny", "--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, frag_home):
    result = run_cli("profile", *args, "--steps" if "--steps" not in args else "--seeds", "1")
    assert_one_line_error(result, needle)
    assert not (frag_home / "reports").exists()  # nothing written


def test_out_not_empty_needs_overwrite(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", out)
    assert_one_line_error(result, "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", ro / "x")
    assert_one_line_error(result, "cannot write")


def test_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    import pyarrow.parquet

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyarrow.parquet, "write_table", boom)
    out = tmp_path / "p"
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", out)
    assert result.exit_code == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_help_has_an_example():
    for cmd in ("profile", "extract", "generate", "validate", "report"):
        result = run_cli(cmd, "--help")
        assert result.exit_code == 0 and "Example:" in result.output


def test_out_below_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", blocker / "sub")
    assert_one_line_error(result, "is a file")
    assert blocker.read_text() == "x"


def test_a_prompt_longer_than_the_text_window_is_warned_about(tmp_path):
    long = " ".join(["a red circle on a blue background"] * 20)
    result = run_cli("profile", long, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "the text encoder reads the first 77" in result.stderr
    short = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "1", "--out", tmp_path / "q")
    assert "text encoder reads" not in short.stderr
