"""`frag validate` on the tiny model: files, numbers that must agree, refusals (bench: test_bench_sweep_cli.py)."""

import json

import pytest

from fragcli.records import ValidationRecord
from tests.helpers import assert_one_line_error, private_copy, run_cli, tiny_chain

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return tiny_chain(tmp_path_factory.mktemp("vchain"), PROMPT)


@pytest.fixture
def fragment(chain, tmp_path):
    return private_copy(chain[2], tmp_path)


def test_validate_writes_record_grid_and_manifest_blocks(chain, fragment, tmp_path):
    para = tmp_path / "para.txt"
    para.write_text("# paraphrases\na crimson disc on an azure backdrop\n\na red round dot, blue background\n")
    out = tmp_path / "v"
    r = run_cli("validate", fragment, "--seeds", "0-2", "--paraphrases", para, "--paraphrase-seeds", "1",
                "--profile", chain[1], "--out", out, "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "validation.json").read_text())
    assert (out / "grid.png").is_file()
    assert rec["_type"] == "frag.validation" and rec["mode"] == "physical"
    assert [p["seed"] for p in rec["per_image"]] == [0, 1, 2]
    assert rec["reused_profile_images"] == [0, 1]  # the profile's images were reused for seeds 0 and 1
    assert set(rec["unavailable"]) == {"clip", "lpips"}  # tiny has no judge; no made-up numbers
    assert all(p["clip_full"] is None and 0 < p["ssim"] <= 1 for p in rec["per_image"])
    assert rec["paraphrases"]["prompts"] == ["a crimson disc on an azure backdrop", "a red round dot, blue background"]
    assert rec["weight_bytes"]["after"] < rec["weight_bytes"]["before"]
    ValidationRecord.model_validate(rec)
    manifest = json.loads((fragment / "manifest.json").read_text())
    assert [t["summary"] for t in rec["techniques"]] == [t["summary"] for t in manifest["techniques"]]
    assert manifest["quality"]["ssim_mean"] == pytest.approx(rec["aggregate"]["ssim_mean"])
    assert manifest["reuse"]["paraphrases_tested"] == 2
    # the manifest changed, but the fragment still loads (artifact hashes cover the weights, not the manifest)
    r = run_cli("generate", PROMPT, "--fragment", fragment, "--seeds", "1", "--steps", "1", "--strict",
                "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output


def test_simulated_and_physical_validation_agree(fragment, tmp_path):
    recs = []
    for flag in ("--simulate", None):
        out = tmp_path / (flag or "physical").strip("-")
        args = ["validate", fragment, "--seeds", "2", "--out", out] + ([flag] if flag else [])
        r = run_cli(*args)
        assert r.exit_code == 0, r.output
        recs.append(json.loads((out / "validation.json").read_text()))
    assert recs[0]["mode"] == "simulate" and recs[1]["mode"] == "physical"
    for a, b in zip(recs[0]["per_image"], recs[1]["per_image"], strict=True):
        assert a["ssim"] == pytest.approx(b["ssim"], abs=1e-3)
        assert a["phash_distance"] == pytest.approx(b["phash_distance"], abs=1)


def test_validate_refuses_bad_input(fragment, tmp_path):
    assert_one_line_error(run_cli("validate", tmp_path / "missing", "--out", tmp_path / "v"), "no manifest.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip_delta_max: [oops\n")
    assert_one_line_error(run_cli("validate", fragment, "--thresholds", bad, "--seeds", "1", "--out", tmp_path / "v"),
                          "bad.yaml")
    assert_one_line_error(run_cli("validate", fragment, "--paraphrases", tmp_path / "none.txt", "--out", tmp_path / "v"),
                          "paraphrase file")
    assert not (tmp_path / "v").exists()


# frag bench and frag sweep: tests/test_bench_sweep_cli.py
