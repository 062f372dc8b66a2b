"""The fragment library (issue 14): registration by extract, similarity lookup for --fragment auto, frag cache."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest

from fragcli import library, library_disk
from fragcli.errors import FragError
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"
PARAPHRASE = "a crimson circle on a blue background"
TINY = ("-m", "tiny", "--seeds", "1", "--steps", "2")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """profile -> extract on tiny into its own FRAG_HOME's fragments/, once; returns (home, fragment folder)."""
    home = tmp_path_factory.mktemp("libhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRAG_HOME", str(home))
        r = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "1", "--steps", "2", "--out", home / "profile")
        assert r.exit_code == 0, r.output
        r = run_cli("extract", home / "profile", "--head-retention", "0.7", "--json")
        assert r.exit_code == 0, r.output
        folder = json.loads(r.stdout)["out"]
        got = library.entries()
    return home, folder, got


def _copy(built, frag_home, name="f1"):
    dst = frag_home / "fragments" / name
    shutil.copytree(built[1], dst)
    return dst


def test_extract_registers_the_fragment_with_its_prompt_embedding(built):
    home, folder, got = built
    assert [e.folder for e in got] == [str(folder)]
    e = got[0]
    assert e.prompt == PROMPT and e.model_name == "tiny" and e.techniques and e.size_bytes > 1000
    assert e.embedding is not None and len(e.embedding) > 8 and np.isfinite(e.embedding).all()
    assert e.use_count == 0 and e.last_used is None
    with sqlite3.connect(home / ".frag" / library.DB_NAME) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_auto_serves_a_paraphrase_above_the_threshold_and_says_why(built, frag_home, tmp_path):
    frag = _copy(built, frag_home)
    r = run_cli("generate", PARAPHRASE, *TINY, "--fragment", "auto", "--min-similarity", "0.8", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    lib = run["library"]
    assert run["fragment"] == str(frag.resolve()) and lib["chosen"] == str(frag.resolve()) and not lib["exact"]
    assert 0.8 <= lib["similarity"] < 1.0 and lib["candidates"][0]["rejected"] is None
    assert "prompt similarity" in r.stderr

    r = run_cli("generate", PARAPHRASE, *TINY, "--fragment", "auto", "--min-similarity", "0.9999",
                "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["fragment"] is None and "similar enough" in run["fallback_reason"]
    assert "below --min-similarity" in run["library"]["candidates"][0]["rejected"]
    assert "frag profile" in r.stderr and "frag extract" in r.stderr  # how to build one for this prompt
    r = run_cli("generate", PARAPHRASE, *TINY, "--fragment", "auto", "--min-similarity", "0.9999", "--strict",
                "--out", tmp_path / "c")
    assert_one_line_error(r, "--fragment auto", "similar enough")

    r = run_cli("generate", PROMPT, *TINY, "--fragment", "auto", "--min-similarity", "0.9999", "--out", tmp_path / "d")
    run = json.loads((tmp_path / "d" / "run.json").read_text())
    assert run["fragment"] == str(frag.resolve()) and run["library"]["exact"]  # the exact prompt still serves
    assert library.counters() == {"hits": 2, "misses": 2}  # the --strict refusal counts too
    assert library.get(str(frag)).use_count == 2
    r = run_cli("generate", PROMPT, *TINY, "--fragment", "auto", "--min-similarity", "2", "--out", tmp_path / "e")
    assert_one_line_error(r, "--min-similarity")


def test_lookup_drops_moved_deleted_and_replaced_folders_and_never_uses_them(built, frag_home, tmp_path):
    vec = built[2][0].embedding
    folders = [_copy(built, frag_home, n) for n in ("a", "b", "c", "d")]
    for f in folders:
        library.register(f, vec)
    h = library.get(str(folders[0])).model_hash
    shutil.move(folders[0], tmp_path / "moved")  # moved out of fragments/: gone from where it was registered
    shutil.rmtree(folders[1])
    (folders[2] / "fragment.safetensors").write_bytes(b"short")  # damaged (another size)
    notes = []
    got = library.lookup(h, PARAPHRASE, lambda text: np.asarray(vec) + 0.01, 0.5, warn=notes.append)
    assert got.chosen == str(folders[3].resolve())
    assert len(got.dropped) == 3 and len(notes) == 3 and all("dropped" in n for n in notes)
    assert [e.folder for e in library.entries()] == [str(folders[3].resolve())]
    # a corrupt byte of the same size: caught by verify (hashes), dropped, never used
    data = bytearray((folders[3] / "fragment.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folders[3] / "fragment.safetensors").write_bytes(bytes(data))
    r = run_cli("cache", "verify", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["dropped"]) == 1 and "does not match its hash" in r.stderr
    assert library.entries() == []


def test_a_corrupt_fragment_chosen_by_auto_falls_back_and_is_dropped(built, frag_home, tmp_path):
    frag = _copy(built, frag_home)
    library.register(frag, built[2][0].embedding)
    data = bytearray((frag / "fragment.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (frag / "fragment.safetensors").write_bytes(bytes(data))
    r = run_cli("generate", PROMPT, *TINY, "--fragment", "auto", "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "g" / "run.json").read_text())
    assert run["fragment"] is None and "does not match its hash" in run["fallback_reason"]
    assert library.entries() == [] and library.counters()["misses"] == 1


def test_cache_commands_list_show_verify_rm_prune(built, frag_home):
    a, b, c = (_copy(built, frag_home, n) for n in ("a", "b", "c"))
    r = run_cli("cache", "verify", "--json")  # registers what is under fragments/
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["added"]) == ["tiny-a-red-circle-on-a-blue-background-h70"] * 3
    r = run_cli("cache", "list", "--json")
    listed = json.loads(r.stdout)
    assert len(listed["fragments"]) == 3 and listed["hits"] == 0 and listed["total_bytes"] > 0
    size = listed["fragments"][0]["size_bytes"]
    r = run_cli("cache", "list")
    assert "3 fragments" in r.stdout and "hits" in r.stdout
    r = run_cli("cache", "show", str(a), "--json")
    assert json.loads(r.stdout)["folder"] == str(a.resolve())
    assert_one_line_error(run_cli("cache", "show", "tiny-a-red-circle-on-a-blue-background-h70"), "3 fragments")
    assert_one_line_error(run_cli("cache", "show", "nope"), "no fragment")

    (b / "notes.txt").write_text("mine")  # the user's file: rm refuses, deletes nothing
    assert_one_line_error(run_cli("cache", "rm", str(b)), "notes.txt")
    assert (b / "notes.txt").is_file() and (b / "manifest.json").is_file()
    r = run_cli("cache", "rm", str(c), "--json")
    assert r.exit_code == 0 and not c.exists()

    library.record(str(a.resolve()))  # a used recently, b never: LRU evicts b first, but b is not frag's to delete
    assert_one_line_error(run_cli("cache", "prune"), "max_size")
    assert_one_line_error(run_cli("cache", "prune", "--max-size", "lots"), "not a size")
    r = run_cli("cache", "prune", "--max-size", str(size), "--dry-run", "--json")
    got = json.loads(r.stdout)  # b (least recently used) is refused, so a would go to meet the cap; dry run: kept
    assert len(got["removed"]) == 1 and len(got["refused"]) == 1 and "notes.txt" in got["refused"][0] and a.exists()
    (b / "notes.txt").unlink()
    (frag_home / "config.yaml").write_text(f"max_size: {size}\n")
    r = run_cli("cache", "prune", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["removed"] and not b.exists() and a.exists()
    r = run_cli("cache", "prune", "--max-size", "0B", "--json")
    assert not a.exists() and library.entries() == []
    (frag_home / "config.yaml").write_text("max_sise: 1\n")
    assert_one_line_error(run_cli("cache", "prune"), "max_sise")


@pytest.mark.parametrize("text,expect", [("500MiB", 500 * 2**20), ("2GB", 2 * 10**9), ("1.5K", 1500), ("12", 12)])
def test_parse_size(text, expect):
    assert library_disk.parse_size(text) == expect


def test_parse_size_refuses_nonsense():
    with pytest.raises(FragError, match="not a size"):
        library_disk.parse_size("-3MB")


def test_generate_auto_never_writes_into_a_fragment_it_may_choose(built, frag_home):
    frag = _copy(built, frag_home)  # not indexed yet: a paraphrase may still pick it, so it is an input
    r = run_cli("generate", PARAPHRASE, *TINY, "--fragment", "auto", "--out", frag, "--overwrite")
    assert_one_line_error(r, "fragment")
    assert (frag / "manifest.json").is_file() and not list(frag.glob("seed-*.png"))


def test_a_fragment_that_failed_on_paraphrases_serves_only_its_own_prompt(built, frag_home):
    from fragcli.manifest import Reuse, update_manifest

    frag = _copy(built, frag_home)
    vec = np.asarray(built[2][0].embedding)
    library.register(frag, vec)
    h = library.get(str(frag)).model_hash
    near = library.lookup(h, PARAPHRASE, lambda t: vec + 0.01, 0.5, min_reuse=0.8)
    assert near.chosen == str(frag.resolve())  # no reuse record yet: similarity decides
    update_manifest(frag, reuse=Reuse(paraphrase_pass_rate=0.5, paraphrases_tested=4, paraphrases_passed=2))
    near = library.lookup(h, PARAPHRASE, lambda t: vec + 0.01, 0.5, min_reuse=0.8)
    assert near.chosen is None and "50% of its paraphrases passed" in near.candidates[0].rejected
    assert library.lookup(h, PROMPT, None, 0.5, min_reuse=0.8).chosen == str(frag.resolve())  # its own prompt: yes
