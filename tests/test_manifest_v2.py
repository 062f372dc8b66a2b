"""Manifest v2, and frag 0.1's v1 fragments: migrated in memory, loaded, and drawing the very same images.

tests/fixtures/v1_shapes_h80/ holds a fragment written by frag 0.1.0 (schema_version 1, before the technique
protocol) and the images ``frag generate`` made with it then (see its fixture.json).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fragcli.fragment import load_fragment
from fragcli.manifest import Manifest, read_manifest
from fragcli.models import load_model
from fragcli.profiling.run import versions
from fragcli.techniques import REGISTRY
from fragcli.techniques.base import Plan
from fragcli.techniques.head_prune import heads_per_module
from fragcli.techniques.stack import apply_stack, snapshot, state_diff, steps_from_entries
from tests.helpers import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "v1_shapes_h80"
INFO = json.loads((FIXTURE / "fixture.json").read_text())


@pytest.fixture
def v1(tmp_path):
    dst = tmp_path / "v1"
    shutil.copytree(FIXTURE / "fragment", dst)
    return dst


def test_v1_manifest_is_migrated_in_memory(v1):
    raw = json.loads((v1 / "manifest.json").read_text())
    assert raw["schema_version"] == 1
    m = read_manifest(v1)
    assert isinstance(m, Manifest) and m.schema_version == 2
    [entry] = m.techniques
    assert entry.name == "head_prune" and entry.config["attention_heads_removed"] == raw["pruning"]["heads_removed"]
    assert entry.summary.unit == "attention_heads" and entry.summary.units_total == raw["pruning"]["heads_total"]
    assert entry.summary.units_removed == raw["pruning"]["heads_total"] - raw["pruning"]["heads_kept"]
    assert m.weights.changed == sorted(load_file(v1 / "fragment.safetensors"))
    assert m.profiling.prompt == raw["generation"]["prompt"]
    assert "profile_dir" not in m.model_dump_json() and "/tmp" not in m.model_dump_json()  # absolute path dropped
    assert (v1 / "manifest.json").read_text() == json.dumps(raw, indent=2, sort_keys=True) + "\n"  # untouched


def _images(folder: Path) -> dict[int, np.ndarray]:
    return {s: np.asarray(Image.open(folder / f"seed-{s}.png").convert("RGB")).astype(int) for s in INFO["seeds"]}


def test_v1_fragment_draws_the_images_it_drew_before_the_change(v1, tmp_path):
    s = INFO["settings"]
    seeds = ",".join(map(str, INFO["seeds"]))
    r = run_cli("generate", s["prompt"], "--fragment", v1, "--strict", "--seeds", seeds, "--steps", s["steps"],
                "--out", tmp_path / "gen")
    assert r.exit_code == 0, r.output
    now, then = _images(tmp_path / "gen"), _images(FIXTURE / "images")
    same_stack = all(versions()[k] == INFO["versions"][k] for k in ("torch", "diffusers"))
    for seed in INFO["seeds"]:
        diff = np.abs(now[seed] - then[seed]).max()
        # bit-identical with the libraries the fixture was made with; other versions may round differently
        assert diff == 0 if same_stack else diff <= 2, (seed, diff)


def test_v2_fragment_from_the_same_decisions_equals_the_v1_fragment(v1):
    """The new code builds, from the v1 fragment's decisions, exactly the v1 delta and the same pruned model."""
    m = read_manifest(v1)
    head = REGISTRY.get("head_prune")
    built = load_model("shapes")
    before = snapshot(built.denoiser)
    apply_stack(built.denoiser, [s for s in steps_from_entries(m.techniques)])
    changed, added, removed = state_diff(before, built.denoiser)
    old = load_file(v1 / "fragment.safetensors")
    assert sorted(f"unet.{k}" for k in changed) == sorted(old) and not added and not removed
    state = built.denoiser.state_dict()
    assert all(torch.equal(state[k[len("unet."):]], v) for k, v in old.items())
    loaded = load_model("shapes")
    load_fragment(loaded, v1)
    assert heads_per_module(loaded.denoiser) == heads_per_module(built.denoiser)
    assert Plan(head.Config(**m.techniques[0].config)).config == steps_from_entries(m.techniques)[0].config


def test_updating_a_v1_manifest_writes_v2(v1):
    from fragcli.manifest import update_manifest

    update_manifest(v1, quality={"clip_delta_mean": -0.01, "samples": 2, "seeds": [0, 1]})
    raw = json.loads((v1 / "manifest.json").read_text())
    assert raw["schema_version"] == 2 and raw["quality"]["clip_delta_mean"] == -0.01
    assert read_manifest(v1).techniques[0].name == "head_prune"
    load_fragment(load_model("shapes"), v1)  # still loads: artifacts untouched
