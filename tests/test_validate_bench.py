"""`frag validate` and tools/bench.py on the tiny model: files, numbers that must agree, refusals."""

import json
import shutil

import pytest

from fragcli.bench import main as bench_main
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("vchain")
    prof, frag = root / "profile", root / "fragment"
    assert run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "0,1", "--steps", "3", "--out", prof).exit_code == 0
    assert run_cli("extract", prof, "--head-retention", "0.6", "--out", frag).exit_code == 0
    return root, prof, frag


@pytest.fixture
def fragment(chain, tmp_path):
    dst = tmp_path / "fragment"
    shutil.copytree(chain[2], dst)
    return dst


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
    assert rec["heads_removed_fraction"] == pytest.approx(1 - rec["head_retention"])
    manifest = json.loads((fragment / "manifest.json").read_text())
    assert manifest["quality"]["ssim_mean"] == pytest.approx(rec["aggregate"]["ssim_mean"])
    assert manifest["reuse"]["paraphrases"] == 2
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


def test_bench_side_by_side(fragment, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main([str(fragment), "--variants", "2", "--out", str(out)]) == 0
    b = json.loads(out.read_text())
    assert b["_type"] == "frag.bench" and b["variants"] == 2
    f, x = b["full"], b["fragment"]
    assert b["speedup"] == pytest.approx(f["per_image_s"] / x["per_image_s"])
    assert x["weight_bytes"] < f["weight_bytes"] and b["weight_reduction"] > 0
    assert x["params"] < f["params"]
    saved = f["per_image_s"] - x["per_image_s"]
    cost = b["profile_cost_s"] + b["extract_cost_s"]
    assert b["break_even_images"] == (pytest.approx(cost / saved) if saved > 0 else None)
    assert b["profile_cost_s"] > 0 and b["extract_cost_s"] > 0
    perf = json.loads((fragment / "manifest.json").read_text())["performance"]
    assert perf["speedup"] == pytest.approx(b["speedup"])


def test_bench_refuses_a_corrupt_fragment(fragment, tmp_path, capsys):
    (fragment / "fragment.safetensors").write_bytes(b"garbage")
    assert bench_main([str(fragment), "--variants", "1", "--out", str(tmp_path / "b.json")]) == 2
    assert "does not match its hash" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
