"""Agent attention: equal to its dense N×M form, mask-safe, GQA, half precision, refusals."""

from __future__ import annotations

import pytest
import torch

from attnopt.variants import AgentConfig, TokenGrid, build_site_module, refusal, relative_error
from attnopt.variants.agent import AgentAttention, AgentLayout
from attnopt.variants.clustering import bipartite_merge, group_means, kmeans, pooled_groups, split_outliers
from attnopt.variants.two_stage import agent_bias, two_stage_attention

from .dense import apply, two_stage_weights
from .support import make_site, padding_mask, tensors

SCALE = 0.25


@pytest.mark.parametrize("selection", ["pool", "kmeans", "bipartite"])
@pytest.mark.parametrize("masked", [False, True])
def test_output_equals_dense_product_of_stage_weights(selection, masked):
    site = make_site(mask_kind="key_padding" if masked else None)
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [48, 30]) if masked else None
    module = AgentAttention(AgentConfig(selection=selection, shortcut_offsets=()), site)
    agents, sizes = module.agents(q, mask)
    weights = two_stage_weights(q, k, agents, sizes, None if mask is None else mask[:, 0, 0][:, None].expand(-1, 4, -1),
                                scale=SCALE, token_scale=SCALE * module.config.temperature)
    out = module(q, k, v, mask=mask, scale=SCALE)
    torch.testing.assert_close(out.double(), apply(weights, v), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    if masked:
        assert weights[1, :, :, 30:].abs().max() == 0


@pytest.mark.parametrize("selection", ["pool", "kmeans", "bipartite"])
def test_padded_tokens_change_nothing_in_valid_rows(selection):
    """Garbage in padded q, k, v positions never reaches a valid query's output (nor an agent)."""
    site = make_site(mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [48, 30])
    module = build_site_module(AgentConfig(selection=selection), site, example=(q, k, v, mask))
    reference = module(q, k, v, mask=mask, scale=SCALE)
    noisy_q, noisy_k, noisy_v = q.clone(), k.clone(), v.clone()
    for tensor in (noisy_q, noisy_k, noisy_v):
        tensor[1, :, 30:] = 1e3 * torch.randn_like(tensor[1, :, 30:])
    agents, sizes = module.agents(noisy_q, mask)
    assert agents[sizes > 0].abs().max() < 10  # no padded query (|x| ~ 1e3) inside any agent
    assert sizes[1].sum(-1).eq(30).all()
    out = module(noisy_q, noisy_k, noisy_v, mask=mask, scale=SCALE)
    torch.testing.assert_close(out[1, :, :30], reference[1, :, :30])
    torch.testing.assert_close(out[0], reference[0])


def test_additive_and_per_row_padding_masks_equal_the_boolean_key_mask():
    site = make_site(mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [40, 25])
    module = build_site_module(AgentConfig(), site)
    expected = module(q, k, v, mask=mask, scale=SCALE)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    per_row = mask.expand(2, 1, site.N, site.M)  # transformers' (B, 1, N, M) padding mask
    torch.testing.assert_close(module(q, k, v, mask=additive, scale=SCALE), expected)
    torch.testing.assert_close(module(q, k, v, mask=per_row, scale=SCALE), expected)


def test_mask_that_differs_per_query_is_rejected_at_run_time():
    site = make_site()
    q, k, v = tensors(site)
    module = build_site_module(AgentConfig(), site)
    causal_mask = torch.ones(site.N, site.M, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="differs between query rows"):
        module(q, k, v, mask=causal_mask, scale=SCALE)


def test_grouped_query_heads_read_their_kv_head():
    site = make_site(H=4, Hkv=2)
    q, k, v = tensors(site)
    module = build_site_module(AgentConfig(), site, example=(q, k, v, None))
    repeated = module(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), scale=SCALE)
    torch.testing.assert_close(module(q, k, v, scale=SCALE), repeated)


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_stays_close_to_float32(dtype, bound):
    site = make_site(mask_kind="key_padding", dtype=dtype)
    q, k, v = tensors(site, dtype=dtype)
    mask = padding_mask(2, site.M, [48, 30])
    module = build_site_module(AgentConfig(), site, example=(q, k, v, mask))
    out = module(q, k, v, mask=mask, scale=SCALE)
    assert out.dtype == dtype
    expected = module(q.float(), k.float(), v.float(), mask=mask, scale=SCALE)
    assert ((out.float() - expected).norm() / expected.norm()).item() < bound


