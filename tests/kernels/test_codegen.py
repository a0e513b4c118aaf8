"""The code generator: specialised text per configuration, valid Python, clear errors."""

from __future__ import annotations

import ast

import pytest

from attnopt.kernels import source


def _kernel_names(text: str) -> list[str]:
    return [node.name for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)]


def test_each_op_module_holds_its_kernels():
    assert _kernel_names(source("exact_attention", head_dim=64, value_dim=64)) == ["exact_attention_kernel"]
    assert _kernel_names(source("agent_attention", head_dim=64, value_dim=64, agent_block=64)) == [
        "agent_stage1_kernel",
        "agent_stage2_kernel",
    ]
    assert _kernel_names(source("linear_attention", head_dim=64, value_dim=64)) == [
        "feature_map",
        "linear_state_kernel",
        "linear_output_kernel",
    ]


def test_same_configuration_gives_identical_text_and_any_change_gives_other_text():
    base = dict(head_dim=64, value_dim=64, dtype="bfloat16", causal=True, mask="bool")
    assert source("exact_attention", **base) == source("exact_attention", **base)
    variations = [dict(causal=False), dict(mask="additive"), dict(dtype="float16"), dict(head_dim=128), dict(block_n=32)]
    texts = {source("exact_attention", **{**base, **change}) for change in variations}
    assert len(texts) == len(variations) and source("exact_attention", **base) not in texts


def test_mask_dims_that_broadcast_are_left_out_of_the_address_arithmetic():
    per_key = source("exact_attention", head_dim=32, value_dim=32, mask="bool", mask_broadcast=(False, True, True, False))
    assert "batch * stride_mb" in per_key and "head * stride_mh" not in per_key and "offs_m * stride_mn" not in per_key
    full = source("exact_attention", head_dim=32, value_dim=32, mask="additive")
    assert all(term in full for term in ("batch * stride_mb", "head * stride_mh", "offs_m * stride_mn", "offs_n * stride_mk"))
    assert "Mask" not in source("exact_attention", head_dim=32, value_dim=32).split('"""softmax')[1]


def test_causal_kernels_stop_at_the_diagonal_and_others_do_not():
    causal = source("exact_attention", head_dim=32, value_dim=32, causal=True, block_m=128)
    assert "tl.minimum(n_keys, (query_block + 1) * 128)" in causal and "offs_n[None, :] <= offs_m[:, None]" in causal
    assert "<= offs_m" not in source("exact_attention", head_dim=32, value_dim=32)


def test_scores_stay_in_natural_units_only_where_masks_or_fills_may_reach_the_fp32_range():
    """×log2(e) would overflow a finfo.min fill or mask to -inf: such kernels scale the difference."""
    for mask in ("none", "bool"):
        folded = source("exact_attention", head_dim=32, value_dim=32, mask=mask)
        assert "score_scale = scale * 1.44" in folded and "tl.exp2(scores - shift[:, None])" in folded
    for config in (dict(mask="additive"), dict(fill=True)):
        natural = source("exact_attention", head_dim=32, value_dim=32, **config)
        assert "score_scale = scale\n" in natural and "tl.exp2((scores - shift[:, None]) * 1.44" in natural


def test_exact_masking_flags_each_write_only_their_own_code():
    plain = source("exact_attention", head_dim=32, value_dim=32, mask="additive")
    assert "FillMask" not in plain and "round_to_sum_dtype" not in plain and "row_sum[:, None] == 0" not in plain
    filled = source("exact_attention", head_dim=32, value_dim=32, fill=True, fill_broadcast=(False, True, True, False))
    assert "tl.where(filled != 0, fill_value, scores)" in filled and "batch * stride_fb" in filled
    assert "head * stride_fh" not in filled and "offs_m * stride_fn" not in filled
    for dtype, rounding in (("float16", "x.to(tl.float16)"), ("bfloat16", "bits >> 16")):
        rounded = source("exact_attention", head_dim=32, value_dim=32, mask="additive", mask_sum_dtype=dtype)
        assert rounding in rounded and "round_to_sum_dtype(round_to_sum_dtype(scores) + bias" in rounded
    assert "round_to_sum_dtype" not in source("exact_attention", head_dim=32, value_dim=32, mask="bool", mask_sum_dtype="float16")
    assert "tl.where(row_sum[:, None] == 0, 0.0, acc / row_sum[:, None])" in source(
        "exact_attention", head_dim=32, value_dim=32, zero_empty_rows=True
    )


