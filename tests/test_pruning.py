"""Physical head pruning equals the masked original; the selection guards hold."""

import copy

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from fragcli.errors import FragError
from fragcli.generation import GenSettings, run_batch
from fragcli.models import load_model
from fragcli.techniques import HeadPruneConfig, apply_technique
from fragcli.techniques.head_prune import attention_modules, install_head_mask, remove_head_mask
from fragcli.techniques.head_selection import SelectionParams, check_selection, plan
from tests.helpers import unet_inputs

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _attn(query_dim=32, cross=None, heads=4, **kw):
    torch.manual_seed(0)
    return Attention(query_dim=query_dim, cross_attention_dim=cross, heads=heads, dim_head=8, bias=True, **kw).eval()


@pytest.mark.parametrize("cross", [None, 24])
@pytest.mark.parametrize("with_mask", [False, True])
def test_pruned_module_equals_masked_module(cross, with_mask):
    attn = _attn(cross=cross)
    torch.manual_seed(1)
    x = torch.randn(2, 10, 32)
    ctx = torch.randn(2, 7, 24) if cross else None
    n_keys = 7 if cross else 10
    mask = None
    if with_mask:
        mask = torch.zeros(2, 1, n_keys)
        mask[:, :, -2:] = -10000.0  # additive mask over the last keys
    remove = [0, 2]
    masked = copy.deepcopy(attn)
    hook_model = torch.nn.ModuleDict({"a": masked})
    install_head_mask(hook_model, {"a": remove})
    pruned = copy.deepcopy(attn)
    apply_technique(torch.nn.ModuleDict({"a": pruned}), HeadPruneConfig(attention_heads_removed={"a": remove}))
    with torch.no_grad():
        ref = masked(x, encoder_hidden_states=ctx, attention_mask=mask)
        out = pruned(x, encoder_hidden_states=ctx, attention_mask=mask)
        full = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
    assert pruned.heads == 2 and pruned.to_q.out_features == 16 and pruned.to_out[0].in_features == 16
    assert (out - ref).abs().max().item() <= TOL
    assert (full - ref).abs().max().item() > 1e-3  # the heads mattered: the test can fail


@pytest.mark.parametrize("which", ["attn1", "attn2"])
def test_tiny_modules_pruned_equal_masked_with_an_attention_mask(tiny, which):
    name = f"down_blocks.1.attentions.0.transformer_blocks.0.{which}"
    attn = dict(tiny.pipe.unet.named_modules())[name]
    torch.manual_seed(3)
    x = torch.randn(2, 16, attn.to_q.in_features)
    ctx = torch.randn(2, 77, attn.to_k.in_features) if which == "attn2" else None
    mask = torch.zeros(2, 1, 77 if ctx is not None else 16)
    mask[:, :, -5:] = -10000.0
    masked, pruned = torch.nn.ModuleDict({"a": copy.deepcopy(attn)}), torch.nn.ModuleDict({"a": copy.deepcopy(attn)})
    install_head_mask(masked, {"a": [2, 5, 6]})
    apply_technique(pruned, HeadPruneConfig(attention_heads_removed={"a": [2, 5, 6]}))
    with torch.no_grad():
        for m in (None, mask):
            ref = masked["a"](x, encoder_hidden_states=ctx, attention_mask=m)
            assert (pruned["a"](x, encoder_hidden_states=ctx, attention_mask=m) - ref).abs().max().item() <= TOL


def test_pruned_module_with_group_norm_and_residual_equals_masked():
    attn = _attn(query_dim=32, heads=4, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0)
    torch.manual_seed(2)
    x = torch.randn(2, 32, 3, 3)  # 4-D input path
    root_m, root_p = torch.nn.ModuleDict({"a": copy.deepcopy(attn)}), torch.nn.ModuleDict({"a": copy.deepcopy(attn)})
    install_head_mask(root_m, {"a": [1, 3]})
    apply_technique(root_p, HeadPruneConfig(attention_heads_removed={"a": [1, 3]}))
    with torch.no_grad():
        assert (root_m["a"](x) - root_p["a"](x)).abs().max().item() <= TOL


