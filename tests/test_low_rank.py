"""Low-rank factoring of Linear layers: the error equals the discarded energy, layers that would not save bytes are
left alone, ASVD lowers the output error where input channels differ in scale, and a fragment round-trips exactly."""

import math

import pytest
import torch
from pydantic import ValidationError

from fragcli import api
from fragcli.errors import FragError
from fragcli.fragment import load_fragment, plan_steps
from fragcli.manifest import read_manifest
from fragcli.models import load_model
from fragcli.profiling.data import ProfileData
from fragcli.techniques import REGISTRY, apply_technique
from fragcli.techniques.low_rank import (
    TABLE,
    LowRankConfig,
    LowRankLayer,
    LowRankLinear,
    read_scales,
    remove_low_rank_mask,
)
from fragcli.techniques.quant_layers import QuantLinear
from fragcli.techniques.stack import apply_stack, meta_copy, snapshot, state_diff
from tests.helpers import unet_inputs

TECH = REGISTRY.get("low_rank")
PROMPT = "a red circle on a blue background"


def spectrum_linear(out_f: int, in_f: int, sv, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    """A Linear whose weight has the singular values ``sv`` (random orthogonal factors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    k = len(sv)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(u[:, :k] @ torch.diag(torch.tensor(sv, dtype=torch.float32)) @ v[:, :k].T)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def test_svd_error_equals_the_discarded_energy_and_bounds_the_output():
    sv = [0.8**i for i in range(48)]  # decaying spectrum: rank 4 keeps 0.8 of the energy (0.64^4 = 0.17 left)
    root = torch.nn.Sequential(spectrum_linear(48, 80, sv))
    w = root[0].weight.detach().clone()
    bias = root[0].bias.detach().clone()
    applied = apply_technique(root, LowRankConfig(rank_energy_ratio=0.8, method="svd"))
    (e,) = applied.config.low_rank_layers
    energy = torch.tensor(sv, dtype=torch.float64).square()
    cum = (energy.cumsum(0) / energy.sum()).tolist()
    assert e.layer == "0" and e.orig_rank == 48 and e.method == "svd"
    assert cum[e.rank - 2] < 0.8 <= cum[e.rank - 1]  # the smallest rank that keeps the target
    assert math.isclose(e.energy_retained, cum[e.rank - 1], abs_tol=1e-6)  # float32 singular values
    layer = root[0]
    assert isinstance(layer, LowRankLinear) and layer.down.weight.shape == (e.rank, 80)
    w_r = layer.up.weight @ layer.down.weight
    rel = float((w - w_r).square().sum() / w.square().sum())
    assert abs(rel - (1 - e.energy_retained)) < 1e-5
    assert torch.equal(layer.up.bias, bias)
    # the output: ||(W - W_r) x|| <= s_(r+1) ||x|| for every x; on isotropic inputs the squared error share is
    # the discarded energy (4096 Gaussian rows: within 5%)
    x = torch.randn(4096, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = root(x) - (x @ w.T + bias)
    assert (err.norm(dim=1) <= sv[e.rank] * x.norm(dim=1) * (1 + 1e-4) + 1e-6).all()
    share = float(err.square().sum() / (x @ w.T).square().sum())
    assert abs(share / (1 - e.energy_retained) - 1) < 0.05


def test_a_layer_whose_rank_would_not_save_bytes_is_left_alone():
    full = spectrum_linear(64, 64, [1.0] * 64, seed=2)  # flat spectrum: 0.93 needs rank 60 > 0.9 x 32
    low = spectrum_linear(64, 64, [3.0, 2.0, 1.0, 0.5], seed=3)  # rank 4: rank 4 keeps all its energy
    root = torch.nn.Sequential(full, low)
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = root(x)
    s = TECH.summary(LowRankConfig(rank_energy_ratio=0.93, method="svd"), root)
    assert (s.unit, s.units_total, s.units_removed, s.details["not_saving"]) == ("low_rank_layers", 2, 1, 1)
    assert s.params_removed == 64 * 64 - 3 * 128  # 0.93 of [9, 4, 1, .25] needs rank 3
    before = snapshot(root)
    applied = apply_technique(root, LowRankConfig(rank_energy_ratio=0.999, method="svd"))
    assert [e.layer for e in applied.config.low_rank_layers] == ["1"] and applied.config.low_rank_layers[0].rank == 4
    assert type(root[0]) is torch.nn.Linear
    changed, added, removed = state_diff(before, root)
    assert changed == [] and added == ["1.down.weight", "1.up.bias", "1.up.weight"]
    assert removed == ["1.bias", "1.weight"]
    with torch.no_grad():
        assert (root(x) - ref).abs().max() < 1e-5  # rank 4 of a rank-4 weight: exact up to rounding
    # a margin: the same layer at rank 4 of 64 x 64 is refused when the factors must save 95% of its bytes
    strict = torch.nn.Sequential(spectrum_linear(64, 64, [3.0, 2.0, 1.0, 0.5], seed=3))
    assert TECH.summary(LowRankConfig(rank_energy_ratio=0.999, method="svd", min_saving=0.95), strict).units_removed == 0


def test_activation_aware_factors_fit_uneven_input_channels_better():
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 48)
    scale = torch.logspace(-1.5, 0.5, 64)[torch.randperm(64)]  # channel RMS over two decades
    cfg = dict(rank_energy_ratio=0.5, activation_scales={"0": scale.tolist()})
    x = torch.randn(2048, 64) * scale
    errs = {}
    for method in ("svd", "asvd"):
        root = torch.nn.Sequential(torch.nn.Linear(64, 48))
        root.load_state_dict(torch.nn.Sequential(lin).state_dict())
        rank = 12
        entry = LowRankLayer(layer="0", rank=rank, orig_rank=48, in_features=64, out_features=48, energy_retained=0.0,
                             method=method)
        apply_technique(root, LowRankConfig(**cfg, method=method, low_rank_layers=[entry]))
        with torch.no_grad():
            errs[method] = float((root(x) - lin(x)).norm() / (x @ lin.weight.T).norm())
    assert errs["asvd"] < 0.8 * errs["svd"], errs  # same rank, same bytes
    # the planned asvd config chooses its rank from the scaled spectrum and records the method; a layer whose
    # input width no longer matches the profile (pruned before) falls back to plain SVD
    root = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(32, 48))
    applied = apply_technique(root, LowRankConfig(rank_energy_ratio=0.5, method="asvd",
                                                  activation_scales={"0": scale.tolist(), "1": [1.0] * 40}))
    assert [(e.layer, e.method) for e in applied.config.low_rank_layers] == [("0", "asvd"), ("1", "svd")]
    assert applied.config.activation_scales is None  # the manifest keeps ranks, not the profile's statistics


def test_rebuild_creates_the_recorded_structure_on_meta_and_a_planned_config_changes_nothing():
    model = load_model("tiny")
    den = model.denoiser
    meta = meta_copy(den)
    planned = LowRankConfig(rank_energy_ratio=0.5, method="svd")
    before = {k: v.shape for k, v in meta.state_dict().items()}
    TECH.rebuild(meta, planned)
    assert {k: v.shape for k, v in meta.state_dict().items()} == before
    summary = TECH.summary(planned, den)
    resolved = TECH.apply(den, planned).config
    assert len(resolved.low_rank_layers) == summary.units_removed > 0
    assert summary.details["low_rank_layers"] == [e.model_dump(mode="json") for e in resolved.low_rank_layers]
    assert TECH.summary(planned, meta).units_removed is None  # on meta a planned config has no ranks yet
    TECH.rebuild(meta, resolved)
    want = {k: (tuple(v.shape), v.dtype) for k, v in den.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()} == want
    assert all(t.is_meta for t in meta.state_dict().values())
    with pytest.raises(FragError, match="not a Linear layer of this denoiser"):
        TECH.rebuild(meta, resolved)  # already factored


def test_the_mask_equals_the_physical_factors():
    a, b = load_model("tiny"), load_model("tiny")
    cfg = LowRankConfig(rank_energy_ratio=0.5, method="svd")
    TECH.apply(a.denoiser, cfg)
    x = unet_inputs(a.denoiser)
    TECH.mask(b.denoiser, cfg)
    with torch.no_grad():
        assert torch.equal(a.denoiser(*x).sample, b.denoiser(*x).sample)
    assert remove_low_rank_mask(b.denoiser)
    assert all(type(m) is not LowRankLinear for m in b.denoiser.modules())


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("lowrank") / "profile"
    api.profile(PROMPT, model="tiny", seeds=[0, 1], steps=2, out=out, show_progress=False)
    return out


def test_profile_records_linear_input_rms(tiny_profile):
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_profile / f"{TABLE}.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("module", "string"), ("channel", "int32"), ("calls", "int32"), ("rms", "double")]
    scales = read_scales(ProfileData(tiny_profile))
    den = load_model("tiny").denoiser
    lin = den.get_submodule("time_embedding.linear_1")
    assert len(scales["time_embedding.linear_1"]) == lin.in_features and min(scales["time_embedding.linear_1"]) >= 0
    assert all(len(v) == den.get_submodule(k).in_features for k, v in scales.items())
    calls = dict(zip(table.column("module").to_pylist(), table.column("calls").to_pylist(), strict=True))
    assert calls["time_embedding.linear_1"] == 4  # 2 seeds x 2 profiled steps


def test_a_fragment_round_trips_exactly_through_save_and_load(tiny_profile, tmp_path):
    """low-rank alone, and stacked after head pruning and before int8 quantization (which takes the factors)."""
    for options in ({"low_rank_energy": 0.5},
                    {"head_retention": 0.7, "low_rank_energy": 0.5, "quantize": "int8"}):
        out = tmp_path / ("stack" if "quantize" in options else "alone")
        api.extract(tiny_profile, options, out=out, show_progress=False)
        m = read_manifest(out)
        entry = next(t for t in m.techniques if t.name == "low_rank")
        layers = entry.config["low_rank_layers"]
        assert layers and entry.summary.unit == "low_rank_layers" and entry.summary.units_removed == len(layers)
        assert entry.summary.details["low_rank_layers"] == layers and entry.summary.bytes_saved > 0
        assert set(layers[0]) >= {"layer", "rank", "orig_rank", "energy_retained"}
        assert entry.config["method"] == "asvd" and entry.config["activation_scales"] is None
        name = layers[0]["layer"]
        assert f"unet.{name}.weight" in m.weights.removed
        if "quantize" not in options:
            assert {f"unet.{name}.down.weight", f"unet.{name}.up.weight", f"unet.{name}.up.bias"} <= set(m.weights.added)
        else:  # a pruned to_out's input no longer matches the profile: plain SVD there, asvd elsewhere
            pruned = {f"{mod}.to_out.0" for mod, r in m.techniques[0].config["attention_heads_removed"].items() if r}
            method = {e["layer"]: e["method"] for e in layers}
            assert pruned and {method[k] for k in pruned} == {"svd"}
            assert {v for k, v in method.items() if k not in pruned} == {"asvd"}

        loaded = load_model("tiny", "cpu", "fp32")
        load_fragment(loaded, out)
        ref = load_model("tiny", "cpu", "fp32")  # the extracted model, rebuilt from the same plan
        from fragcli.extraction import plan_techniques

        apply_stack(ref.denoiser, plan_steps(plan_techniques(ProfileData(tiny_profile), options)))
        x = unet_inputs(ref.denoiser)
        with torch.no_grad():
            assert torch.equal(loaded.denoiser(*x).sample, ref.denoiser(*x).sample)
        factored = loaded.denoiser.get_submodule(name)
        assert isinstance(factored, LowRankLinear)
        if "quantize" in options:
            assert isinstance(factored.down, QuantLinear) and isinstance(factored.up, QuantLinear)
        # a simulation refuses what it cannot reproduce: the fragment keeps no activation scales for its asvd
        # factors, and the layers head pruning narrowed are whole in a masked model
        resolved = TECH.Config.model_validate(entry.config)
        why = "pruned by a technique before it.*without --simulate" if "quantize" in options else \
            "activation scales.*without --simulate"
        with pytest.raises(FragError, match=why):
            TECH.mask(load_model("tiny").denoiser, resolved)


def test_bad_inputs_are_refused_with_the_fix(tiny_profile, tmp_path):
    assert TECH.plan(None, {}) is None and TECH.plan(None, {"low_rank_energy": None}) is None
    for bad in (0, 1.2, float("nan"), -0.5, True, "0.9"):
        with pytest.raises(FragError, match=r"--low-rank-energy .* is not a number in \(0, 1\]") as e:
            TECH.plan(None, {"low_rank_energy": bad})
        assert "0.93" in e.value.fix
    with pytest.raises(FragError, match="not a number in"):
        LowRankConfig(rank_energy_ratio=float("nan"))
    with pytest.raises(ValidationError):
        LowRankConfig(rank_energy_ratio=0.9, method="nmf")
    with pytest.raises(FragError, match="unknown low-rank method 'nmf'.*svd, asvd"):
        TECH.plan(None, {"low_rank_energy": 0.9, "low_rank_method": "nmf"})
    with pytest.raises(FragError, match="minimum saving 1.5"):
        TECH.plan(None, {"low_rank_energy": 0.9, "low_rank_min_saving": 1.5})
    old = tmp_path / "old"  # a profile taken before the collector existed
    import shutil

    shutil.copytree(tiny_profile, old)
    (old / f"{TABLE}.parquet").unlink()
    with pytest.raises(FragError, match="no linear_inputs.parquet.*re-run frag profile.*svd"):
        TECH.plan(ProfileData(old), {"low_rank_energy": 0.9})
    assert TECH.plan(ProfileData(old), {"low_rank_energy": 0.9, "low_rank_method": "svd"}).config.method == "svd"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_profile / f"{TABLE}.parquet")
    rms = table.column("rms").to_pylist()
    for damage, why in ((table.set_column(3, "rms", pa.array([float("nan")] + rms[1:])), "NaN"),
                        (table.slice(1), "lacks a channel"), (pa.concat_tables([table, table.slice(0, 1)]), "repeats")):
        pq.write_table(damage, old / f"{TABLE}.parquet")
        with pytest.raises(FragError, match=why):
            TECH.plan(ProfileData(old), {"low_rank_energy": 0.9})
    # a recorded layer that does not fit the model
    root = torch.nn.Sequential(torch.nn.Linear(8, 4))
    wrong = LowRankLayer(layer="0", rank=2, orig_rank=4, in_features=16, out_features=4, energy_retained=0.9)
    cfg = LowRankConfig(rank_energy_ratio=0.9, low_rank_layers=[wrong])
    with pytest.raises(FragError, match="layer 0 is 4x8 here, but the fragment factored it as 4x16"):
        TECH.rebuild(meta_copy(root), cfg)
    missing = wrong.model_copy(update={"layer": "nope", "in_features": 8})
    with pytest.raises(FragError, match="layer nope is not a Linear"):
        TECH.check(root, cfg.model_copy(update={"low_rank_layers": [missing]}))
    torch_layer = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(8, 2, 16))  # reads its Linears' weights
    s = TECH.summary(LowRankConfig(rank_energy_ratio=0.5, method="svd"), torch_layer)
    assert s.units_total == 0 and "inside a torch.nn.TransformerEncoderLayer" in s.details["unsupported"]["0.linear1"]
    with pytest.raises(FragError, match="no plain Linear layer"):
        TECH.check(torch_layer, LowRankConfig(rank_energy_ratio=0.5))