def test_padding_masks_appear_only_for_head_dims_that_are_not_tile_widths():
    assert "offs_d[None, :] < 24" in source("exact_attention", head_dim=24, value_dim=32)
    assert "offs_d[None, :] <" not in source("exact_attention", head_dim=32, value_dim=32)


def test_fp32_inputs_use_ieee_dots_and_half_inputs_native_ones():
    assert 'input_precision="ieee"' in source("exact_attention", head_dim=32, value_dim=32, dtype="float32")
    assert "input_precision" not in source("exact_attention", head_dim=32, value_dim=32, dtype="bfloat16")
    assert 'input_precision="tf32"' in source("linear_attention", head_dim=32, value_dim=32, dtype="bfloat16")


@pytest.mark.parametrize(
    "feature_map, power, expected",
    [
        ("elu1", 3.0, "tl.where(x > 0, x + 1.0, tl.exp(x))"),
        ("relu", 3.0, "tl.maximum(x, 0.0)"),
        ("identity", 3.0, "return x"),
        ("focused", 3.0, "y_pow = y * y * y"),
        ("focused", 2.5, "tl.exp2(2.5 * tl.log2("),
    ],
)
def test_linear_feature_map_is_written_into_the_module(feature_map, power, expected):
    assert expected in source("linear_attention", head_dim=16, value_dim=16, feature_map=feature_map, power=power)


def test_linear_specialisations_add_only_what_they_need():
    plain = source("linear_attention", head_dim=16, value_dim=16)
    assert "ValueSum +" not in plain and "KeyMask +" not in plain and "key_features" not in plain
    full = source("linear_attention", head_dim=16, value_dim=16, normalization="inline", causal=True, key_mask=True)
    assert "ValueSum +" in full and "KeyMask +" in full and "key_features" in full


def test_linear_feature_scale_multiplies_each_loaded_tile_and_one_writes_nothing():
    base = dict(head_dim=16, value_dim=16, causal=True)
    assert source("linear_attention", **base, feature_scale=1.0) == source("linear_attention", **base)
    scaled = source("linear_attention", **base, feature_scale=0.375)
    assert scaled.count("feature_map(k.to(tl.float32) * 0.375)") == 2
    assert scaled.count("feature_map(q.to(tl.float32) * 0.375)") == 1


@pytest.mark.parametrize(
    "op, config, error",
    [
        ("softmax", dict(head_dim=16, value_dim=16), "unknown op"),
        ("exact_attention", dict(head_dim=16, value_dim=16, mask="float"), "unknown mask"),
        ("exact_attention", dict(head_dim=16, value_dim=16, dtype="float64"), "unknown dtype"),
        ("exact_attention", dict(head_dim=16, value_dim=16, mask="additive", mask_sum_dtype="float64"), "unknown mask_sum_dtype"),
        ("linear_attention", dict(head_dim=16, value_dim=16, feature_map="softmax"), "unknown feature_map"),
        ("exact_attention", dict(head_dim=16, value_dim=16, n_agents=4), "n_agents"),
        ("linear_attention", dict(head_dim=16, value_dim=16, feature_scale=float("inf")), "feature_scale"),
    ],
)
def test_unknown_ops_and_options_are_rejected(op, config, error):
    with pytest.raises((ValueError, TypeError), match=error):
        source(op, **config)