def test_grid_pooling_averages_blocks_and_keeps_the_class_token():
    site = make_site(B=1, H=1, Hkv=1, N=17, M=17, grid=TokenGrid(4, 4, has_class_token=True))
    q, _, _ = tensors(site)
    module = AgentAttention(AgentConfig(selection="pool", agent_count=5, outlier_fraction=0), site)
    agents, sizes = module.agents(q, None)
    patches = q[0, 0, 1:].reshape(2, 2, 2, 2, -1)  # (block row, row in block, block col, col in block)
    blocks = patches.mean(dim=(1, 3)).reshape(4, -1)
    torch.testing.assert_close(agents[0, 0, 0], q[0, 0, 0])
    torch.testing.assert_close(agents[0, 0, 1:], blocks)
    assert sizes[0, 0].tolist() == [1, 4, 4, 4, 4]


def test_layout_infers_a_square_grid_only_when_asked():
    site = make_site(N=65, M=65)
    assert AgentConfig(agent_count=17).layout(65, site).grid is None
    layout = AgentConfig(agent_count=17, outlier_fraction=0, infer_grid=True).layout(65, site)
    assert (layout.grid, layout.rows, layout.cols, layout.n_agents) == (TokenGrid(8, 8, True), 4, 4, 17)
    layout = AgentConfig(agent_count=17, infer_grid=True).layout(65, site)  # 4 of them outliers
    assert (layout.rows, layout.cols, layout.n_outliers, layout.n_agents) == (3, 4, 4, 17)


def test_kmeans_lowers_the_distortion_of_pooling():
    x = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(3, 64, dtype=torch.bool)
    groups = pooled_groups(valid, 8)

    def distortion(centroids):
        return torch.cdist(x, centroids).min(-1).values.pow(2).sum()

    pooled, _ = group_means(x, groups, 8)
    clustered, sizes, _ = kmeans(x, valid, groups, 8, iterations=5)
    assert distortion(clustered) < 0.9 * distortion(pooled)
    assert sizes.sum(-1).eq(64).all()


def test_local_kmeans_with_a_window_over_all_agents_is_global_kmeans():
    site = make_site()
    q, k, v = tensors(site)
    local = AgentAttention(AgentConfig(kmeans_window=100), site).agents(q, None)
    full = AgentAttention(AgentConfig(kmeans_window=None), site).agents(q, None)
    torch.testing.assert_close(local, full)


def test_bipartite_merge_joins_duplicates_first():
    unique = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(2))
    x = unique.repeat_interleave(2, dim=1)  # each token twice, side by side
    means, sizes, groups = bipartite_merge(x, torch.ones(1, 16, dtype=torch.bool), 8)
    order = means[0, :, 0].argsort()
    torch.testing.assert_close(means[0, order], unique[0, unique[0, :, 0].argsort()])
    assert sizes.eq(2).all()
    torch.testing.assert_close(means.gather(1, groups.unsqueeze(-1).expand(-1, -1, 4)), x)  # each token's group


def test_distance_weighting_sends_each_query_to_its_nearest_agent():
    """Stage 2 prefers the nearest agent with distance weighting, the longest one without."""
    agents = torch.tensor([[[[1.0, 10.0], [4.0, -10.0]]]])  # agent 0 reads key 0, agent 1 key 1
    k = torch.tensor([[[[0.0, 1.0], [0.0, -1.0]]]])
    v = torch.eye(2)[None, None]
    q = torch.tensor([[[[1.2, 0.0]]]])  # nearer agent 0, but q·agent 1 is larger
    sizes = torch.ones(1, 1, 2)
    nearest, bias = agent_bias(agents, sizes, 1.0, distance_weighting=True, size_weighting=True)
    out = two_stage_attention(q, k, v, nearest, bias, None, scale=1.0, token_scale=1.0)
    assert out[0, 0, 0, 0] > 0.95
    longest, bias = agent_bias(agents, sizes, 1.0, distance_weighting=False, size_weighting=True)
    out = two_stage_attention(q, k, v, longest, bias, None, scale=1.0, token_scale=1.0)
    assert out[0, 0, 0, 1] > 0.95


