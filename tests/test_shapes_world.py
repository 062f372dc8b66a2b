"""The procedural shapes world: deterministic, captions faithful to pixels, splits disjoint."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fragcli.shapes import world
from fragcli.shapes.world import COLORS, GRID_CENTERS, POSITIONS, Obj, Scene


def test_import_does_not_pull_torch():
    import subprocess
    import sys

    code = "import sys, fragcli.shapes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_same_seed_same_pixels_and_captions():
    a = world.sample_scenes(40, seed=123)
    b = world.sample_scenes(40, seed=123)
    assert a == b
    for s, t in zip(a, b, strict=True):
        assert np.array_equal(world.render_array(s), world.render_array(t))
        assert world.captions(s) == world.captions(t)
    c = world.sample_scenes(40, seed=124)
    assert a != c


def test_numpy_generator_and_int_seed_accepted():
    s1 = world.sample_scene(np.random.default_rng(5))
    s2 = world.sample_scene(np.random.default_rng(5))
    assert s1 == s2
    assert world.sample_scene(7) == world.sample_scene(7)


def test_render_shape_and_dtype():
    img = world.render(world.sample_scene(0))
    assert img.size == (64, 64) and img.mode == "RGB"


def _nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: sum((int(a) - int(b)) ** 2 for a, b in zip(COLORS[c], rgb, strict=True)))


def _object_mask(arr: np.ndarray, color: str) -> np.ndarray:
    ref = np.array(COLORS[color], dtype=float)
    return np.sqrt(((arr.astype(float) - ref) ** 2).sum(-1)) < 40


@pytest.mark.parametrize("seed", range(6))
def test_single_shape_caption_matches_pixels(seed):
    r = random.Random(seed)
    for _ in range(25):
        scene = world.sample_scene(r, n_objects=1)
        obj = scene.objects[0]
        arr = world.render_array(scene)
        # the background colour is the corner colour
        assert _nearest_color(arr[0, 0]) == scene.background
        # the named colour is the dominant non-background colour
        px = arr.reshape(-1, 3)
        names = [_nearest_color(p) for p in px[::3]]
        fg = [n for n in names if n != scene.background]
        assert max(set(fg), key=fg.count) == obj.color
        # the position word matches the centroid of the shape's pixels
        ys, xs = np.nonzero(_object_mask(arr, obj.color))
        cx, cy = xs.mean(), ys.mean()
        col = int(np.argmin([abs(cx - g) for g in GRID_CENTERS]))
        row = int(np.argmin([abs(cy - g) for g in GRID_CENTERS]))
        assert POSITIONS[obj.position] == (col, row), (scene, cx, cy)
        # large shapes cover clearly more pixels than small ones of the same kind
        area = len(xs)
        assert (area > 250) == (obj.size == "large"), (scene, area)
        # every wording names the scene's colour, shape and background (base word or synonym)
        for text in world.captions(scene):
            assert any(w in text for w in world.COLOR_SYNONYMS[obj.color])
            assert any(w in text for w in world.SHAPE_SYNONYMS[obj.shape])
            assert any(w in text for w in world.COLOR_SYNONYMS[scene.background])


def test_canonical_caption_is_first_and_exact():
    scene = Scene((Obj("circle", "red", "small", "top left"),), "blue", variant=1)
    caps = world.captions(scene)
    assert caps[0] == "a small red circle at the top left on a blue background"
    assert len(caps) == len(set(caps)) >= 4
    pair = Scene((Obj("triangle", "green", "small", "top left"), Obj("square", "yellow", "small", "bottom right")),
                 "blue", variant=2)
    assert world.canonical_caption(pair).startswith("a small green triangle at the top left and a small yellow square")
    assert "a green triangle and a yellow square" in world.partial_captions(pair)


def test_articles():
    scene = Scene((Obj("circle", "orange", "small", "center"),), "blue")
    assert world.canonical_caption(scene) == "a small orange circle in the center on a blue background"
    assert "an orange circle" in world.partial_captions(scene)
    assert "an orange circle" in world.class_texts()


def test_two_objects_do_not_overlap():
    r = random.Random(3)
    for _ in range(200):
        s = world.sample_scene(r, n_objects=2)
        a, b = s.objects
        assert a.position != b.position
        if "large" in (a.size, b.size):
            (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
            assert max(abs(ax - bx), abs(ay - by)) >= 2


def test_invalid_scenes_rejected():
    with pytest.raises(ValueError):
        Scene((Obj("circle", "red", "small", "center"),), "red")
    with pytest.raises(ValueError):
        Obj("hexagon", "red", "small", "center")


def test_splits_deterministic_and_disjoint():
    scenes = world.sample_scenes(3000, seed=9)
    train = {s.key for s in scenes if world.split_of(s) == "train"}
    held = {s.key for s in scenes if world.split_of(s) == "heldout"}
    assert train and held and not (train & held)
    share = sum(world.split_of(s) == "heldout" for s in scenes) / len(scenes)
    assert 0.05 < share < 0.16
    # the split depends on the scene key only (not on the variant, nor on object order)
    s = scenes[0]
    assert world.split_of(Scene(s.objects, s.background, variant=s.variant + 1)) == world.split_of(s)
    pair = next(x for x in scenes if not x.single)
    assert world.split_of(Scene(pair.objects[::-1], pair.background)) == world.split_of(pair)
    # sampling by split honours it
    r = random.Random(1)
    assert all(world.split_of(world.sample_scene(r, split="heldout")) == "heldout" for _ in range(50))
    assert all(world.split_of(world.sample_scene(r, split="train")) == "train" for _ in range(50))


def test_wording_split():
    scene = world.sample_scene(11, n_objects=1)
    ws = world.wordings(scene)
    assert ws[0][2] == "train"
    held = world.captions(scene, split="heldout")
    train = world.captions(scene, split="train")
    assert held and train and not set(held) & set(train)
    r = random.Random(0)
    for _ in range(300):  # training captions never use a held-out template
        text = world.random_training_caption(scene, r)
        assert not text.startswith("a picture of") and ";" not in text


def test_heldout_paraphrase_families():
    fams = world.heldout_paraphrase_families(12, seed=0)
    assert len(fams) == 12
    assert fams == world.heldout_paraphrase_families(12, seed=0)
    assert fams != world.heldout_paraphrase_families(12, seed=1)
    canon_to_scene = {}
    r = random.Random("families:0")  # rebuild the scenes the families were drawn from
    while len(canon_to_scene) < 12:
        s = world.sample_scene(r, n_objects=1, split="heldout")
        canon_to_scene.setdefault(world.canonical_caption(s), s)
    for fam in fams:
        assert len(fam) == 4 and len(set(fam)) == 4
        scene = canon_to_scene[fam[0]]
        assert world.split_of(scene) == "heldout"
        assert set(fam) <= set(world.captions(scene))


def test_zero_shot_classes():
    classes = world.zero_shot_classes()
    assert len(classes) == len(world.COLOR_NAMES) * len(world.SHAPES) >= 40
    assert len({t for _, _, t in classes}) == len(classes)
    for i, (c, s, _) in enumerate(classes):
        assert world.class_index(c, s) == i and world.class_of_index(i) == (c, s)
    scenes = world.heldout_single_scenes(80)
    assert all(world.split_of(s) == "heldout" for s in scenes)
    assert {s.class_index for s in scenes} == set(range(len(classes)))
