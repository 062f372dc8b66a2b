"""The shipped shapes pipeline and judge load offline and behave like a trained model (cheap checks)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from fragcli.judge import judge_dir, load_judge  # noqa: E402
from fragcli.shapes import world  # noqa: E402

PIPE = judge_dir().parent / "shapes"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # CPU generation on a shared 2-core machine is steadiest (and often fastest) on one thread
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(PIPE), torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def _gen(pipe, prompt, seed=0, steps=8):
    guidance = json.loads((PIPE / "frag.json").read_text())["default_guidance"]
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_shipped_files_are_safetensors_only():
    for folder in (PIPE, judge_dir()):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    total = sum(p.stat().st_size for f in (PIPE, judge_dir()) for p in f.rglob("*") if p.is_file())
    assert total < 40e6


def test_frag_json():
    meta = json.loads((PIPE / "frag.json").read_text())
    assert meta["name"] == "shapes" and meta["judge"] == "shapes_judge"
    assert (meta["width"], meta["height"]) == (64, 64)
    assert meta["default_steps"] > 0 and meta["default_guidance"] >= 1.0


def test_pipeline_loads_offline_and_generates(pipe):
    assert pipe.unet.dtype == torch.float32
    assert pipe.tokenizer.vocab_size == 49408
    assert pipe.text_encoder.config.eos_token_id == 49407
    heads = {m.heads for m in pipe.unet.modules() if type(m).__name__ == "Attention"}
    assert heads and min(heads) >= 4
    img = _gen(pipe, "a red circle", steps=4)
    assert img.size == (64, 64)
    arr = torch.tensor(list(img.getdata()), dtype=torch.float32)
    assert arr.std() > 5  # not a flat or black image


def test_judge_loads_offline_through_open_clip(judge):
    import open_clip

    assert judge.weights_path.suffix == ".safetensors"
    assert isinstance(judge.model, open_clip.CLIP)
    t = judge.encode_texts(["a red circle", "a blue square"])
    assert t.shape[0] == 2 and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-4)
    scene = world.Scene((world.Obj("circle", "red", "large", "center"),), "blue")
    s = judge.score([world.render(scene)] * 2, ["a red circle", "a blue square"])
    assert s.shape == (2,) and s[0] > s[1]


def test_judge_zero_shot_on_heldout_renders(judge):
    scenes = world.heldout_single_scenes(40, seed=5)
    pred = judge.classify([world.render(s) for s in scenes], world.class_texts()).tolist()
    acc = sum(p == s.class_index for p, s in zip(pred, scenes, strict=True)) / len(scenes)
    assert acc >= 0.7, acc


def test_generated_red_circle_matches_its_caption(pipe, judge):
    """Over three seeds, the judge prefers the prompt's own caption to "a blue square" (majority and on average).
    The prompt names its background, as every v2 training caption does ("a red circle" alone may come out red on
    orange)."""
    margins = []
    own, other = "a red circle on a white background", "a blue square on a white background"
    for seed in range(3):
        img = _gen(pipe, own, seed=seed, steps=10)
        s = judge.score([img, img], [own, other])
        margins.append(float(s[0] - s[1]))
    assert sum(m > 0 for m in margins) >= 2 and sum(margins) > 0, margins


def test_generated_images_show_the_asked_shape_and_colour(pipe, judge):
    """shapes v2 draws what it is asked: on 10 held-out prompts (two per shape) the judge recognises the asked shape
    and colour in most images (chance: 0.2 for the shape, 0.125 for the colour; the v1 model scored 0.2 on shape, so
    this test fails on it)."""
    scenes = world.heldout_single_scenes(10, seed=11)
    assert {s.objects[0].shape for s in scenes} == set(world.SHAPES)
    guidance = json.loads((PIPE / "frag.json").read_text())["default_guidance"]
    gens = [torch.Generator().manual_seed(500 + i) for i in range(len(scenes))]
    images = pipe([world.canonical_caption(s) for s in scenes], num_inference_steps=20, guidance_scale=guidance,
                  height=64, width=64, generator=gens).images
    pred = [world.class_of_index(i) for i in judge.classify(images, world.class_texts()).tolist()]
    shape_ok = sum(p[1] == s.objects[0].shape for p, s in zip(pred, scenes, strict=True))
    color_ok = sum(p[0] == s.objects[0].color for p, s in zip(pred, scenes, strict=True))
    assert shape_ok >= 6 and color_ok >= 8, (shape_ok, color_ok, pred)
