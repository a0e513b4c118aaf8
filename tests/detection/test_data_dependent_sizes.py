"""Graphs whose sizes come from the values of integer tensors they are given.

SAM 3's box relative-position bias (the transformers zoo's sam3 and sam3_lite_text, sdpa) builds
its coordinates with `torch.arange(0, height) / height`, `height` a 0-d integer tensor that
dynamo passes to the graph as an input: the size of everything downstream is the tensor's value.
attnopt propagates shapes on fake tensors, which hold no values, so inspect and rewrite raised
`DataDependentOutputException` there. The graph is analysed at the call's values, as it runs
(one-element integer inputs are constants of the fake propagation), and a call with another
value is analysed anew (dynamo read the value: it is part of the call's signature).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt

from .support import assert_outputs_close

BATCH, HEADS, LENGTH, HEAD_DIM = 2, 2, 6, 8


class RelativeBiasFromSize(nn.Module):
    """SDPA with a relative-position bias whose coordinates are `arange(0, size) / size`, `size` a
    0-d integer tensor: the bias's values depend on `size`, and so does the size of `coords`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        coords = torch.arange(0, size, dtype=q.dtype) / size
        length = q.shape[-2]
        bias = -(coords[:length, None] - coords[None, :length]).abs() * 4.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def qkv() -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM) for _ in range(3))


def test_a_size_read_from_an_integer_tensor_is_analysed_at_its_value():
    model = RelativeBiasFromSize().eval()
    args = (*qkv(), torch.tensor(LENGTH + 2))
    report = attnopt.inspect(model, args)
    (site,) = report.sites
    assert site.rewritable and site.form == "sdpa", str(report)


@pytest.mark.parametrize("sizes", [(8, 10, 12, 8)], ids=["8-10-12-8"])
def test_the_exact_rewrite_follows_the_size_from_call_to_call(sizes):
    model = RelativeBiasFromSize().eval()
    q, k, v = qkv()
    with torch.no_grad():
        rewritten = attnopt.rewrite(model, "exact", args=(q, k, v, torch.tensor(sizes[0])))
        for size in sizes:
            expected = model(q, k, v, torch.tensor(size))
            assert_outputs_close(rewritten(q, k, v, torch.tensor(size)), expected)
    report = attnopt.report_of(rewritten)
    assert report.rewritten and all(site.rewritable for site in report.sites), str(report)
