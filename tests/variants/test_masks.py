"""The reduced variants' mask readers check every call's mask, compiled or not."""

from __future__ import annotations

import pytest
import torch

from attnopt.variants.masks import causal_key_mask, per_key_mask


def test_a_per_query_mask_with_equal_rows_reads_as_its_first_row_with_its_gradient():
    mask = torch.randn(2, 3, 1, 5).expand(2, 3, 4, 5).clone().requires_grad_()
    rows = per_key_mask(mask)
    assert torch.equal(rows, mask[:, :, :1].detach())
    rows.sum().backward()
    assert torch.equal(mask.grad[:, :, :1], torch.ones(2, 3, 1, 5)) and not mask.grad[:, :, 1:].any()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_masks_the_variants_cannot_follow_raise_on_every_call(compiled):
    """Under Inductor (inner="inductor") the check runs too: a graph planned on equal rows never
    silently reads a later mask's first row."""
    read_keys = lambda m: per_key_mask(m) * 1  # noqa: E731
    read_causal = lambda m: causal_key_mask(m, "linear attention") & True  # noqa: E731
    if compiled:
        read_keys, read_causal = torch.compile(read_keys, backend="inductor"), torch.compile(read_causal, backend="inductor")
    equal = torch.randn(1, 2, 1, 6).expand(1, 2, 3, 6).contiguous()
    assert read_keys(equal).shape == (1, 2, 1, 6)
    with pytest.raises(ValueError, match="differs between query rows"):
        read_keys(torch.randn(1, 2, 3, 6))
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    assert torch.equal(read_causal(causal), torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="more than causality"):
        read_causal(torch.ones(1, 1, 4, 4, dtype=torch.bool))
