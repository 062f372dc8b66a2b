"""Prompt-embedding capture on SDXL/SD3/PixArt-style encoders: batch rows equal up to the stated tolerance (not
bit-equal), PixArt's ``**kwargs`` flattened into comparable arguments."""

import torch

from fragcli.techniques.prompt_embeds import TOLERANCE, _bound, _key, _same


def test_rows_equal_up_to_the_tolerance():
    a = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    assert _same(a, a + 2.4e-7)  # SDXL's pooled embedding between batch 1 and 2
    assert not _same(a, a + 1e-3)  # a real difference
    assert not _same(a, a.half())  # dtype
    assert not _same(a, a[:1])  # shape
    assert _same(torch.arange(3), torch.arange(3)) and not _same(torch.arange(3), torch.arange(3) + 1)
    assert not _same(a, a * (1 + 3 * TOLERANCE) + 3 * TOLERANCE * a.abs().max())


def test_keyword_catch_all_is_flattened():
    def encode_prompt(prompt, do_classifier_free_guidance=True, negative_prompt="", device=None,
                      max_sequence_length=300, **kwargs):
        return None

    bound = _bound(encode_prompt, ("a cat",), {"negative_prompt": "", "clean_caption": False})
    assert "kwargs" not in bound and bound["clean_caption"] is False and bound["max_sequence_length"] == 300
    assert _key(bound) is not None
