"""Agent attention: equal to its dense N×M form, mask-safe, GQA, half precision, refusals."""

from __future__ import annotations

import pytest
import torch

from attnopt import costmodel
from attnopt.kernels import exact_attention
from attnopt.variants import AgentConfig, TokenGrid, build_site_module, refusal, relative_error, spec_for
from attnopt.variants.agent import AgentAttention, AgentLayout, stage_temperatures_cost
from attnopt.variants.clustering import (barred_centroids, bipartite_merge, first_max, group_means, index_add_rows,
                                         kmeans, nearest_groups, pooled_groups, pooled_runs_with_outliers,
                                         run_kmeans_with_outliers, run_sums, split_outliers)
from attnopt.variants.shortcut import ValueShortcut, shifted_values
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


def nearest_candidate_by_gathering(x, centroids, sizes, candidates):
    """The local assignment written the direct way: each token's W candidate centroids gathered,
    their distances reduced, empty ones barred, the first nearest (its first candidate if all empty)."""
    chosen = torch.stack([torch.stack([centroids[b, candidates[b, i]] for i in range(x.shape[1])])
                          for b in range(x.shape[0])])  # (R, N, W, d)
    scores = (x.unsqueeze(-2) * chosen).sum(-1) - 0.5 * chosen.pow(2).sum(-1)
    scores = scores.masked_fill(sizes.gather(-1, candidates.flatten(1)).view(candidates.shape) <= 0, float("-inf"))
    return candidates.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)


@pytest.mark.parametrize("seed", range(6))
def test_local_assignment_by_one_matmul_equals_gathering_each_tokens_candidates(seed):
    """nearest_groups scores every token against every centroid and bars those outside its
    candidates; it picks what gathering the candidates would, empty centroids and tokens whose
    candidates are all empty included."""
    generator = torch.Generator().manual_seed(seed)
    n_rows, n_tokens, n_centroids, dim = 3, 40 + 7 * seed, 9, 6
    window = [1, 3, 5, 9, 2, 4][seed]
    dtype = torch.float64 if seed % 2 else torch.float32
    x = torch.randn(n_rows, n_tokens, dim, generator=generator, dtype=dtype)
    centroids = torch.randn(n_rows, n_centroids, dim, generator=generator, dtype=dtype)
    sizes = torch.randint(0, 3, (n_rows, n_centroids), generator=generator).to(dtype)  # a third empty
    candidates = torch.stack([torch.randperm(n_centroids, generator=generator)[:window]
                              for _ in range(n_rows * n_tokens)]).view(n_rows, n_tokens, window)
    expected = nearest_candidate_by_gathering(x, centroids, sizes, candidates)
    actual = nearest_groups(x, centroids, sizes, barred_centroids(candidates, n_centroids), candidates[..., 0])
    assert torch.equal(actual, expected)


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
    plain = build_site_module(AgentConfig(agent_count=6, shortcut_offsets=()), site, example=(q, k, v, None))
    shortcut = build_site_module(AgentConfig(agent_count=6), site, example=(q, k, v, None))
    assert relative_error(plain, q, k, v, None, 40.0) > 0.8
    assert relative_error(shortcut, q, k, v, None, 40.0) < 0.3  # row 0 wraps to key 31: no offset has it
    assert shortcut.shortcut.weights[0, 1] > 0.9  # the weight of offset −1


