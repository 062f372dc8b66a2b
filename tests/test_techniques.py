"""The technique protocol: a new technique is one file plus one registration, and the stack handles it.

The toy techniques live in tests/toy_technique.py (one file); nothing else in frag changes for them.
"""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from fragcli import api
from fragcli.errors import FragError
from fragcli.fragment import load_fragment, verify_fragment
from fragcli.manifest import read_manifest
from fragcli.models import load_model
from fragcli.patches import installed
from fragcli.techniques import REGISTRY
from fragcli.techniques.stack import mask_stack, meta_copy, snapshot, state_diff, steps_from_entries
from tests.helpers import run_cli, unet_inputs
from tests.toy_technique import CountCalls, Int8Scale, ZeroChannel, registered

PROMPT = "a red circle on a blue background"
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff"


@pytest.fixture(scope="module")
def toys():
    with registered(ZeroChannel(), CountCalls(), Int8Scale()) as techniques:
        yield techniques


@pytest.fixture(scope="module")
def profile(toys, tmp_path_factory):
    """A tiny profile taken with the toys registered (so the toy's collector adds its table)."""
    prof = tmp_path_factory.mktemp("toy") / "profile"
    r = run_cli("profile", PROMPT, "-m", "tiny", "--seeds", "0,1", "--steps", "2", "--out", prof)
    assert r.exit_code == 0, r.output
    return prof


