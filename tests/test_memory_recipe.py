"""`frag extract --objective memory` end to end on the shipped shapes model (short schedule to stay cheap):
the recipe search picks the levers, the fragment carries recipe.json + recipe.png as hashed artifacts, and the
fragment is smaller while generating than the full pipeline."""

import json

import pytest

from fragcli import api
from fragcli.manifest import read_manifest
from fragcli.memory import weight_bytes
from fragcli.models import load_model
from fragcli.recipe import read_recipe
from tests.helpers import assert_one_line_error, run_cli

PROMPT = "a large red circle in the center on a blue background"


@pytest.fixture(scope="module")
def shapes_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "profile"
    api.profile(PROMPT, model="shapes", seeds=2, steps=6, out=out, show_progress=False)
    return out


def test_objective_memory_builds_the_smallest_passing_recipe(shapes_profile, tmp_path):
    out = tmp_path / "frag"
    r = run_cli("extract", shapes_profile, "--objective", "memory", "--search-seeds", "1", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    m = read_manifest(out)
    assert {"recipe.json", "recipe.png"} <= set(m.artifacts) and m.costs.search_s > 0
    rec = read_recipe(out / "recipe.json")
    chosen = next(c for c in rec.candidates if c.id == rec.chosen)
    assert summary["recipe"]["chosen"] == rec.chosen and chosen.status == "passed"
    passing = [c for c in rec.candidates if c.status == "passed"]
    assert chosen.resident_bytes <= min(c.resident_bytes for c in passing) * (1 + rec.size_tolerance)
    names = [t.name for t in m.techniques]
    assert "quantize" in names and "prompt_embeds" in names

    full = load_model("shapes", "cpu", "fp32")
    from fragcli.loading import open_fragment

    frag = open_fragment(out, device="cpu", dtype="fp32")
    assert frag.pipe.text_encoder is None
    assert weight_bytes(frag.pipe) == chosen.resident_bytes  # what the search measured is what runs
    assert weight_bytes(frag.pipe) <= 0.35 * weight_bytes(full.pipe)


def test_objective_refuses_simulate_and_unknown_objectives(shapes_profile, tmp_path):
    assert_one_line_error(run_cli("extract", shapes_profile, "--objective", "smallest", "--out", tmp_path / "a"),
                          "objective")
    assert_one_line_error(run_cli("extract", shapes_profile, "--objective", "memory", "--simulate",
                                  "--out", tmp_path / "b"), "simulate")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_lever_no_candidate_can_plan_is_refused_before_any_image(shapes_profile, tmp_path, monkeypatch):
    import fragcli.generation as generation

    def no_images(*a, **k):
        raise AssertionError("the search generated an image before refusing")

    monkeypatch.setattr(generation, "generate", no_images)
    r = run_cli("extract", shapes_profile, "--objective", "memory", "--head-retention", "2", "--out", tmp_path / "c")
    assert_one_line_error(r, "--head-retention 2.0")
    assert not (tmp_path / "c").exists()
