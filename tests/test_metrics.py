"""Metric mechanics on synthetic images. Random-weight CLIP/AlexNet models appear here ONLY to exercise the
loading and scoring code paths; frag itself never reports a number from random weights."""

import json

import numpy as np
import pytest
from PIL import Image

from fragcli.errors import FragError
from fragcli.metrics import (
    ClipScorer,
    LpipsMetric,
    Unavailable,
    aggregate,
    compare_images,
    load_metrics,
    phash_distance,
    side_by_side_grid,
    ssim,
)


def pattern(seed, size=64):
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((size // 8, size // 8, 1)))
    return Image.fromarray(base.astype(np.uint8))


def noisy(image, amount, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.asarray(image, dtype=np.float32) + rng.normal(0, amount, (image.height, image.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_ssim_and_phash_identical_and_different():
    a = pattern(0)
    assert ssim(a, a.copy()) == pytest.approx(1.0)
    assert phash_distance(a, a.copy()) == 0
    slightly, very = noisy(a, 10), pattern(1)
    assert ssim(a, very) < ssim(a, slightly) < 1.0
    assert phash_distance(a, very) > phash_distance(a, slightly)


def test_size_mismatch_is_an_error():
    with pytest.raises(FragError, match="sizes differ"):
        ssim(pattern(0, 64), pattern(0, 32))


def test_clip_and_lpips_unavailable_reasons(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    with pytest.raises(Unavailable) as info:
        ClipScorer.from_open_clip("ViT-B-32", None)
    assert info.value.reason == "no CLIP weights: pass --clip-weights PATH"
    with pytest.raises(Unavailable) as info:
        LpipsMetric.load()
    assert "--lpips-weights" in info.value.reason and "alexnet-owt-7be5be79.pth" in info.value.reason
    ms = load_metrics()
    assert ms.clip is None and ms.lpips is None and set(ms.unavailable) == {"clip", "lpips"}
    a = pattern(0)
    cmp = compare_images([a], [noisy(a, 5)], "a prompt", ms.clip, ms.lpips, ms.unavailable)
    row = cmp.per_image[0]
    assert row["clip_full"] is None and row["clip_delta_rel"] is None and row["lpips"] is None
    assert row["ssim"] < 1 and row["phash_distance"] >= 0
    assert cmp.unavailable["clip"].startswith("no CLIP weights")


def test_bad_weight_paths_are_errors(tmp_path):
    with pytest.raises(FragError, match="not found"):
        ClipScorer.from_open_clip("ViT-B-32", tmp_path / "missing.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(FragError, match="not a weights file"):
        LpipsMetric.load(tmp_path / "w.txt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FragError, match="cannot load weights"):
        LpipsMetric.load(tmp_path / "junk.pt")


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random-weight open_clip model saved as .safetensors and .pt (mechanics only)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    cfg = folder / "frag-test-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    other = folder / "frag-test-tiny-clip-b.json"
    other.write_text(json.dumps({**TINY_CLIP, "embed_dim": 8}))
    open_clip.add_model_config(other)
    torch.manual_seed(0)
    model = open_clip.create_model("frag-test-tiny-clip", pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "tiny.safetensors")
    torch.save(state, folder / "tiny.pt")
    return cfg, folder


def test_clip_scorer_mechanics(tiny_clip):
    cfg, folder = tiny_clip
    a, b = pattern(0), pattern(1)
    s1 = ClipScorer.from_open_clip(str(cfg), folder / "tiny.safetensors")
    s2 = ClipScorer.from_open_clip("frag-test-tiny-clip", folder / "tiny.pt")
    one = s1.score([a, b], ["a square"])
    assert one == pytest.approx(s2.score([a, b], ["a square", "a square"]), abs=1e-5)
    assert all(-1.0 <= x <= 1.0 for x in one)
    wrapped = ClipScorer.from_judge(s1)  # duck-typed: anything with model/preprocess/tokenizer
    assert wrapped.score([a], "a square")[0] == pytest.approx(one[0], abs=1e-5)
    cmp = compare_images([a, b], [a, b], "a square", s1, None)
    assert all(r["clip_delta_rel"] == pytest.approx(0.0, abs=1e-6) for r in cmp.per_image)
    assert set(cmp.unavailable) == {"lpips"}
    with pytest.raises(FragError, match="unknown open_clip model"):
        ClipScorer.from_open_clip("no-such-model", folder / "tiny.pt")
    with pytest.raises(FragError, match="do not fit"):
        ClipScorer.from_open_clip("frag-test-tiny-clip-b", folder / "tiny.safetensors")


def test_lpips_mechanics_with_local_backbone(tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    metric = LpipsMetric.load(path)
    a = pattern(0)
    same, far = metric.distances([a, a], [a.copy(), pattern(1)])
    assert same == pytest.approx(0.0, abs=1e-6) and far > same
    assert metric.distance(a.resize((16, 16)), a.resize((16, 16))) == pytest.approx(0.0, abs=1e-6)


def test_aggregate_and_grid(tmp_path):
    rows = [{"clip_full": 0.30, "clip_fragment": 0.29, "lpips": None, "ssim": 0.9, "phash_distance": 2, "passed": True},
            {"clip_full": 0.30, "clip_fragment": 0.30, "lpips": None, "ssim": 0.7, "phash_distance": 4, "passed": False}]
    agg = aggregate(rows)
    assert agg["clip_delta_rel"] == pytest.approx((0.295 - 0.30) / 0.30)
    assert agg["lpips_mean"] is None and agg["ssim_mean"] == pytest.approx(0.8) and agg["pass_rate"] == 0.5
    out = side_by_side_grid([pattern(0), pattern(1)], [pattern(0), noisy(pattern(1), 20)], tmp_path / "grid.png",
                            labels=["seed 0", "seed 1"])
    grid = Image.open(out)
    assert grid.width >= 3 * 64 and grid.height >= 2 * 64
    diff_cell = np.asarray(grid.convert("RGB"))[14:14 + 64, 60 + 128:60 + 192]
    assert diff_cell.max() == 0  # identical first row -> black difference