def test_a_technique_collector_adds_a_declared_profile_table(profile, toys, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(profile / "toy_ffn.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("module", "string"), ("channel", "int32"), ("seed", "int64"), ("step", "int32"), ("energy", "double")]
    ffs = {r["module"] for r in table.select(["module"]).to_pylist()}
    assert FF in ffs and set(table.column("seed").to_pylist()) == {0, 1}
    ctx = json.loads((profile / "context.json").read_text())
    assert ctx["rows"]["toy_ffn"] == table.num_rows > 0
    # the plan reads it: "auto" picks the least-used channel of this prompt
    api.extract(profile, {"head_retention": 1.0, "zero_channel": f"{FF}:auto"}, out=tmp_path / "f",
                show_progress=False)
    rows = [r for r in table.to_pylist() if r["module"] == FF]
    energy = {}
    for r in rows:
        energy[r["channel"]] = energy.get(r["channel"], 0.0) + r["energy"]
    assert read_manifest(tmp_path / "f").techniques[1].config["channel"] == min(energy, key=energy.get)


def test_an_int8_tensor_stays_int8_through_save_and_load(toys, profile, tmp_path):
    out = tmp_path / "frag"
    lin = f"{FF}.net.2"
    api.extract(profile, {"head_retention": 1.0, "toy_int8": lin}, out=out, show_progress=False)
    m = read_manifest(out)
    assert m.weights.added == [f"unet.{lin}.qweight"] and m.weights.changed == []
    stored = load_file(out / "fragment.safetensors")[f"unet.{lin}.qweight"]
    assert stored.dtype == torch.int8
    loaded = load_model("tiny")
    load_fragment(loaded, out)
    q = loaded.denoiser.get_submodule(lin).qweight
    assert q.dtype == torch.int8 and torch.equal(q, stored)
    other = tmp_path / "edited"  # the same fragment claiming a float32 tensor where the rebuilt model has int8
    import shutil

    from safetensors.torch import save_file

    from fragcli.manifest import Artifact, write_manifest
    from fragcli.models.hashing import sha256_file

    shutil.copytree(out, other)
    save_file({f"unet.{lin}.qweight": stored.float()}, str(other / "fragment.safetensors"))
    f = other / "fragment.safetensors"
    write_manifest(other, m.model_copy(update={"artifacts": {
        **m.artifacts, "fragment.safetensors": Artifact(sha256=sha256_file(f), bytes=f.stat().st_size)}}))
    with pytest.raises(FragError, match="expects torch.int8"):
        load_fragment(load_model("tiny"), other)


def test_a_toy_technique_stacks_saves_verifies_and_loads(toys, profile, tmp_path):
    out = tmp_path / "frag"
    result = api.extract(profile, {"head_retention": 0.7, "zero_channel": f"{FF}:3"}, out=out, show_progress=False)
    m = read_manifest(out)
    assert [t.name for t in m.techniques] == ["head_prune", "toy_zero_channel"]
    toy = m.techniques[1]
    assert toy.config == {"module": FF, "channel": 3} and toy.summary.unit == "ffn_channels"
    assert toy.summary.units_removed == 1 and toy.summary.params_removed == 0  # values only
    delta = load_file(out / "fragment.safetensors")
    assert f"unet.{FF}.net.2.weight" in delta and torch.all(delta[f"unet.{FF}.net.2.weight"][:, 3] == 0)
    assert sorted(delta) == sorted(m.weights.changed)
    assert result.summary()["techniques"][1]["name"] == "toy_zero_channel"
    verify_fragment(out, load_model("tiny").hash)

    loaded, masked = load_model("tiny"), load_model("tiny")
    load_fragment(loaded, out)
    patches = mask_stack(masked.denoiser, steps_from_entries(m.techniques))
    assert len(patches) == 2
    with torch.no_grad():
        x = unet_inputs(loaded.denoiser)
        diff = (loaded.denoiser(*x).sample - masked.denoiser(*x).sample).abs().max().item()
    assert diff <= 1e-5  # physical stack == masked stack

    # the report reads the toy's summary like any other technique's (no report code knows it)
    rep = api.report(tmp_path, compare="none", out=tmp_path / "report")
    listed = {t["name"]: t for t in rep.summary["fragment"]["techniques"]}
    assert listed["toy_zero_channel"]["unit"] == "ffn_channels" and listed["toy_zero_channel"]["units_removed"] == 1
    assert listed["head_prune"]["removed_fraction"] == m.techniques[0].summary.removed_fraction


def test_a_runtime_only_technique_has_no_weight_delta(toys, profile, tmp_path):
    out = tmp_path / "frag"
    api.extract(profile, {"head_retention": 1.0, "count_calls": True}, out=out, show_progress=False)
    m = read_manifest(out)
    assert m.weights is None and not (out / "fragment.safetensors").exists()
    assert [t.name for t in m.techniques] == ["head_prune", "toy_count_calls"]
    loaded = load_model("tiny")
    ref = {k: v.clone() for k, v in loaded.denoiser.state_dict().items()}
    load_fragment(loaded, out)
    patch = installed(loaded.denoiser)["toy.count_calls"]
    with torch.no_grad():
        loaded.denoiser(*unet_inputs(loaded.denoiser))
    assert patch.state["calls"] == 1
    assert all(torch.equal(ref[k], v) for k, v in loaded.denoiser.state_dict().items())


def test_a_refused_technique_leaves_the_model_untouched(toys, profile, tmp_path):
    """Plan, then apply: the last technique of the stack refuses, so the first is not applied either."""
    with pytest.raises(FragError, match="out of range"):
        api.extract(profile, {"head_retention": 0.5, "zero_channel": f"{FF}:99999"}, out=tmp_path / "f",
                    show_progress=False)
    assert not (tmp_path / "f").exists()
    from fragcli.fragment import plan_steps
    from fragcli.techniques.base import Plan
    from fragcli.techniques.stack import apply_stack
    from tests.toy_technique import ZeroChannelConfig

    model = load_model("tiny")
    head = REGISTRY.get("head_prune").Config(attention_heads_removed={f"{FF[:-3]}.attn1": [0, 1]})
    before = snapshot(model.denoiser)
    with pytest.raises(FragError, match="out of range"):
        apply_stack(model.denoiser, plan_steps([Plan(head), Plan(ZeroChannelConfig(module=FF, channel=10**6))]))
    assert state_diff(before, model.denoiser) == ([], [], [])


def test_unknown_technique_in_a_manifest_is_refused_without_the_toy(toys, profile, tmp_path):
    out = tmp_path / "frag"
    api.extract(profile, {"head_retention": 0.9, "zero_channel": f"{FF}:1"}, out=out, show_progress=False)
    REGISTRY.unregister("toy_zero_channel")  # a frag that does not know the technique
    with pytest.raises(FragError, match="unknown technique 'toy_zero_channel'"):
        load_fragment(load_model("tiny"), out)
    REGISTRY.register(ZeroChannel())


def test_config_json_round_trip_and_strictness():
    head = REGISTRY.get("head_prune")
    cfg = head.Config(attention_heads_removed={"a": [1, 2]}, method="energy", head_retention_ratio=0.7)
    assert head.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValidationError, match="extra"):
        head.Config.from_dict({**cfg.to_dict(), "surprise": 1})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.method = "entropy"


def test_state_diff_finds_changed_added_and_removed_keys():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = snapshot(m)
    with torch.no_grad():
        m[0].weight[0, 0] = 1.0  # in place: version counter
    m[1].weight = torch.nn.Parameter(torch.zeros(2, 3))  # replaced: storage and shape
    m[1].register_buffer("scale", torch.ones(2))  # added
    m[0].bias = None  # removed
    changed, added, removed = state_diff(before, m)
    assert changed == ["0.weight", "1.weight"] and added == ["1.scale"] and removed == ["0.bias"]


def test_meta_copy_shares_no_weights_and_keeps_structure():
    model = load_model("tiny")
    meta = meta_copy(model.denoiser)
    assert all(p.is_meta for p in meta.parameters())
    assert {k: v.shape for k, v in meta.state_dict().items()} == \
        {k: v.shape for k, v in model.denoiser.state_dict().items()}
    assert not any(p.is_meta for p in model.denoiser.parameters())