def test_pruned_unet_equals_masked_unet(tiny):
    unet = tiny.pipe.unet
    removed = {n: [1, 4, 6] for n in attention_modules(unet)}
    x, t, ctx = unet_inputs(unet)
    with torch.no_grad():
        base = unet(x, t, ctx).sample
        patch = install_head_mask(unet, removed)
        assert install_head_mask(unet, removed) is patch  # idempotent
        masked = unet(x, t, ctx).sample
        assert remove_head_mask(unet)
        assert torch.equal(unet(x, t, ctx).sample, base)  # reversible
        pruned_unet = copy.deepcopy(unet)
        apply_technique(pruned_unet, HeadPruneConfig(attention_heads_removed=removed))
        pruned = pruned_unet(x, t, ctx).sample
    assert (pruned - masked).abs().max().item() <= TOL
    assert all(m.heads == 5 for m in attention_modules(pruned_unet).values())
    assert sum(p.numel() for p in pruned_unet.parameters()) < sum(p.numel() for p in unet.parameters())


def test_pruned_pipeline_equals_masked_pipeline_with_a_fixed_seed():
    masked, pruned = load_model("tiny"), load_model("tiny")
    removed = {n: [0, 7] for n in attention_modules(masked.denoiser)}
    install_head_mask(masked.denoiser, removed)
    apply_technique(pruned.denoiser, HeadPruneConfig(attention_heads_removed=removed))
    s = GenSettings("a red circle", steps=3, guidance=7.5, width=64, height=64)
    pipe_kw = dict(device="cpu")
    a = np.asarray(run_batch(masked.pipe, s, [3], **pipe_kw)[0], dtype=np.int16)
    b = np.asarray(run_batch(pruned.pipe, s, [3], **pipe_kw)[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # identical up to 8-bit rounding of the decoded image


def test_a_module_keeps_at_least_one_head(tiny):
    unet = copy.deepcopy(tiny.pipe.unet)
    name = next(iter(attention_modules(unet)))
    with pytest.raises(FragError, match="every head"):
        apply_technique(unet, HeadPruneConfig(attention_heads_removed={name: list(range(8))}))
    assert attention_modules(unet)[name].heads == 8  # refused before anything changed
    with pytest.raises(FragError, match="cannot remove"):
        apply_technique(unet, HeadPruneConfig(attention_heads_removed={name: [8]}))


def _scores(heads=(4, 4, 2), seeds=3):
    rng = np.random.default_rng(0)
    return {f"m{i}": {"heads": h, "score": rng.random(h), "per_seed": np.tile(np.arange(h, dtype=float), (seeds, 1))}
            for i, h in enumerate(heads)}


def test_plan_global_and_per_module_keep_one_head():
    sel = plan(_scores(), SelectionParams(head_retention=0.1, stability_threshold=1.0))
    assert all(k >= 1 for k in sel["kept"].values())
    check_selection(sel)
    per = plan(_scores(), SelectionParams(head_retention=0.5, per_module=True, stability_threshold=1.0))
    assert per["kept"] == {"m0": 2, "m1": 2, "m2": 1}


def test_plan_retention_one_is_a_no_op_and_bad_retention_refused():
    sel = plan(_scores(), SelectionParams(head_retention=1.0))
    assert sel["heads_removed"] == 0 and sel["achieved_retention"] == 1.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(FragError, match="head-retention"):
            plan(_scores(), SelectionParams(head_retention=bad))


def test_unstable_heads_are_protected():
    scores = _scores(heads=(4,), seeds=2)
    scores["m0"]["per_seed"] = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0]])  # heads 0 and 3 swap ranks
    scores["m0"]["score"] = np.array([0.0, 1.0, 2.0, 3.0])
    sel = plan(scores, SelectionParams(head_retention=0.5, stability_threshold=0.25))
    assert sel["protected"]["m0"] == [0, 3]
    assert sel["instability"]["m0"][0] > 0.25 and sel["instability"]["m0"][1] == 0
    assert 0 not in sel["removed"]["m0"] and sel["removed"]["m0"] == [1, 2]


def test_zero_head_selection_is_rejected():
    sel = plan(_scores(), SelectionParams(head_retention=0.5))
    sel["removed"]["m2"] = [0, 1]
    sel["kept"]["m2"] = 0
    with pytest.raises(FragError, match="zero heads"):
        check_selection(sel)


@pytest.mark.parametrize("field", ["head_retention", "safety_margin", "stability_threshold"])
def test_nan_selection_parameters_are_refused(field):
    with pytest.raises(FragError, match=field.replace("_", "-")):
        SelectionParams(**{field: float("nan")}).check()
