"""Clustered attention: its dense weight matrix, exactness when the top keys cover every key, masks,
refusals, and that it keeps sharp attention that agent attention loses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels.chosen_keys import chosen_keys_attention, chosen_keys_attention_reference
from attnopt.kernels.clustered_reference import clustered_attention_dense
from attnopt.variants import AgentConfig, ClusteredConfig, build_site_module, refusal, relative_error, spec_for

from .dense import expand_heads
from .support import make_site, padding_mask, tensors


def dense_output(module, q, k, v, mask, scale):
    """What the module should compute: its clusters, then the dense weights (fp64) applied to v."""
    key_mask = None if mask is None else mask[:, :, :1, :]
    groups, centroids = module.clusters(q, key_mask)
    bias = None
    if mask is not None:
        bias = mask.double() if mask.is_floating_point() else torch.zeros(mask.shape, dtype=torch.float64).masked_fill(
            ~mask, float("-inf"))
    top = min(module.config.top_keys, k.shape[2])
    weights = clustered_attention_dense(q, expand_heads(k, q.shape[1]), groups, centroids, scale=scale, top_keys=top,
                                        key_bias=bias)
    return weights @ expand_heads(v, q.shape[1]).double(), weights


@given(batch=st.integers(1, 2), heads=st.sampled_from([(2, 2), (4, 2)]), n_queries=st.integers(2, 40),
       n_keys=st.integers(2, 40), clusters=st.integers(1, 12), top_keys=st.integers(1, 16),
       iterations=st.integers(0, 2), masked=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_module_equals_its_dense_weights(batch, heads, n_queries, n_keys, clusters, top_keys, iterations, masked, seed):
    n_heads, n_kv = heads
    site = make_site(B=batch, H=n_heads, Hkv=n_kv, N=n_queries, M=n_keys, d=8, e=4,
                     mask_kind="key_padding" if masked else None)
    q, k, v = tensors(site, seed=seed)
    mask = None
    if masked:
        lengths = torch.randint(1, n_keys + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
        mask = padding_mask(batch, n_keys, lengths)
    module = build_site_module(ClusteredConfig(clusters=clusters, top_keys=top_keys, kmeans_iterations=iterations),
                               site)
    out = module(q, k, v, mask=mask, scale=0.3)
    expected, weights = dense_output(module, q, k, v, mask, 0.3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))  # every row sees a key here
    if mask is not None:
        assert not weights.masked_select(~mask.expand_as(weights)).any()  # masked keys get no weight


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_equals_exact_softmax_where_the_top_keys_cover_every_key(mask_kind, heads):
    site = make_site(B=2, H=heads[0], Hkv=heads[1], N=48, M=40, d=16, e=8,
                     mask_kind=None if mask_kind is None else "key_padding")
    q, k, v = tensors(site, seed=1)
    mask = None
    if mask_kind is not None:
        mask = padding_mask(2, 40, [40, 23])
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) + torch.linspace(-1, 1, 40)
    module = build_site_module(ClusteredConfig(clusters=5, top_keys=40), site)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=heads[0] != heads[1])
    torch.testing.assert_close(module(q, k, v, mask=mask, scale=0.25), expected, rtol=1e-5, atol=1e-6)


def test_a_row_that_sees_no_key_gives_zero_as_sdpa_does():
    site = make_site(B=2, N=32, M=32, mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, 32, [0, 32])
    out = build_site_module(ClusteredConfig(clusters=4, top_keys=8), site)(q, k, v, mask=mask, scale=0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[0], F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)[0])
    assert out[1].isfinite().all()


def test_padded_queries_shape_no_cluster():
    """A padded query joins a cluster (its own output is computed) but moves no centroid: the
    valid rows do not depend on the padded queries' values."""
    site = make_site(B=2, N=40, M=40, mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, 40, [40, 25])
    module = build_site_module(ClusteredConfig(clusters=6, top_keys=8), site)
    changed = q.clone()
    changed[1, :, 25:] = 100 * torch.randn_like(changed[1, :, 25:])
    before, after = module(q, k, v, mask=mask, scale=0.25), module(changed, k, v, mask=mask, scale=0.25)
    assert torch.equal(before[:, :, :25], after[:, :, :25]) and torch.equal(before[0], after[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32_and_keep_their_dtype(dtype):
    site = make_site(N=32, M=32, dtype=dtype)
    q, k, v = tensors(site, dtype=dtype)
    module = build_site_module(ClusteredConfig(clusters=4, top_keys=8), site)
    out = module(q, k, v, scale=0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), module(q.float(), k.float(), v.float(), scale=0.25), rtol=2e-2, atol=2e-2)


def test_gradients_flow_to_q_k_and_v_as_the_dense_form_s():
    site = make_site(B=1, H=2, Hkv=2, N=24, M=24)
    q, k, v = (t.double().requires_grad_() for t in tensors(site))
    module = build_site_module(ClusteredConfig(clusters=3, top_keys=6), site)
    module(q, k, v, scale=0.3).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    # the dense form with the same clusters (centroids are means of q: gradients flow through them too)
    groups, centroids = module.clusters(q, None)
    weights = clustered_attention_dense(q, k, groups, centroids, scale=0.3, top_keys=6)
    (weights @ v).square().sum().backward()
    for got, (name, t) in zip(grads, zip("qkv", (q, k, v))):
        torch.testing.assert_close(got, t.grad, rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key_dtype", [torch.int64, torch.int32])
def test_the_csr_path_of_the_chosen_keys_op_equals_its_gather_reference(biased, dtype, key_dtype):
    """The op's CPU inference path (sampled scores and a sparse product) against the reference,
    in one chunk and in many; a row whose chosen keys are all masked gives 0 either way; int32
    key indices give what int64 ones give."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, dim, generator=generator, dtype=dtype) for n, dim in ((20, 8), (30, 8), (30, 5)))
    keys = torch.randint(0, 30, (2, 3, 20, 6), generator=generator).to(key_dtype)
    bias = None
    if biased:
        bias = torch.randn(2, 3, 1, 30, generator=generator, dtype=dtype)
        bias[0, 0, 0, :] = float("-inf")  # batch 0, head 0: every key masked
    with torch.no_grad():
        fast = chosen_keys_attention(q, k, v, keys, bias, scale=0.3)
    whole = chosen_keys_attention_reference(q, k, v, keys, bias, scale=0.3)
    chunked = chosen_keys_attention_reference(q, k, v, keys, bias, scale=0.3, chunk_elements=6 * 13 * 3)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(fast, whole)
    if key_dtype == torch.int32:
        with torch.no_grad():
            torch.testing.assert_close(fast, chosen_keys_attention(q, k, v, keys.long(), bias, scale=0.3), rtol=0, atol=0)
    if biased:
        assert torch.equal(fast[0, 0], torch.zeros_like(fast[0, 0]))


@pytest.mark.parametrize("field, value", [("causal", True), ("mask_kind", "boolean"), ("dropout", 0.1)])
def test_refusals(field, value):
    site = dataclasses.replace(make_site(), **{field: value})
    assert refusal(ClusteredConfig(), site) is not None


def test_runs_refuse_what_it_cannot_compute():
    site = make_site(N=32, M=32)
    q, k, v = tensors(site)
    module = build_site_module(ClusteredConfig(clusters=4, top_keys=8), site)
    with pytest.raises(ValueError, match="causal"):
        module(q, k, v, scale=0.25, causal=True)
    per_query = torch.ones(32, 32, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="differs between query rows"):
        module(q, k, v, mask=per_query, scale=0.25)


@pytest.mark.parametrize("field, value", [("clusters", 0), ("top_keys", 0), ("kmeans_iterations", -1),
                                          ("clusters", 2.5)])
def test_config_checks_its_fields(field, value):
    with pytest.raises((ValueError, TypeError)):
        ClusteredConfig(**{field: value})


def test_default_candidates_leave_at_least_half_of_the_work():
    spec = spec_for(ClusteredConfig())
    assert spec.candidates(make_site(N=100, M=100)) == []
    shapes = [(c.clusters, c.top_keys) for c in spec.candidates(make_site(N=140, M=140))]
    assert shapes == [(16, 64), (32, 64), (64, 32)]
    assert len(spec.candidates(make_site(N=512, M=512))) == 4


def sharp_heads(seed: int = 0):
    """q, k, v where each query attends almost only to a few keys far from it (content lookup)."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, n_tokens, dim = 2, 4, 256, 32
    anchors = torch.randn(batch, heads, 16, dim, generator=generator)
    which = torch.randint(0, 16, (batch, heads, n_tokens), generator=generator)
    q = 3 * anchors.gather(2, which.unsqueeze(-1).expand(-1, -1, -1, dim)) + 0.3 * torch.randn(
        batch, heads, n_tokens, dim, generator=generator)
    k = torch.randn(batch, heads, n_tokens, dim, generator=generator)
    k[:, :, :16] = anchors  # the first 16 keys answer the anchors' queries
    v = torch.randn(batch, heads, n_tokens, 16, generator=generator)
    return q, k, v


def test_it_keeps_sharp_content_attention_that_agents_lose():
    q, k, v = sharp_heads()
    site = make_site(B=2, H=4, Hkv=4, N=256, M=256, d=32, e=16)
    clustered = relative_error(build_site_module(ClusteredConfig(clusters=32, top_keys=32), site), q, k, v, None,
                               32 ** -0.5)
    agent = relative_error(build_site_module(AgentConfig(), site, (q, k, v, None)), q, k, v, None, 32 ** -0.5)
    assert clustered < 0.05 < agent
