"""Hybrid attention (exact sinks + window, linear elsewhere, one normaliser): the state form equals
the dense N×N oracle (1-D and grid windows, causal or not, GQA, masks, dtypes), is exact softmax
attention when the window and sinks cover every key, refuses what it cannot follow, and beats
linear attention where the model's attention is local."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from attnopt.kernels import exact_attention, hybrid_reference
from attnopt.kernels.hybrid_reference import (
    hybrid_attention_quadratic,
    hybrid_attention_reference,
    hybrid_weights,
    tiling,
)
from torch import nn

import attnopt
from attnopt.variants import (
    HybridConfig,
    TokenGrid,
    build_site_module,
    refusal,
    spec_for,
)

from .support import make_site, padding_mask, tensors

SCALE = 0.25

SHAPES = {  # N, sinks, window, grid
    "1-D": (37, 1, 8, None),
    "1-D no sinks": (37, 0, 5, None),
    "1-D sinks inside the window": (37, 6, 9, None),
    "grid with class token": (50, 2, 9, TokenGrid(7, 7, True)),
    "grid": (49, 0, 16, TokenGrid(7, 7, False)),
    "wide grid": (40, 1, 12, TokenGrid(4, 10, False)),
}


def _run(site, config, q, k, v, mask=None, causal=None):
    causal = site.causal if causal is None else causal
    return build_site_module(config, site)(q, k, v, mask=mask, scale=SCALE, causal=causal)


def _dense(site, config, q, k, v, key_valid=None, causal=None):
    grid = None if site.grid is None else (site.grid.height, site.grid.width, site.grid.has_class_token)
    return hybrid_attention_quadratic(q, k, v, scale=SCALE, sinks=config.sinks, window=config.window, grid=grid,
                                      feature_map=config.feature_map, power=config.power, mix=config.mix,
                                      causal=site.causal if causal is None else causal, key_mask=key_valid)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "padded"])
def test_state_form_equals_the_dense_oracle(shape, causal, masked):
    """GQA (4 query heads on 2 kv heads); causal calls ignore the grid (their window looks back)."""
    n_tokens, sinks, window, grid = SHAPES[shape]
    site = make_site(B=2, H=4, Hkv=2, N=n_tokens, M=n_tokens, d=8, e=6, causal=causal, grid=grid,
                     mask_kind="key_padding" if masked else None)
    q, k, v = tensors(site, seed=3)
    mask = padding_mask(2, n_tokens, [n_tokens, n_tokens - 9]) if masked else None
    if masked:
        mask[0, ..., 4] = False  # a hole, inside some windows and sinks
    config = HybridConfig(sinks=sinks, window=window)
    out = _run(site, config, q, k, v, mask)
    expected = _dense(site, config, q, k, v, None if mask is None else mask[:, 0, 0])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_map", ["relu", "focused"])
@pytest.mark.parametrize("mix", [0.0, 0.3, 5.0])
def test_other_feature_maps_and_mixes_equal_the_dense_oracle(feature_map, mix):
    site = make_site(B=1, H=2, Hkv=1, N=70, M=70, d=8, e=4)
    q, k, v = tensors(site, seed=4)
    config = HybridConfig(sinks=2, window=16, feature_map=feature_map, mix=mix)
    for causal in (False, True):
        torch.testing.assert_close(_run(site, config, q, k, v, causal=causal).double(),
                                   _dense(site, config, q, k, v, causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32_and_keep_their_dtype(dtype):
    site = make_site(B=2, H=4, Hkv=2, N=40, M=40, d=16, e=8)
    q, k, v = tensors(site, seed=5, dtype=dtype)
    config = HybridConfig(sinks=1, window=8)
    for causal in (False, True):
        out = _run(site, config, q, k, v, causal=causal)
        assert out.dtype == dtype
        expected = _dense(site, config, q, k, v, causal=causal)  # from the same half inputs, in float64
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_large_scores_either_way_stay_finite_and_exact():
    """Every exact score very negative (e^{-m} alone would overflow in fp32) or very positive."""
    site = make_site(B=1, H=2, Hkv=2, N=48, M=48, d=16, e=8)
    q, k, v = tensors(site, seed=6)
    config = HybridConfig(sinks=1, window=8)
    for factor in (-30.0, 30.0):
        q_far = q.abs() * factor
        k_far = k.abs()
        out = _run(site, config, q_far, k_far, v)
        assert out.isfinite().all()
        torch.testing.assert_close(out.double(), _dense(site, config, q_far, k_far, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["", "padded"])
@pytest.mark.parametrize("causal, sinks, window", [(False, 0, 48), (False, 1, 200), (True, 0, 48), (True, 8, 40)])
def test_equals_exact_softmax_where_window_and_sinks_cover_every_key(causal, masked, sinks, window):
    """Bidirectional windows hold min(window, N) keys, so they cover every key once window ≥ N;
    causal ones cover j ≤ i once window + sinks ≥ N (the sinks fill in the start)."""
    site = make_site(B=2, H=4, Hkv=2, N=48, M=48, d=16, e=8, causal=causal)
    q, k, v = tensors(site, seed=7)
    mask = padding_mask(2, 48, [48, 30]) if masked else None
    out = _run(site, HybridConfig(sinks=sinks, window=window), q, k, v, mask)
    expected = exact_attention(q, k, v, mask, scale=SCALE, causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_equals_exact_softmax_where_the_grid_window_covers_the_grid():
    site = make_site(B=2, H=2, Hkv=2, N=37, M=37, d=8, e=8, grid=TokenGrid(6, 6, True))
    q, k, v = tensors(site, seed=8)
    out = _run(site, HybridConfig(sinks=1, window=36), q, k, v)
    torch.testing.assert_close(out, exact_attention(q, k, v, scale=SCALE), rtol=1e-5, atol=1e-5)


def test_masked_keys_get_no_weight_and_their_values_change_nothing():
    site = make_site(B=2, H=2, Hkv=2, N=48, M=48, d=8, e=8, mask_kind="key_padding")
    q, k, v = tensors(site, seed=9)
    mask = padding_mask(2, 48, [48, 30])
    weights = hybrid_weights(q, k, scale=SCALE, sinks=1, window=8, key_mask=mask[:, 0, 0])
    assert (weights[1, :, :, 30:] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    config = HybridConfig(sinks=1, window=8)
    out = _run(site, config, q, k, v, mask)
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[1, :, 30:], noisy_v[1, :, 30:] = 1e3, -1e3
    torch.testing.assert_close(_run(site, config, q, noisy_k, noisy_v, mask)[1, :, :30], out[1, :, :30])


def test_mask_spellings_of_padding_and_causality_agree():
    site = make_site(B=2, H=2, Hkv=2, N=40, M=40, d=8, e=8, causal=True, mask_kind="causal")
    q, k, v = tensors(site, seed=10)
    config = HybridConfig(sinks=1, window=8)
    padding = padding_mask(2, 40, [40, 25])
    expected = _run(site, config, q, k, v, padding)
    additive = torch.zeros(2, 1, 1, 40).masked_fill(~padding, float("-inf"))
    torch.testing.assert_close(_run(site, config, q, k, v, additive), expected)
    tril = torch.ones(40, 40, dtype=torch.bool).tril() & padding
    torch.testing.assert_close(_run(site, config, q, k, v, tril), expected)
    with pytest.raises(ValueError, match="more than causality"):
        _run(site, config, q, k, v, tril & ~torch.ones(40, 40, dtype=torch.bool).tril(-8))


def test_masks_it_cannot_follow_are_rejected_when_called():
    site = make_site(B=2, H=2, Hkv=2, N=40, M=40, d=8, e=8, mask_kind="key_padding")
    q, k, v = tensors(site, seed=11)
    config = HybridConfig(sinks=1, window=8)
    with pytest.raises(ValueError, match="other than 0 and -inf"):
        _run(site, config, q, k, v, torch.randn(2, 1, 1, 40))
    per_head = torch.ones(2, 2, 1, 40, dtype=torch.bool)
    per_head[:, 1, :, -3:] = False
    with pytest.raises(ValueError, match="differs between heads"):
        _run(site, config, q, k, v, per_head)
    with pytest.raises(ValueError, match="query rows"):
        _run(site, config, q, k, v, torch.rand(40, 40) > 0.3)
    with pytest.raises(ValueError, match="dropout"):
        build_site_module(config, site)(q, k, v, scale=SCALE, dropout_p=0.1)
    with pytest.raises(ValueError, match="N == M"):
        build_site_module(config, site)(q, k[:, :, :30], v[:, :, :30], scale=SCALE)


@pytest.mark.parametrize("site, reason", [
    (make_site(N=48, M=40), "cross-attention"),
    (make_site(mask_kind="boolean"), "differs between queries"),
    (make_site(mask_kind="additive"), "differs between queries"),
    (make_site(dropout=0.1), "dropout"),
])
def test_refusals(site, reason):
    assert reason in refusal(HybridConfig(), site)


def test_sites_it_stands_in_for():
    for site in (make_site(), make_site(causal=True, mask_kind="causal"), make_site(mask_kind="key_padding")):
        assert refusal(HybridConfig(), site) is None


@pytest.mark.parametrize("field, value", [("sinks", -1), ("window", 0), ("window", 2.5), ("feature_map", "learned"),
                                          ("mix", -0.1), ("mix", float("nan")), ("power", 0.0)])
def test_config_checks_its_fields(field, value):
    with pytest.raises(ValueError, match=field):
        HybridConfig(**{field: value})


def test_default_candidates_are_small_windows_of_self_attention_only():
    candidates = spec_for(HybridConfig()).candidates
    assert candidates(make_site(N=64, M=64)) == [HybridConfig(sinks=0, window=16), HybridConfig(sinks=1, window=16)]
    assert len(candidates(make_site(N=197, M=197))) == 4
    assert candidates(make_site(N=24, M=24)) == []
    assert candidates(make_site(N=197, M=100)) == []


def test_cost_follows_the_tiles_the_call_uses():
    """Priced as the module computes: the window clipped to N, a grid's patch window (its class token
    one global row; bands gathered), a causal window looking back (no grid), each in `tiling`'s tiles."""
    spec, config = spec_for(HybridConfig()), HybridConfig(sinks=1, window=10)
    one_d = {"sinks": 1, "feature_map": "elu1", "n_global": 0, "gathered": False, "causal": False}
    assert spec.cost_params(config, make_site(N=64, M=64)) == one_d | {"tile": 16, "band": 25, "padding": 0}
    assert spec.cost_params(config, make_site(N=70, M=70))["padding"] == 10  # 5 tiles of 16
    grid_site = make_site(N=65, M=65, grid=TokenGrid(8, 8, True))
    plan = tiling(65, 10, (8, 8, True))
    assert (plan.rows, plan.cols) == (3, 3)
    assert spec.cost_params(config, grid_site) == one_d | {
        "tile": plan.tile_size, "band": plan.band_size, "padding": plan.n_tiles * plan.tile_size - 64, "n_global": 1,
        "gathered": True}
    assert spec.cost_params(config, dataclasses.replace(grid_site, causal=True)) == one_d | {
        "tile": 10, "band": 19, "padding": 5, "causal": True}
    # 64 keys per window; tiles of 32 queries, whose band also holds the first tile's windows, shifted
    assert spec.cost_params(HybridConfig(window=500), make_site(N=64, M=64))["band"] == 32 + 63 + 1


