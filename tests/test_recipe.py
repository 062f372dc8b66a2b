"""The recipe search (fragcli.recipe): candidates tried on a copy of the denoiser, gated like frag validate, the
smallest passing one chosen, and recipe.json + recipe.png written and read back.

The search runs on a tiny profile (2 seeds, 2 steps) with head-pruning candidates and the toy techniques of
tests/toy_technique.py; thresholds are strict (SSIM >= 0.999, pHash 0) so that only a candidate that leaves the
images as they were passes. Tiny has no CLIP judge, so the CLIP gate is let through explicitly (allow_unmeasured)
except in the test that proves it is refused otherwise.
"""

import json

import pytest
import torch

from fragcli import api
from fragcli.errors import FragError
from fragcli.memory import weight_bytes
from fragcli.models import load_model
from fragcli.profiling.data import ProfileData
from fragcli.recipe import (
    GRIDS,
    RecipeCandidate,
    candidate_id,
    choose,
    default_candidates,
    more_aggressive,
    pareto_front,
    read_recipe,
    search_recipe,
    write_recipe,
)
from fragcli.records import Aggregate
from fragcli.thresholds import Thresholds
from tests.toy_technique import Int8Scale, ZeroChannel, registered

PROMPT = "a red circle on a blue background"
LIN = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
EVICT = {"evict_text_encoders": True, "cache_prompt": True}
STRICT = Thresholds.model_validate({"ssim_min": 0.999, "phash_max": 0})

CANDIDATES = [
    {"head_retention": 1.0},                                      # nothing removed: the profile's images exactly
    {"head_retention": 1.0, "toy_int8": LIN},                     # same images, more bytes (an added int8 buffer)
    {"head_retention": 1.0, **EVICT},                             # same images, text encoder not resident
    {"head_retention": 0.5, **EVICT},                             # smaller still, but the images change: fails
    {"head_retention": 0.25, **EVICT},                            # more aggressive than a failure: skipped
    {"head_retention": 1.5},                                      # refused by the plan
    {"head_retention": 1.0, "zero_channel": "nowhere.ff:0"},      # refused by the stack's check
    {"head_retention": 1.0, "ffn_retention": None},               # the same stack as the first: skipped
]


@pytest.fixture(scope="module")
def toys():
    with registered(ZeroChannel(), Int8Scale()) as techniques:
        yield techniques


