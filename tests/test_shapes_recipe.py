"""Pieces of the shapes training recipe (tools/train_shapes.py, tools/diagnose_shapes.py) that decide what the
model can learn: the text tower's attribute targets and the token-separation instrument."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import diagnose_shapes  # noqa: E402
import train_shapes  # noqa: E402

from fragcli.models.tokenizer import build_clip_tokenizer  # noqa: E402
from fragcli.shapes import world  # noqa: E402


def test_attribute_target_names_every_attribute_of_the_scene_once():
    scene = world.Scene(objects=(world.Obj("star", "red", "small", "top left"),
                                 world.Obj("circle", "blue", "large", "bottom")), background="white")
    target = train_shapes.attribute_target(scene)
    on = {a for a, v in zip(train_shapes.ATTRIBUTE_VALUES, target.tolist(), strict=True) if v == 1.0}
    assert on == {("shape", "star"), ("shape", "circle"), ("color", "red"), ("color", "blue"), ("size", "small"),
                  ("size", "large"), ("position", "top left"), ("position", "bottom"), ("background", "white")}
    assert len(train_shapes.ATTRIBUTE_VALUES) == len(set(train_shapes.ATTRIBUTE_VALUES))


class _Constant(torch.nn.Module):
    """A text encoder that ignores its input: the UNet could learn nothing from it."""

    def forward(self, ids):
        return (torch.ones(ids.shape[0], ids.shape[1], 8),)


def test_text_separation_is_one_for_an_encoder_that_ignores_the_words(tmp_path):
    tok = build_clip_tokenizer(tmp_path / "tok")
    scenes = world.heldout_single_scenes(10, seed=1)
    flat = diagnose_shapes.text_separation(_Constant(), tok, scenes)
    assert set(flat) == {f"text_token_cos_{a}_swapped" for a in ("shape", "color", "size", "position")}
    assert all(abs(v - 1.0) < 1e-6 for v in flat.values()), flat

    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    real = diagnose_shapes.text_separation(CLIPTextModel(CLIPTextConfig(**train_shapes.TEXT_CFG)).eval(), tok, scenes)
    assert all(v < 0.999 for v in real.values()), real  # token embeddings differ per word, so the states do


def test_layout_accuracy_reads_position_and_size_from_the_image():
    import dataclasses

    import eval_shapes

    scenes = world.heldout_single_scenes(40, seed=2)
    renders = [world.render(s) for s in scenes]
    assert eval_shapes.layout_accuracy(renders, scenes, "r") == {"r_position_accuracy": 1.0, "r_size_accuracy": 1.0}
    mirrored = eval_shapes.layout_accuracy([im.transpose(0) for im in renders], scenes, "m")  # left <-> right
    assert mirrored["m_position_accuracy"] < 0.6 and mirrored["m_size_accuracy"] == 1.0
    other = {"small": "large", "large": "small"}
    resized = [world.render(dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], size=other[s.objects[0].size]),)))
               for s in scenes]
    swapped = eval_shapes.layout_accuracy(resized, scenes, "s")
    assert swapped["s_size_accuracy"] == 0.0 and swapped["s_position_accuracy"] == 1.0