def test_size_weighting_counts_an_agent_once_per_member_and_empty_agents_not_at_all():
    agents = torch.tensor([[[[0.0, 10.0], [0.0, -10.0], [5.0, 5.0]]]])
    k = torch.tensor([[[[0.0, 1.0], [0.0, -1.0]]]])
    v = torch.eye(2)[None, None]
    q = torch.zeros(1, 1, 1, 2)  # equally far from agents 0 and 1
    sizes = torch.tensor([[[3.0, 1.0, 0.0]]])
    filled, bias = agent_bias(agents, sizes, 1.0, distance_weighting=True, size_weighting=True)
    out = two_stage_attention(q, k, v, filled, bias, None, scale=1.0, token_scale=1.0)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.75, 0.25]), atol=1e-4, rtol=0)
    torch.testing.assert_close(filled[0, 0, 2], agents[0, 0, 0])  # the empty agent copies the largest


def test_calibrated_shortcut_recovers_a_previous_token_head():
    """Exact attention that reads token i−1: agents blur it, the calibrated shortcut restores it."""
    n_tokens = 32
    position = torch.eye(n_tokens)
    q = position.roll(1, dims=0)[None, None]  # query i matches key i−1 only
    k = position[None, None]
    v = torch.randn(1, 1, n_tokens, 4, generator=torch.Generator().manual_seed(3))
    site = make_site(B=1, H=1, Hkv=1, N=n_tokens, M=n_tokens, d=n_tokens, e=4, scale=40.0)
    plain = build_site_module(AgentConfig(shortcut_offsets=()), site, example=(q, k, v, None))
    shortcut = build_site_module(AgentConfig(), site, example=(q, k, v, None))
    assert relative_error(plain, q, k, v, None, 40.0) > 0.8
    assert relative_error(shortcut, q, k, v, None, 40.0) < 0.3  # row 0 wraps to key 31: no offset has it
    assert shortcut.shortcut.weights[0, 1] > 0.9  # the weight of offset −1


def test_refusals_name_the_reason():
    assert "causal" in refusal(AgentConfig(), make_site(causal=True, mask_kind="causal"))
    assert "differs between queries" in refusal(AgentConfig(), make_site(mask_kind="additive"))
    assert "dropout" in refusal(AgentConfig(), make_site(dropout=0.1))
    assert refusal(AgentConfig(), make_site(mask_kind="key_padding")) is None
    with pytest.raises(ValueError, match="causal"):
        build_site_module(AgentConfig(), make_site(causal=True))


def test_config_reports_its_agent_count_and_rejects_unknown_selection():
    site = make_site(N=400, M=400)
    assert AgentConfig(agent_fraction=0.25).n_agents(site) == 100
    assert AgentConfig(agent_fraction=0.25).layout(400, site).n_outliers == 20
    assert AgentConfig(agent_count=7).cost_params(site)["n_agents"] == 7
    with pytest.raises(ValueError, match="selection"):
        AgentConfig(selection="random")
    assert AgentLayout.for_tokens(10, 50, 0, None).n_agents == 10
    assert AgentLayout.for_tokens(400, 88, 20, None).n_agents == 88


def test_outliers_become_agents_of_their_own():
    x = torch.zeros(1, 12, 2)
    x[0, :, 0] = torch.arange(12.0) // 6  # two tight clusters at 0 and 1 ...
    x[0, 3, 1] = 5.0  # ... and one query far off
    groups = pooled_groups(torch.ones(1, 12, dtype=torch.bool), 2)
    centroids, _ = group_means(x, groups, 2)
    agents, sizes = split_outliers(x, torch.ones(1, 12, dtype=torch.bool), groups, centroids, 1)
    torch.testing.assert_close(agents[0], torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]]))
    assert sizes[0].tolist() == [5, 6, 1]


def test_bipartite_groups_follow_tokens_through_rounds_with_padding():
    x = torch.randn(2, 3, 21, 4, generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 3, 21, dtype=torch.bool)
    valid[1, :, 15:] = False
    means, sizes, groups = bipartite_merge(x, valid, 5)
    assert groups[~valid].eq(-1).all() and groups[valid].ge(0).all()
    recomputed, recomputed_sizes = group_means(x, groups, 5)
    torch.testing.assert_close(recomputed, means)
    torch.testing.assert_close(recomputed_sizes, sizes)