@pytest.fixture(scope="module")
def profile(toys, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "profile"
    api.profile(PROMPT, model="tiny", seeds=2, steps=2, out=out, show_progress=False)
    return ProfileData(out)


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny", "cpu", "fp32")


@pytest.fixture(scope="module")
def searched(profile, loaded):
    base = loaded.denoiser
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    result = search_recipe(profile, loaded, "memory", candidates=CANDIDATES, thresholds=STRICT,
                           allow_unmeasured=True, show_progress=False)
    return result, base, before


def by_id(result):
    return {c.id: c for c in result.record.candidates}


def test_the_base_denoiser_is_untouched(searched, loaded):
    result, base, before = searched
    assert loaded.pipe.unet is base
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not base.__dict__.get("_frag_patches")
    assert not any(hasattr(m, "qweight") for m in base.modules())  # the toy's added buffer went with the copy


def test_the_smallest_passing_candidate_is_chosen_and_a_smaller_failing_one_is_not(searched, loaded):
    result, *_ = searched
    c = by_id(result)
    assert [x.status for x in result.record.candidates] == [
        "passed", "passed", "passed", "failed", "skipped", "refused", "refused", "skipped"]
    failed = c["h50-evict"]
    assert failed.quality.ssim_mean < 0.999 and failed.reasons and failed.reasons[0].startswith(("ssim", "phash"))
    passing = [x for x in result.record.candidates if x.status == "passed"]
    assert result.record.chosen == "h100-evict" == min(passing, key=lambda x: x.resident_bytes).id
    assert failed.resident_bytes < c["h100-evict"].resident_bytes  # smaller, yet not chosen
    assert result.chosen_options == {"head_retention": 1.0, **EVICT}
    # the identical candidates reproduce the profile's images exactly
    assert c["h100"].quality.ssim_mean == 1.0 and c["h100"].quality.phash_mean == 0
    # resident bytes: the pipeline without its text encoder; weight_bytes_full keeps it; the toy adds its buffer
    full = weight_bytes(loaded.pipe)
    assert result.record.full.resident_bytes == full == c["h100"].resident_bytes == c["h100-evict"].weight_bytes_full
    assert c["h100-evict"].resident_bytes == full - weight_bytes(loaded.pipe.text_encoder)
    assert c["h100-toy_int8=" + LIN].resident_bytes > full
    assert c["h50-evict"].denoiser_bytes < weight_bytes(loaded.denoiser)
    assert all(x.seconds_per_image > 0 for x in passing) and result.record.full.seconds_per_image > 0
    assert result.record.search_s > 0 and result.record.seeds == [0, 1]


def test_refused_and_skipped_candidates_are_recorded_with_their_reason(searched):
    c = by_id(searched[0])
    assert "head-retention" in c["h150"].reasons[0] and c["h150"].resident_bytes is None
    assert "nowhere.ff" in c["h100-zero_channel=nowhere.ff:0"].reasons[0]
    assert "h50-evict" in c["h25-evict"].reasons[0] and c["h25-evict"].quality is None
    assert "h100" in c["h100-2"].reasons[0]  # same stack as the first candidate: not generated again


def test_the_pareto_front(searched):
    c = by_id(searched[0])
    # h100-evict: smallest among the lossless ones; h50-evict: smaller still, with a loss
    assert c["h100-evict"].pareto and c["h50-evict"].pareto
    assert not c["h100"].pareto and not c[f"h100-toy_int8={LIN}"].pareto
    assert searched[0].record.pareto_metric == "ssim_loss"  # CLIP is not measured on tiny


def test_the_record_round_trips_through_write_and_read(searched, tmp_path):
    result, *_ = searched
    names = write_recipe(result, tmp_path)
    assert names == ["recipe.json", "recipe.png"] and (tmp_path / "recipe.png").stat().st_size > 1000
    back = read_recipe(tmp_path)
    assert back.plot == "recipe.png" and back.dump() == result.record.dump()
    data = json.loads((tmp_path / "recipe.json").read_text())
    assert data["_type"] == "frag.recipe" and data["schema_version"] == 1
    data["candidates"][0]["statuss"] = "passed"
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(FragError, match="invalid at candidates.0.statuss") as exc:
        read_recipe(tmp_path / "recipe.json")
    assert "\n" not in str(exc.value)
    data["schema_version"] = 2
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(FragError, match="schema_version 2"):
        read_recipe(tmp_path)


def test_with_every_candidate_failing_nothing_is_chosen(profile, loaded, tmp_path):
    result = search_recipe(profile, loaded, "memory", seeds=[1], candidates=[{"head_retention": 0.5, **EVICT}],
                           thresholds=STRICT, allow_unmeasured=True, show_progress=False)
    assert result.record.chosen is None and result.chosen is None and result.chosen_options is None
    assert [c.status for c in result.record.candidates] == ["failed"]
    err = result.refusal()
    assert "no memory recipe passed" in str(err) and "h50-evict: ssim_min" in str(err) and "\n" not in str(err)
    assert write_recipe(result, tmp_path) == ["recipe.json", "recipe.png"]
    assert read_recipe(tmp_path).chosen is None


def test_an_unmeasurable_gate_is_refused_before_any_candidate_runs(profile, loaded):
    with pytest.raises(FragError, match="clip_delta_max cannot be measured"):
        search_recipe(profile, loaded, "memory", candidates=[{"head_retention": 1.0}], show_progress=False)


def test_bad_candidates_and_objectives_are_refused(profile, loaded):
    with pytest.raises(FragError, match="unknown option.*ffn_retension"):
        search_recipe(profile, loaded, candidates=[{"ffn_retension": 0.8}], show_progress=False)
    with pytest.raises(FragError, match="unknown objective"):
        search_recipe(profile, loaded, "smallest", show_progress=False)
    with pytest.raises(FragError, match="unknown objective"):
        default_candidates("smallest")


# ------------------------------------------------------------------------------------ the grid, without a model


def test_the_memory_grid_is_ordered_cheap_to_aggressive():
    grid = default_candidates("memory")
    assert len(grid) == 12 and all(c["evict_text_encoders"] and c["cache_prompt"] for c in grid)
    ids = [candidate_id(c) for c in grid]
    assert ids[:6] == ["int8-evict", "int8-r93-evict", "int8-f80-evict", "int8-f80-r93-evict", "int8-f60-evict",
                       "int8-f60-r93-evict"]
    assert all(i.startswith("fp8") for i in ids[6:])
    # every candidate comes after every milder one (so a failure can skip the ones after it)
    assert not [(a, b) for i, a in enumerate(grid) for b in grid[i + 1:] if more_aggressive(a, b)]
    assert more_aggressive(grid[5], grid[0]) and more_aggressive(grid[6], grid[0])


def test_levers_set_by_hand_are_fixed_in_every_candidate():
    grid = default_candidates("memory", {"quantize": "int8", "head_retention": 0.7, "cache_prompt": False,
                                         "score": "energy", "safety_margin": 0.0, "ffn_retention": None})
    assert len(grid) == 6
    assert all(c["quantize"] == "int8" and c["head_retention"] == 0.7 and c["score"] == "energy"
               and c["cache_prompt"] for c in grid)
    # an option at its technique's default stays out of the id; one that differs is named
    assert candidate_id(grid[0]) == "int8-h70-evict-score=energy"
    assert all(c["quantize"] is None for c in default_candidates("memory", {"quantize": "none"}))
    assert set(GRIDS) == {"memory", "speed", "balanced"}


def test_more_aggressive():
    a = {"quantize": "int8", "ffn_retention": 0.8, "low_rank_energy": None}
    assert more_aggressive({**a, "ffn_retention": 0.6}, a)
    assert more_aggressive({**a, "quantize": "fp8"}, a)
    assert more_aggressive({**a, "low_rank_energy": 0.93, "evict_text_encoders": True}, a)
    assert not more_aggressive(a, a)
    assert more_aggressive({**a, "step_cache": 0.1}, {**a, "step_cache": 0.05})  # a higher drift reuses more
    assert more_aggressive({**a, "step_cache": 0.02}, a) and not more_aggressive(a, {**a, "step_cache": 0.02})
    assert not more_aggressive({**a, "ffn_retention": 0.9, "low_rank_energy": 0.93}, a)  # milder in one lever
    assert not more_aggressive({**a, "ffn_retention": 0.6, "score": "entropy"}, a)  # another option differs


def _cand(cid, status, mib, sec, ssim):
    return RecipeCandidate(id=cid, options={}, status=status, resident_bytes=mib << 20, seconds_per_image=sec,
                           quality=Aggregate(clip_full_mean=None, clip_fragment_mean=None, clip_delta_rel=None,
                                             lpips_mean=None, ssim_mean=ssim, phash_mean=0, pass_rate=1.0))


def test_each_objective_chooses_its_best_passing_candidate():
    cands = [_cand("big-fast", "passed", 100, 1.0, 0.99), _cand("small-slow", "passed", 40, 3.0, 0.95),
             _cand("mid", "passed", 60, 1.5, 0.97), _cand("tiny-bad", "failed", 10, 0.5, 0.5),
             RecipeCandidate(id="no", options={}, status="refused")]
    assert choose(cands, "memory").id == "small-slow"
    assert choose(cands, "speed").id == "big-fast"
    assert choose(cands, "balanced").id == "mid"  # 90 vs 100 vs 120 MiB*s
    assert choose([cands[3], cands[4]], "memory") is None
    assert choose([_cand("a", "passed", 40, 2.0, 1), _cand("b", "passed", 40, 1.0, 1)], "memory").id == "b"


def test_memory_takes_the_least_aggressive_of_the_candidates_within_the_size_tolerance():
    def cand(cid, mib, **options):
        c = _cand(cid, "passed", mib, 1.0, 0.9)
        c.options = {"quantize": "int8", "ffn_retention": None, **options}
        return c

    mild, strong = cand("int8-f80", 1010, ffn_retention=0.8), cand("int8-f60", 1000, ffn_retention=0.6)
    fp8 = cand("fp8-f80", 1010, ffn_retention=0.8, quantize="fp8")
    assert choose([strong, fp8, mild], "memory").id == "int8-f80"  # 1% larger, less removed, int8 before fp8
    assert choose([strong, mild], "memory", size_tolerance=0.0).id == "int8-f60"
    assert choose([strong, cand("int8", 1100)], "memory").id == "int8-f60"  # 10% larger: not as small


def test_speed_takes_the_least_aggressive_of_the_candidates_within_timing_noise():
    def cand(cid, sec, sc):
        c = _cand(cid, "passed", 100, sec, 0.9)
        c.options = {"step_cache": sc}
        return c

    assert choose([cand("sc10", 1.00, 0.1), cand("sc5", 1.03, 0.05)], "speed").id == "sc5"  # within 5%
    assert choose([cand("sc10", 1.00, 0.1), cand("sc5", 1.20, 0.05)], "speed").id == "sc10"  # clearly faster


def test_pareto_front():
    assert pareto_front([(1, 3), (2, 2), (3, 1), (3, 3), (2, 2.5)]) == [True, True, True, False, False]
    assert pareto_front([(1, 1), (1, 1)]) == [True, True]