def test_a_given_exact_output_is_the_shortcuts_target():
    """An example that carries the site's exact output (the planner passes the captured one) fits
    the shortcut to it instead of computing it again: the same weights when it is the exact output,
    other weights when it is something else."""
    site = make_site(mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [48, 30])
    exact = exact_attention(q, k, v, mask, scale=site.softmax_scale)
    computed = build_site_module(AgentConfig(), site, example=(q, k, v, mask))
    given = build_site_module(AgentConfig(), site, example=(q, k, v, mask, exact))
    torch.testing.assert_close(given.shortcut.weights, computed.shortcut.weights, rtol=0, atol=0)
    other = build_site_module(AgentConfig(), site, example=(q, k, v, mask, v.flip(2)))
    assert not torch.allclose(other.shortcut.weights, computed.shortcut.weights)


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
    assert AgentConfig(agent_fraction=0.25).layout(400, site).n_outliers == 16  # 5 % of N, at most max_outliers
    assert AgentConfig(agent_fraction=0.25, max_outliers=100).layout(400, site).n_outliers == 20
    assert AgentConfig().n_agents(site) == AgentConfig().n_agents(make_site(N=4096, M=4096)) == 64
    with pytest.raises(ValueError, match="not both"):
        AgentConfig(agent_count=8, agent_fraction=0.1)
    assert spec_for(AgentConfig()).cost_params(AgentConfig(agent_count=7), site)["n_agents"] == 7
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


@pytest.mark.parametrize("n_tokens, n_groups", [(12, 4), (13, 4), (64, 1), (100, 7), (5, 5), (4100, 64)])
@pytest.mark.parametrize("n_outliers", [0, 1, 3])
def test_pooling_runs_equals_pooled_groups_with_outliers(n_tokens, n_groups, n_outliers):
    """The fast 1-D pooling of unpadded tokens (reshape-sum or index_add) equals the general scatter path."""
    x = torch.randn(2, 3, n_tokens, 5, generator=torch.Generator().manual_seed(n_tokens), dtype=torch.float64)
    valid = torch.ones(2, 3, n_tokens, dtype=torch.bool)
    groups = pooled_groups(valid, n_groups)
    centroids, sizes = group_means(x, groups, n_groups)
    sums, run_sizes = run_sums(x, n_groups)
    torch.testing.assert_close(sums / run_sizes.unsqueeze(-1), centroids)
    torch.testing.assert_close(run_sizes.expand_as(sizes), sizes)
    expected_agents, expected_sizes = split_outliers(x, valid, groups, centroids, n_outliers)
    agents, agent_sizes = pooled_runs_with_outliers(x, n_groups, n_outliers)
    torch.testing.assert_close(agents, expected_agents)
    torch.testing.assert_close(agent_sizes, expected_sizes)


@pytest.mark.parametrize("n_tokens", [48, 50])
def test_unpadded_pool_selection_equals_the_general_path(n_tokens):
    """Without a mask, selection="pool" takes the run-pooling shortcut; an all-valid mask takes the
    general path. Agents, sizes and outputs agree."""
    site = make_site(N=n_tokens, M=n_tokens, mask_kind="key_padding")
    q, k, v = tensors(site)
    all_valid = padding_mask(2, n_tokens, [n_tokens, n_tokens])
    module = build_site_module(AgentConfig(selection="pool", agent_count=9, outlier_fraction=0.05), site,
                               example=(q, k, v, None))
    assert module.config.layout(n_tokens, site).n_outliers > 0
    fast, general = module.agents(q, None), module.agents(q, all_valid)
    torch.testing.assert_close(fast, general)
    torch.testing.assert_close(module(q, k, v, scale=SCALE), module(q, k, v, mask=all_valid, scale=SCALE))


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("key_valid_shape", [None, (2, 1, 10), (2, 4, 10)])
@pytest.mark.parametrize("offsets", [(-1, 0, 1), (-2, 3), (0,), (12, -10)])
def test_shortcut_equals_the_weighted_sum_of_its_features(kv_heads, key_valid_shape, offsets):
    """forward adds shifted slices in place; features (used to fit the weights) stacks them. Same sum."""
    generator = torch.Generator().manual_seed(5)
    shortcut = ValueShortcut(4, offsets)
    with torch.no_grad():
        shortcut.weights.copy_(torch.randn(shortcut.weights.shape, generator=generator))
    attention_out = torch.randn(2, 4, 10, 3, generator=generator, requires_grad=True)
    v = torch.randn(2, kv_heads, 10, 3, generator=generator, requires_grad=True)
    key_valid = None if key_valid_shape is None else torch.rand(key_valid_shape, generator=generator) > 0.3
    expected = (shortcut.features(attention_out, v, key_valid) * shortcut.weights[:, None, None, :]).sum(-1)
    actual = shortcut(attention_out, v, key_valid)
    torch.testing.assert_close(actual, expected)
    weights = torch.randn(actual.shape, generator=generator)
    inputs = (attention_out, v, shortcut.weights)
    grads = torch.autograd.grad((actual * weights).sum(), inputs, allow_unused=True)  # v is unused when
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)  # every offset is out of range
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(torch.zeros_like(want) if grad is None else grad, want)


