"""FFN channel pruning: physical slicing equals the masked original (GEGLU halves, GELU DiT MLPs, the tiny UNet, a
full pipeline image), the profile table and the plan, the fragment round trip, and the refusals."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward

from fragcli import api
from fragcli.errors import FragError
from fragcli.fragment import load_fragment
from fragcli.manifest import read_manifest
from fragcli.models import load_model
from fragcli.patches import installed
from fragcli.profiling.data import ProfileData
from fragcli.techniques import REGISTRY, apply_technique
from fragcli.techniques.ffn_prune import (
    ENERGY_PATCH,
    MASK_PATCH,
    FfnPruneConfig,
    ffn_blocks,
    install_channel_mask,
    install_ffn_energy,
    remove_channel_mask,
    remove_ffn_energy,
    score_channels,
    select_channels,
)
from fragcli.techniques.stack import meta_copy, snapshot, state_diff
from tests.helpers import unet_inputs

TOL = 1e-5
PROMPT = "a red circle on a blue background"
TECH = REGISTRY.get("ffn_prune")


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _root(module):
    return torch.nn.ModuleDict({"ff": module})


def _ff(act, dim=8, inner=12):
    torch.manual_seed(0)
    return FeedForward(dim, activation_fn=act, inner_dim=inner).eval()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.mark.parametrize("act", ["geglu", "gelu", "gelu-approximate", "geglu-approximate", "swiglu", "linear-silu"])
def test_a_block_pruned_equals_masked_for_every_activation(act):
    ff = _ff(act)
    remove = [0, 5, 11]
    masked, pruned = _root(copy.deepcopy(ff)), _root(copy.deepcopy(ff))
    install_channel_mask(masked, {"ff": remove})
    cfg = FfnPruneConfig(ffn_channels_removed={"ff": remove})
    expected = TECH.summary(cfg, pruned)
    p0 = _params(pruned)
    apply_technique(pruned, cfg)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        ref, out, full = masked["ff"](x), pruned["ff"](x), ff(x)
    assert (out - ref).abs().max().item() <= TOL
    assert (full - ref).abs().max().item() > 1e-4  # the channels mattered: the test can fail
    gates = 2 if act in ("geglu", "swiglu") else 1
    assert pruned["ff"].net[0].proj.out_features == gates * 9 and pruned["ff"].net[2].in_features == 9
    assert p0 - _params(pruned) == expected.params_removed == 3 * (gates * (8 + 1) + 8)
    assert expected.units_total == 12 and expected.units_removed == 3


def test_geglu_removing_channel_k_equals_zeroing_hidden_channel_k():
    ff = _ff("geglu")
    k, inner = 4, 12
    pruned = _root(copy.deepcopy(ff))
    apply_technique(pruned, FfnPruneConfig(ffn_channels_removed={"ff": [k]}))
    torch.manual_seed(2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        hidden, gate = ff.net[0].proj(x).chunk(2, dim=-1)
        z = hidden * F.gelu(gate)
        z[:, k] = 0
        manual = ff.net[2](z)
        keep = [c for c in range(inner) if c != k]
        w = ff.net[0].proj.weight  # both halves sliced with the same channels, in order
        assert torch.equal(pruned["ff"].net[0].proj.weight, torch.cat([w[keep], w[[inner + c for c in keep]]]))
        assert torch.equal(pruned["ff"].net[2].weight, ff.net[2].weight[:, keep])
        assert (pruned["ff"](x) - manual).abs().max().item() <= TOL
        # dropping row k only (the gate half then shifted by one channel) would not give this: the test can fail
        wrong = _ff("geglu", inner=inner - 1)
        rows = [r for r in range(2 * inner) if r != k][: 2 * (inner - 1)]
        wrong.net[0].proj.weight.copy_(w[rows])
        wrong.net[0].proj.bias.copy_(ff.net[0].proj.bias[rows])
        wrong.net[2].weight.copy_(ff.net[2].weight[:, keep])
        wrong.net[2].bias.copy_(ff.net[2].bias)
        assert (wrong(x) - manual).abs().max().item() > 1e-4


def test_a_pixart_dit_mlp_pruned_equals_masked_and_rebuilds_on_meta():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    dit = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                   in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=16,
                                   norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                   use_additional_conditions=False).eval()
    blocks, skipped = ffn_blocks(dit)
    assert set(blocks) == {"transformer_blocks.0.ff", "transformer_blocks.1.ff"} and not skipped
    assert all(f.gates == 1 and f.module.net[0].approximate == "tanh" for f in blocks.values())
    removed = {n: list(range(0, 64, 2)) for n in blocks}
    cfg = FfnPruneConfig(ffn_channels_removed=removed)
    masked, pruned = copy.deepcopy(dit), copy.deepcopy(dit)
    install_channel_mask(masked, removed)
    apply_technique(pruned, cfg)
    torch.manual_seed(1)
    kw = dict(encoder_hidden_states=torch.randn(2, 5, 16), timestep=torch.tensor([10, 10]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref, out, full = masked(x, **kw).sample, pruned(x, **kw).sample, dit(x, **kw).sample
    assert (out - ref).abs().max().item() <= TOL and (full - ref).abs().max().item() > 1e-4
    meta = meta_copy(dit)
    TECH.check(meta, cfg)
    TECH.rebuild(meta, cfg)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def _tiny_removed(den):
    return {n: sorted({0, *range(3, f.inner, 3)}) for n, f in ffn_blocks(den)[0].items()}


def test_tiny_unet_pruned_equals_masked_and_the_mask_is_reversible(tiny):
    unet = copy.deepcopy(tiny.denoiser)
    removed = _tiny_removed(unet)
    assert len(removed) == 7
    x = unet_inputs(unet)
    lin = unet.get_submodule(next(iter(removed)) + ".net.2")
    with torch.no_grad():
        base = unet(*x).sample
        patch = install_channel_mask(unet, removed)
        hooks = len(lin._forward_pre_hooks)
        assert install_channel_mask(unet, removed) is patch and len(lin._forward_pre_hooks) == hooks  # idempotent
        masked = unet(*x).sample
        assert remove_channel_mask(unet) and not remove_channel_mask(unet)
        assert torch.equal(unet(*x).sample, base) and MASK_PATCH not in installed(unet)  # restored exactly
        assert len(lin._forward_pre_hooks) == hooks - 1
        cfg = FfnPruneConfig(ffn_channels_removed=removed)
        summary = TECH.summary(cfg, unet)
        p0 = _params(unet)
        apply_technique(unet, cfg)
        pruned = unet(*x).sample
    assert (pruned - masked).abs().max().item() <= TOL and (base - masked).abs().max().item() > 1e-4
    assert summary.params_removed == p0 - _params(unet) > 0 and summary.bytes_saved == 4 * summary.params_removed
    assert summary.unit == "ffn_channels" and summary.units_removed == sum(len(r) for r in removed.values())


def test_a_pipeline_image_pruned_equals_masked():
    masked, pruned = load_model("tiny"), load_model("tiny")
    removed = _tiny_removed(masked.denoiser)
    install_channel_mask(masked.denoiser, removed)
    apply_technique(pruned.denoiser, FfnPruneConfig(ffn_channels_removed=removed))

    def image(model):
        with torch.inference_mode():
            return model.pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.5, width=64, height=64,
                              generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]

    a, b = image(masked), image(pruned)
    remove_channel_mask(masked.denoiser)
    assert np.abs(a - b).max() <= TOL and np.abs(image(masked) - a).max() > 1e-4


def test_check_refuses_and_changes_nothing(tiny):
    unet = copy.deepcopy(tiny.denoiser)
    name, f = next(iter(ffn_blocks(unet)[0].items()))
    before = snapshot(unet)
    cases = [({"down_blocks.0.nope.ff": [1]}, "not a feed-forward block"),
             ({name: list(range(f.inner))}, "every channel"),
             ({name: [f.inner]}, "cannot remove channel"),
             ({name: [1, 1]}, "repeats")]
    for removed, needle in cases:
        cfg = FfnPruneConfig(ffn_channels_removed=removed)
        with pytest.raises(FragError, match=needle):
            apply_technique(unet, cfg)
        with pytest.raises(FragError, match=needle):
            TECH.mask(unet, cfg)
    assert state_diff(before, unet) == ([], [], []) and not installed(unet)


def test_an_ffn_frag_cannot_slice_is_skipped_and_refused():
    class Odd(torch.nn.Module):  # not one of diffusers' elementwise / gated activations
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 12)

        def forward(self, x):
            return self.proj(x).cumsum(-1)

    ff = _ff("gelu")
    ff.net[0] = Odd()
    root = _root(ff)
    blocks, skipped = ffn_blocks(root)
    assert not blocks and "Odd" in skipped["ff"]
    assert TECH.summary(FfnPruneConfig(), root).details["skipped_blocks"] == skipped
    with pytest.raises(FragError, match="cannot be sliced"):
        TECH.check(root, FfnPruneConfig(ffn_channels_removed={"ff": [1]}))


def test_select_keeps_one_channel_per_block_and_protects_unstable_channels():
    per_seed = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 2.0, 3.0, 1.0]])  # channels 0 and 3 swap ranks across seeds
    scores = {"a": {"channels": 4, "per_seed": per_seed, "score": per_seed.mean(0)},
              "b": {"channels": 2, "per_seed": np.array([[0.0, 1.0], [0.0, 1.0]]), "score": np.array([0.0, 1.0])}}
    sel = select_channels(scores, 0.01, True, 0.25)
    assert sel["removed"] == {"a": [1, 2], "b": [0]}  # 0 and 3 protected; b keeps one
    assert sel["record"]["modules"]["a"]["protected"] == 2 and sel["record"]["channels_removed"] == 3
    glob = select_channels(scores, 0.5, False, 1.0)["removed"]
    assert sum(map(len, glob.values())) == 3 and len(glob["b"]) == 1
    data = {"m": {"energy": np.array([[1.0, 1.0], [1.0, 1.0]]), "out_norm": np.array([1.0, 3.0]), "seeds": [0, 1]}}
    assert score_channels(data, "output")["m"]["score"].tolist() == [0.5, 1.5]
    assert score_channels(data, "energy")["m"]["score"].tolist() == [1.0, 1.0]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("ffn") / "profile"
    api.profile(PROMPT, model="tiny", seeds=[0, 1], steps=2, out=out, show_progress=False)
    return out


def test_the_profile_writes_the_ffn_table(profile, tiny):
    import pyarrow.parquet as pq

    t = pq.read_table(profile / "ffn.parquet")
    assert [(f.name, str(f.type)) for f in t.schema] == [
        ("module", "string"), ("channel", "int32"), ("seed", "int64"), ("steps", "int32"), ("energy", "double"),
        ("out_norm", "double")]
    blocks = ffn_blocks(tiny.denoiser)[0]
    assert t.num_rows == 2 * sum(f.inner for f in blocks.values())  # one row per (module, channel, seed)
    assert set(t.column("steps").to_pylist()) == {2} and set(t.column("module").to_pylist()) == set(blocks)
    e = np.array(t.column("energy").to_pylist())
    assert np.isfinite(e).all() and (e > 0).all() and len(set(e.tolist())) > t.num_rows // 2
    name = next(iter(blocks))
    rows = [r for r in t.to_pylist() if r["module"] == name and r["seed"] == 0]
    w = blocks[name].out.weight.detach().norm(dim=0)
    assert np.allclose([r["out_norm"] for r in rows], w.tolist(), rtol=1e-6)
    assert ENERGY_PATCH not in installed(tiny.denoiser)


def test_the_collector_records_only_profiled_steps_and_rms(tiny):
    from fragcli.profiling.recorder import Recorder

    ff = _ff("gelu")
    root = _root(ff)
    rec = Recorder(profiled_steps={1})
    for c in TECH.collectors():
        rec.declare(c.table, c.columns)
    install_ffn_energy(root, rec)
    assert install_ffn_energy(root, rec) is installed(root)[ENERGY_PATCH]
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 8) for _ in range(3)]
    with torch.no_grad():
        for step, x in enumerate(xs):
            rec.step = step
            ff(x)
        act = ff.net[0](xs[1])
    assert remove_ffn_energy(root) and not remove_ffn_energy(root)
    got = np.array(rec.tables["ffn"]["energy"])
    assert got.shape == (12,) and np.allclose(got, act.square().mean((0, 1)).sqrt().numpy(), rtol=1e-5)
    assert set(rec.tables["ffn"]["steps"]) == {1}


@pytest.mark.parametrize("bad", [0, 1.5, float("nan"), -0.2, "half", True])
def test_a_bad_retention_is_refused(profile, bad):
    with pytest.raises(FragError, match="ffn-retention"):
        TECH.plan(ProfileData(profile), {"ffn_retention": bad})


def test_a_profile_without_the_ffn_table_is_refused_with_a_fix(profile, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(profile, old)
    (old / "ffn.parquet").unlink()
    with pytest.raises(FragError, match="no ffn.parquet") as e:
        TECH.plan(ProfileData(old), {"ffn_retention": 0.5})
    assert "re-run frag profile" in e.value.fix


def test_plan_off_and_ranked_by_output_energy(profile):
    """Per-module ranking (the option; the default ranks all blocks together, which measured better on shapes)."""
    prof = ProfileData(profile)
    assert TECH.plan(prof, {"head_retention": 0.7}) is None
    plan = TECH.plan(prof, {"ffn_retention": 0.5, "ffn_per_module": True})
    cfg = plan.config
    assert cfg.ffn_retention_ratio == 0.5 and cfg.method == "output" and plan.file == "ffn_selection.json"
    rec = plan.record
    assert rec["channels_removed"] <= rec["channels_total"] // 2 and rec["achieved_retention"] >= 0.5
    rows = prof.table("ffn").to_pylist()
    for mod, removed in cfg.ffn_channels_removed.items():
        s = {}
        for r in rows:
            if r["module"] == mod:
                s.setdefault(r["seed"], {})[r["channel"]] = r["energy"] * r["out_norm"]
        per_seed = np.array([[v[c] for c in sorted(v)] for _, v in sorted(s.items())])
        score = (per_seed / per_seed.mean(1, keepdims=True)).mean(0)
        kept = [c for c in range(len(score)) if c not in removed]
        protected = rec["modules"][mod]["protected"]
        if protected == 0:  # the lowest-scored channels went
            assert score[removed].max() <= score[kept].min()
        assert len(removed) + protected >= len(score) // 2 and 0 < len(kept)


def test_extract_save_and_load_an_ffn_fragment(profile, tmp_path):
    out = tmp_path / "frag"
    res = api.extract(profile, {"ffn_retention": 0.5}, out=out, show_progress=False)
    m = read_manifest(out)
    assert [t.name for t in m.techniques] == ["ffn_prune"] and (out / "ffn_selection.json").is_file()
    s = m.techniques[0].summary
    assert s.unit == "ffn_channels" and s.units_removed > 0 and m.params["removed"] == s.params_removed > 0
    assert json.loads((out / "ffn_selection.json").read_text())["channels_removed"] == s.units_removed
    assert res.summary()["name"].endswith("-f50")
    cfg = FfnPruneConfig.from_dict(m.techniques[0].config)
    loaded, ref, base = load_model("tiny"), load_model("tiny"), load_model("tiny")
    load_fragment(loaded, out)
    apply_technique(ref.denoiser, cfg)  # the extracted model
    install_channel_mask(base.denoiser, cfg.ffn_channels_removed)
    x = unet_inputs(loaded.denoiser)
    with torch.no_grad():
        a, b, c = loaded.denoiser(*x).sample, ref.denoiser(*x).sample, base.denoiser(*x).sample
    assert torch.equal(a, b) and (a - c).abs().max().item() <= TOL
    assert _params(loaded.denoiser) == _params(ref.denoiser) < _params(base.denoiser)
