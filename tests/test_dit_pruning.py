"""Head and FFN pruning on transformer denoisers: Flux's dual-stream (``to_out``, ``to_add_out``) and single-stream
attention (the attention slice of ``proj_out``), the single-stream MLP (``proj_mlp`` and its slice of ``proj_out``),
SD3's joint attention and PixArt: physically pruned == masked (<= 1e-5), and refusals name their true reason."""

import copy

import pytest
import torch

from fragcli.errors import FragError
from fragcli.techniques.ffn_prune import ffn_blocks, install_channel_mask, prune_channels, remove_channel_mask
from fragcli.techniques.head_prune import (
    attention_modules,
    check_heads,
    install_head_mask,
    prune_heads,
    remove_head_mask,
)
from tests import dit_helpers as H


def _heads_to_remove(model):
    return {name: [0] for name, m in attention_modules(model).items() if m.heads > 1}


@pytest.mark.parametrize("kind", ["flux", "sd3", "pixart"])
def test_head_pruning_equals_mask(kind):
    model = H.BUILD[kind]()
    removed = _heads_to_remove(model)
    if kind == "flux":
        assert {"transformer_blocks.0.attn", "single_transformer_blocks.1.attn"} <= set(removed)
    plain = H.run(model, kind)
    install_head_mask(model, removed)
    masked = H.run(model, kind)
    remove_head_mask(model)
    assert torch.equal(H.run(model, kind), plain)  # the mask is reversible
    assert (masked - plain).abs().max() > 1e-4  # the heads mattered: the test can fail
    pruned = copy.deepcopy(model)
    prune_heads(pruned, removed)
    out = H.run(pruned, kind)
    assert (out - masked).abs().max() <= 1e-5
    for name, remove in removed.items():
        assert pruned.get_submodule(name).heads == model.get_submodule(name).heads - len(remove)
    if kind == "flux":
        block = pruned.single_transformer_blocks[0]
        assert block.proj_out.in_features == block.attn.to_q.out_features + block.proj_mlp.out_features


def test_flux_ffn_single_stream_pruning_equals_mask():
    model = H.flux()
    blocks, skipped = ffn_blocks(model)
    assert {"single_transformer_blocks.0", "single_transformer_blocks.1", "transformer_blocks.0.ff"} <= set(blocks)
    removed = {name: list(range(0, f.inner, 3)) for name, f in blocks.items()}
    plain = H.run(model, "flux")
    install_channel_mask(model, removed)
    masked = H.run(model, "flux")
    remove_channel_mask(model)
    assert (masked - plain).abs().max() > 1e-4
    pruned = copy.deepcopy(model)
    prune_channels(pruned, removed)
    assert (H.run(pruned, "flux") - masked).abs().max() <= 1e-5
    # heads and MLP channels of the same proj_out, pruned together (heads first, as the stack does)
    both = copy.deepcopy(model)
    heads = {"single_transformer_blocks.0.attn": [1]}
    install_head_mask(model, heads)
    install_channel_mask(model, removed)
    masked_both = H.run(model, "flux")
    remove_channel_mask(model)
    remove_head_mask(model)
    prune_heads(both, heads)
    prune_channels(both, removed)
    assert (H.run(both, "flux") - masked_both).abs().max() <= 1e-5


def test_refusals_name_the_true_reason():
    model = H.flux()
    with pytest.raises(FragError) as e:
        check_heads(model, {"transformer_blocks.0.attn": [0, 1]})
    assert "every head" in e.value.problem
    with pytest.raises(FragError) as e:
        check_heads(model, {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": [0]})
    assert "another model" in e.value.fix
    model.transformer_blocks[0].attn.fuse_projections()
    with pytest.raises(FragError) as e:
        check_heads(model, {"transformer_blocks.0.attn": [0]})
    assert "fused" in e.value.problem and "another model" not in e.value.fix