def test_shortcut_overwrites_its_input_only_when_asked_and_nothing_needs_gradients():
    shortcut = ValueShortcut(2, (-1, 1))
    with torch.no_grad():
        shortcut.weights.copy_(torch.tensor([[0.5, 1.0, 2.0], [2.0, -1.0, 0.0]]))
        attention_out, v = torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 3)
        original = attention_out.clone()
        expected = shortcut(attention_out, v, None)
        torch.testing.assert_close(attention_out, original)
        reused = shortcut(attention_out, v, None, reuse_output=True)
        torch.testing.assert_close(reused, expected)
        assert reused.data_ptr() == attention_out.data_ptr()
    kept = original.clone().requires_grad_()
    shortcut(kept, v, None, reuse_output=True).sum().backward()  # needs gradients: no overwrite
    torch.testing.assert_close(kept.detach(), original)


def test_shifted_values_handle_offsets_beyond_the_sequence():
    values = torch.arange(5.0)[None, :, None]
    shifted = shifted_values(values, (-6, -5, -1, 0, 2, 5, 9))[0, :, 0]
    expected = torch.tensor([[0, 0, 0, 0, 2, 0, 0], [0, 0, 0, 1, 3, 0, 0], [0, 0, 1, 2, 4, 0, 0],
                             [0, 0, 2, 3, 0, 0, 0], [0, 0, 3, 4, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(shifted, expected)


@pytest.mark.parametrize("n_tokens, n_groups, window, iterations, n_outliers", [
    (64, 8, 3, 3, 2), (100, 7, 5, 2, 3), (48, 12, 17, 3, 3), (48, 45, 17, 3, 0), (4100, 64, 17, 3, 16),
    (50, 9, None, 3, 2), (13, 4, 100, 2, 1), (30, 6, 4, 2, 0), (30, 6, 4, 0, 3)])
def test_run_kmeans_equals_kmeans_on_pooled_groups_with_a_band_of_candidates(n_tokens, n_groups, window, iterations,
                                                                           n_outliers):
    """The blocked k-means of unpadded 1-D tokens (batched matmuls over runs) gives the agents of
    the general kmeans + split_outliers whose candidates are the band of runs around each token's own."""
    x = torch.randn(2, 3, n_tokens, 5, generator=torch.Generator().manual_seed(n_tokens), dtype=torch.float64)
    valid = torch.ones(2, 3, n_tokens, dtype=torch.bool)
    groups = pooled_groups(valid, n_groups)
    candidates = None
    if window is not None and window < 2 * n_groups - 1:  # out-of-range candidates repeat an edge run
        candidates = (groups.unsqueeze(-1) - (window - 1) // 2 + torch.arange(window)).clamp(0, n_groups - 1)
    centroids, _, final_groups = kmeans(x, valid, groups, n_groups, iterations, candidates)
    expected_agents, expected_sizes = split_outliers(x, valid, final_groups, centroids, n_outliers)
    agents, sizes = run_kmeans_with_outliers(x, n_groups, iterations, window, n_outliers)
    torch.testing.assert_close(agents, expected_agents)
    torch.testing.assert_close(sizes, expected_sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_first_max_is_the_first_argmax(dtype):
    """Ties (repeated candidates, rounded scores) go to the first; −inf never wins."""
    generator = torch.Generator().manual_seed(6)
    scores = torch.randn(5, 7, 40, generator=generator).to(dtype)
    scores[:, 3] = scores[:, 1]  # exact ties: candidate 1 wins
    scores[:, :, :10] = scores[:, :, :10].round().add_(0.0)  # many ties (and no −0, as first_max needs)
    scores[0, :2] = float("-inf")
    scores[1, :, 5] = scores[1, :, 5].clamp_max(0.0)  # +0 the max
    expected = scores.float().argmax(-2)
    key, top = first_max(scores.clone())
    assert torch.equal(7 - key.long(), expected)
    torch.testing.assert_close(top.squeeze(-2), scores.amax(-2))


def test_index_add_rows_sums_as_index_add_with_more_threads(monkeypatch):
    """With more than one thread an int32 index takes index_add_'s serial loop: the same sums."""
    generator = torch.Generator().manual_seed(7)
    source, index = torch.randn(300, 5, generator=generator), torch.randint(0, 20, (300,), generator=generator)
    expected = torch.zeros(20, 5).index_add_(0, index, source)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    torch.testing.assert_close(index_add_rows(torch.zeros(20, 5), index, source), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_tokens, window", [(100, 5), (96, 5), (100, None)])
def test_run_kmeans_agents_do_not_depend_on_the_thread_count(monkeypatch, n_tokens, window):
    x = torch.randn(2, 3, n_tokens, 8, generator=torch.Generator().manual_seed(8))
    one_thread = run_kmeans_with_outliers(x, 12, 3, window, 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for expected, actual in zip(one_thread, run_kmeans_with_outliers(x, 12, 3, window, 4)):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("position", [0, 50, 99])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("window", [5, None])
def test_run_kmeans_keeps_rows_apart_when_a_query_is_not_finite(position, value, window):
    """A NaN or inf query spoils its own row's agents only (rows of x share one centroid table)."""
    x = torch.randn(2, 3, 100, 8, generator=torch.Generator().manual_seed(9))
    x[0, 1, position] = value
    agents, sizes = run_kmeans_with_outliers(x, 12, 3, window, 4)
    for rows in ((0, [0, 2]), (1, slice(None))):
        alone, alone_sizes = run_kmeans_with_outliers(x[rows], 12, 3, window, 4)
        assert torch.equal(agents[rows], alone) and torch.equal(sizes[rows], alone_sizes)


def test_default_agent_count_is_fixed_and_selection_work_linear_in_n():
    """64 agents at any N (cost linear in N); the candidate grid is absolute counts up to N/2."""
    spec = spec_for(AgentConfig())
    flops = [costmodel.flops(spec.formula(AgentConfig(), make_site(B=1, H=6, N=n, M=n, d=64, e=64)),
                             {"B": 1, "H": 6, "Hkv": 6, "N": n, "M": n, "d": 64, "e": 64}) for n in (4096, 16384)]
    assert flops[1] < 4.1 * flops[0]
    assert [c.agent_count for c in spec.candidates(make_site(N=300, M=300))] == [16, 32, 64, 128]
    assert [c.agent_count for c in spec.candidates(make_site(N=20, M=20))] == []


@pytest.mark.parametrize("masked", [False, True])
def test_stage_temperatures_equal_the_dense_form_at_each_head_s_scales(masked):
    """τ₁ scales stage 1's logits by exp(τ₁), τ₂ stage 2's (distance weighting included), per head."""
    site = make_site(H=4, Hkv=2, mask_kind="key_padding" if masked else None)
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [48, 30]) if masked else None
    module = AgentAttention(AgentConfig(selection="pool", shortcut_offsets=()), site)
    with torch.no_grad():
        module.stage1_log_temperature.copy_(torch.tensor([0.5, -0.7, 0.0, 1.2]))
        module.stage2_log_temperature.copy_(torch.tensor([-1.0, 0.3, 0.8, 0.0]))
        out = module(q, k, v, mask=mask, scale=SCALE)
    agents, sizes = module.agents(q, mask)
    key_valid = None if mask is None else mask[:, 0, 0][:, None].expand(-1, 4, -1)
    token_scale = SCALE * module.config.temperature
    for head in range(4):
        one = slice(head, head + 1)
        weights = two_stage_weights(q[:, one], k[:, head // 2:head // 2 + 1], agents[:, one], sizes[:, one],
                                    None if key_valid is None else key_valid[:, one],
                                    scale=SCALE * module.stage1_log_temperature[head].exp().item(),
                                    token_scale=token_scale * module.stage2_log_temperature[head].exp().item())
        torch.testing.assert_close(out[:, one].double(), apply(weights, v[:, head // 2:head // 2 + 1]),
                                   rtol=1e-4, atol=1e-5)


def test_temperatures_at_one_are_skipped_and_give_exactly_the_training_free_output():
    """Before calibration (τ = 0) inference skips both scalings; with gradients they run and
    change nothing; fitted, they run in inference too."""
    from attnopt.candidates import KernelCounter

    site = make_site(H=4, Hkv=2)
    q, k, v = tensors(site)
    module = build_site_module(AgentConfig(), site, example=(q, k, v, None))
    assert [name for name, _ in module.named_parameters()] == [
        "stage1_log_temperature", "stage2_log_temperature", "shortcut.weights"]
    assert module.calibration_parameters() == list(module.parameters())
    with torch.no_grad(), KernelCounter() as skipped:
        inference = module(q, k, v, scale=SCALE)
    with_gradients = module(q, k, v, scale=SCALE)
    assert with_gradients.requires_grad and torch.equal(with_gradients, inference)
    with torch.no_grad():
        module.stage2_log_temperature[1] = 0.5
        with KernelCounter() as applied:
            fitted = module(q, k, v, scale=SCALE)
    assert applied.calls > skipped.calls and not torch.equal(fitted, inference)


def test_calibrating_selects_the_agents_of_a_query_once(monkeypatch):
    """Inside `calibrating` the agents of a query seen before (that tensor unchanged, or an equal
    one with an equal key mask) are reused; anything else is selected anew."""
    site = make_site(mask_kind="key_padding")
    q, k, v = tensors(site)
    mask = padding_mask(2, site.M, [48, 30])
    module = build_site_module(AgentConfig(), site, example=(q, k, v, mask))
    calls = []
    selects = AgentAttention.agents
    monkeypatch.setattr(AgentAttention, "agents", lambda self, *args: calls.append(1) or selects(self, *args))
    reference = module(q, k, v, mask=mask, scale=SCALE)
    with module.calibrating():
        for query in (q, q, q.clone(), q.index_select(1, torch.arange(4))):
            torch.testing.assert_close(module(query, k, v, mask=mask, scale=SCALE), reference, rtol=0, atol=0)
        assert len(calls) == 2  # once outside, once inside
        module(q, k, v, mask=padding_mask(2, site.M, [48, 31]), scale=SCALE)
        other = 2 * q
        module(other, k, v, mask=mask, scale=SCALE)
        assert len(calls) == 4  # another mask, another query
        other.add_(1)  # changed in place: not the query it was
        module(other, k, v, mask=mask, scale=SCALE)
        assert len(calls) == 5
        other.copy_(q)  # now equal to q
        torch.testing.assert_close(module(other, k, v, mask=mask, scale=SCALE), reference, rtol=0, atol=0)
        assert len(calls) == 5
    assert module._remembered is None
    module(q, k, v, mask=mask, scale=SCALE)
    assert len(calls) == 6


def test_temperatures_are_priced_as_a_pass_over_the_queries_and_the_agents_without_flops():
    site = make_site(N=64, M=64)
    n_agents = spec_for(AgentConfig()).cost_params(AgentConfig(), site)["n_agents"]
    extra = costmodel.evaluate(stage_temperatures_cost(n_agents), site.shape)
    assert extra.flops == 0 and extra.elementwise_ops == site.B * site.H * (site.N + n_agents) * site.d