def _oracle_case(n_tokens, sinks, window, grid, causal, empty_row=True):
    """GQA (6 query heads on 2 kv heads), three batch rows: padded, with a hole, and every key masked
    (or, without empty_row, none)."""
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(3, 6, n_tokens, 8, generator=generator)
    k, v = torch.randn(3, 2, n_tokens, 8, generator=generator), torch.randn(3, 2, n_tokens, 5, generator=generator)
    key_valid = torch.ones(3, n_tokens, dtype=torch.bool)
    key_valid[0, n_tokens * 2 // 3:] = False
    key_valid[1, min(2, n_tokens - 1)] = False
    key_valid[2] = not empty_row
    options = {"scale": SCALE, "sinks": sinks, "window": window, "grid": grid, "causal": causal, "key_mask": key_valid,
               "mix": 0.7}
    return q, k, v, options


@pytest.mark.parametrize("tile", [1, 3, 5, 16])
@pytest.mark.parametrize("n_tokens, window", [(5, 3), (37, 8), (37, 2), (37, 15), (37, 40), (64, 33), (40, 200)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_every_1d_tiling_equals_the_dense_oracle(monkeypatch, tile, n_tokens, window, causal):
    """Tiles shorter and longer than half the window (the bands then hold the windows shifted at
    both ends), N not a multiple of the tile, N < window; sinks 0, 1 and 4, some inside the window."""
    monkeypatch.setattr(hybrid_reference, "TILE_RANGE", (tile, tile))
    for sinks in (0, 1, 4):
        q, k, v, options = _oracle_case(n_tokens, sinks, window, None, causal)
        torch.testing.assert_close(hybrid_attention_reference(q, k, v, **options).double(),
                                   hybrid_attention_quadratic(q, k, v, **options), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(4, 10, False), (10, 4, True), (7, 7, True)], ids=str)
@pytest.mark.parametrize("tile", [(1, 1), (1, 3), (2, 3), (3, 2), (2, 10), (4, 1), (4, 4)], ids=str)
def test_every_grid_tiling_equals_the_dense_oracle(monkeypatch, grid, tile):
    """Tiles of whole rows (queries in order) or not (gathered and put back), padded at the grid's
    far edges, bands clamped inside it; with and without a class token."""
    tile = min(tile[0], grid[0]), min(tile[1], grid[1])
    monkeypatch.setattr(hybrid_reference, "_grid_tile", lambda *shape: tile)
    n_tokens = grid[0] * grid[1] + int(grid[2])
    for sinks, window in ((0, 4), (2, 9), (1, 16)):
        q, k, v, options = _oracle_case(n_tokens, sinks, window, grid, False)
        torch.testing.assert_close(hybrid_attention_reference(q, k, v, **options).double(),
                                   hybrid_attention_quadratic(q, k, v, **options), rtol=1e-5, atol=1e-5)


def _gradients(attention, q, k, v, options):
    """Gradients of a weighted sum of the output in q, k, v and log α (α = 0.7·e^{log α}: what
    calibration fits), in float64."""
    inputs = [x.double().requires_grad_() for x in (q, k, v)]
    log_mix = torch.zeros((), dtype=torch.float64, requires_grad=True)
    out = attention(*inputs, **options | {"mix": 0.7 * log_mix.exp()})
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    (out * weights).sum().backward()
    return [x.grad for x in (*inputs, log_mix)]


@pytest.mark.parametrize("grid, causal", [(None, False), (None, True), ((5, 6, True), False)], ids=str)
def test_gradients_equal_the_dense_oracles(grid, causal):
    """Autograd through the tiles (out of place) matches autograd through the dense weights; no
    gradient is NaN where a row sees no key or has no linear part (causal: its first keys)."""
    q, k, v, options = _oracle_case(31, 2, 6, grid, causal, empty_row=False)
    for ours, dense in zip(_gradients(hybrid_attention_reference, q, k, v, options),
                           _gradients(hybrid_attention_quadratic, q, k, v, options)):
        torch.testing.assert_close(ours, dense, rtol=1e-9, atol=1e-11)
    q, k, v, options = _oracle_case(31, 2, 6, grid, causal)
    assert all(gradient.isfinite().all() for gradient in _gradients(hybrid_attention_reference, q, k, v, options))


def test_the_in_place_inference_path_equals_the_autograd_one():
    """Without autograd the score blocks are reused in place; with it, every step is out of place."""
    for grid, causal in ((None, False), (None, True), ((5, 6, True), False)):
        q, k, v, options = _oracle_case(31, 2, 6, grid, causal)
        with torch.no_grad():
            expected = hybrid_attention_reference(q, k, v, **options)
        torch.testing.assert_close(hybrid_attention_reference(q.requires_grad_(), k, v, **options).detach(),
                                   expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("grid, causal", [(None, False), (None, True), ((6, 6, True), False)], ids=str)
def test_the_state_form_compiles_with_inductor(grid, causal):
    """Traced whole (fullgraph) and compiled by Inductor, gathered grid bands included."""
    torch._dynamo.reset()
    q, k, v, options = _oracle_case(37, 2, 4, grid, causal)
    compiled = torch.compile(hybrid_attention_reference, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, **options).double(), hybrid_attention_quadratic(q, k, v, **options),
                               rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


class LocalAttention(nn.Module):
    """SDPA whose q and k carry a positional code with a dot product peaked at i = j: local attention."""

    def __init__(self, dim: int = 32, heads: int = 2, n_tokens: int = 64, sharpness: float = 2.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        angle = torch.arange(n_tokens)[:, None] * torch.linspace(0.05, 1.2, self.head_dim // 2)[None, :]
        self.register_buffer("pos", sharpness * torch.cat([angle.cos(), angle.sin()], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, n_tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q + self.pos, k + self.pos, v)
        return self.out(y.transpose(1, 2).reshape(batch, n_tokens, -1))


@pytest.mark.slow
def test_rewrite_into_hybrid_beats_linear_attention_where_attention_is_local():
    torch.manual_seed(0)
    model = LocalAttention().eval()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        expected = model(x)

    def error(variant: str, **params) -> float:
        rewritten = attnopt.rewrite(model, variant, args=(x,), **params)
        assert [site.decision.variant for site in attnopt.report_of(rewritten).sites] == [variant]
        with torch.no_grad():
            out = rewritten(x)
        assert out.isfinite().all()
        return ((out - expected).norm() / expected.norm()).item()

    hybrid, linear = error("hybrid", sinks=1, window=16), error("linear", feature_map="elu1")
    assert hybrid < 0.5 * linear, (hybrid, linear)
    assert math.isfinite(hybrid)
