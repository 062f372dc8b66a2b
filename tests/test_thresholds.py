from pathlib import Path

import pytest

from fragcli.errors import FragError
from fragcli.thresholds import (
    GATE_SPECS,
    check_image,
    default_thresholds,
    image_passes,
    load_thresholds,
    parse_thresholds,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "thresholds.yaml"
    path.write_text(text)
    return path


def test_shipped_file_parses_and_equals_defaults():
    th = load_thresholds(ROOT / "thresholds.yaml")
    assert th == default_thresholds()
    assert th.clip_delta_max.value == 0.02 and th.clip_delta_max.direction == "max"
    assert th.batch_speedup_min.value == 1.7 and th.gate_hypotheses == []
    assert set(th.flat()) == set(GATE_SPECS)


def test_partial_file_and_shorthand(tmp_path):
    th = load_thresholds(write(tmp_path, "ssim_min: 0.9\nlpips_max: {value: 0.1, direction: max}\n"
                                         "gate_hypotheses: [H3]\nregression: {speedup_rel: null}\n"))
    assert th.ssim_min.value == 0.9 and th.ssim_min.direction == "min"
    assert th.lpips_max.value == 0.1
    assert th.phash_max.value == GATE_SPECS["phash_max"].default
    assert th.gate_hypotheses == ["H3"]
    assert th.regression.speedup_rel is None


def test_empty_file_is_refused_not_silently_defaults(tmp_path):
    for text in ("", "# only a comment\n"):
        with pytest.raises(FragError, match="is empty"):
            load_thresholds(write(tmp_path, text))
    assert load_thresholds(None) == default_thresholds()


@pytest.mark.parametrize("text, words", [
    ("ssim_min: [1, 2\n", ["not valid YAML", "line"]),
    ("ssim_mn: 0.5\n", ["unknown key 'ssim_mn'"]),
    ("regression: {speedup: 0.1}\n", ["unknown key 'regression.speedup'"]),
    ("ssim_min: {value: 0.5, direction: min, extra: 1}\n", ["unknown key 'ssim_min.extra'"]),
    ("ssim_min: {value: high, direction: min}\n", ["ssim_min.value", "wrong type"]),
    ("ssim_min: {value: 0.5, direction: max}\n", ["ssim_min", "direction must be 'min'"]),
    ("lpips_max: {value: 0.5, direction: up}\n", ["lpips_max.direction", "min' or 'max"]),
    ("ssim_min: {value: 0.5}\n", ["ssim_min.direction", "missing"]),
    ("clip_delta_max: 2\n", ["clip_delta_max", "outside"]),
    ("regression: {memory_rel: -1}\n", ["regression.memory_rel"]),
    ("gate_hypotheses: [H9]\n", ["gate_hypotheses", "H1..H5"]),
    ("- 1\n- 2\n", ["must be a mapping"]),
])
def test_bad_files_raise_one_line_errors(tmp_path, text, words):
    with pytest.raises(FragError) as info:
        load_thresholds(write(tmp_path, text))
    msg = info.value.one_line()
    assert "\n" not in msg and " -- " in msg
    for word in words:
        assert word in msg
    assert info.value.code == 2


def test_missing_file(tmp_path):
    with pytest.raises(FragError, match="not found"):
        load_thresholds(tmp_path / "nope.yaml")


def test_image_check_skips_unavailable_metrics():
    th = parse_thresholds({"ssim_min": 0.7, "clip_delta_max": 0.02})
    good = {"clip_delta_rel": -0.01, "lpips": 0.1, "ssim": 0.8, "phash_distance": 4}
    assert image_passes(good, th)
    assert not image_passes({**good, "clip_delta_rel": -0.05}, th)
    assert not image_passes({**good, "ssim": 0.5}, th)
    check = check_image({**good, "clip_delta_rel": None, "lpips": float("nan")}, th)
    assert check.passed and set(check.skipped) == {"clip_delta_max", "lpips_max"}
    bad = check_image({**good, "phash_distance": 30}, th)
    assert not bad.passed and bad.failures[0].startswith("phash_max")


def test_tightened_moves_only_the_image_gates_towards_perfect():
    from fragcli.thresholds import Thresholds

    th = Thresholds()
    t = th.tightened(0.25)
    assert t.phash_max.value == pytest.approx(th.phash_max.value * 0.75)
    assert t.clip_delta_max.value == pytest.approx(th.clip_delta_max.value * 0.75)
    assert t.ssim_min.value == pytest.approx(th.ssim_min.value + 0.25 * (1 - th.ssim_min.value))
    assert t.batch_speedup_min == th.batch_speedup_min and t.regression == th.regression
    assert th.tightened(0.0) == th
    with pytest.raises(ValueError):
        th.tightened(1.0)
