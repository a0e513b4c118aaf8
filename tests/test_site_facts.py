"""One record of a site's facts: what the variants read for a decision is what the report shows.

Detection reads a (B, 1, N, M) float mask as "additive" (its values may differ per query); the
tensors the site really receives show a padding mask (one value per key). The site's `facts`
(attnopt.variants.SiteInfo) are computed once, from the match and the captured tensors, and the
variants, the cost model and the report all read them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.backend import AttnoptBackend
from attnopt.policies import VariantPolicy
from attnopt.report import Site
from attnopt.variants import LinearConfig, SiteInfo


class PaddedSelfAttention(nn.Module):
    def forward(self, q, k, v, padding):  # padding: (B, 1, N, M) additive, the same in every row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=padding)


def _padding(batch: int, n: int) -> torch.Tensor:
    mask = torch.zeros(batch, 1, n, n)
    mask[0, ..., n - 3:] = torch.finfo(torch.float32).min
    return mask


def _rewrite(seen: list[SiteInfo]):
    """Rewrite with linear attention, recording the facts its refusal was asked about."""
    from attnopt.variants import registry

    spec = registry.spec_for(LinearConfig())
    original = spec.refusal

    def recording_refusal(config, info):
        seen.append(info)
        return original(config, info)

    registry._SPECS[LinearConfig] = registry.dataclasses.replace(spec, refusal=recording_refusal)
    try:
        q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
        backend = AttnoptBackend(VariantPolicy(LinearConfig()))
        model = torch.compile(PaddedSelfAttention(), backend=backend, dynamic=False)
        model(q, k, v, _padding(2, 16))
        return backend.report
    finally:
        registry._SPECS[LinearConfig] = spec


def test_the_report_shows_the_facts_the_variants_decided_on():
    seen: list[SiteInfo] = []
    report = _rewrite(seen)
    (site,) = report.sites
    assert site.mask == "additive"  # what detection could tell from the graph
    assert seen and all(info is site.facts for info in seen)  # the variant read the very record the report holds
    assert site.facts.mask_kind == "key_padding" and site.facts.fused
    assert site.shown_mask == "key_padding"
    assert "key_padding" in str(report)
    assert site.decision.variant == "linear"  # a padding mask is one linear attention can honour
    assert site.to_dict()["facts"]["mask_kind"] == "key_padding"


def test_facts_are_immutable_and_an_undecided_site_shows_what_detection_read():
    site = Site(id=0, module="m", source="", form="matmul", shape={"B": 1, "H": 1, "N": 4, "d": 2},
                causal=True, mask="boolean", dropout=0.0, dtype="float32", rewritable=False, reason="r")
    assert site.facts is None and site.shown_mask == "boolean" and site.shown_causal
    info = SiteInfo.from_shape({"B": 1, "H": 2, "N": 4, "d": 8})
    try:
        info.N = 5  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("SiteInfo must be immutable")
    assert attnopt.variants.SiteInfo is SiteInfo
