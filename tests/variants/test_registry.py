"""The config → spec table, build/refusal dispatch, relative_error and SiteInfo helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnopt.variants import (
    AgentConfig,
    ExactConfig,
    LinearConfig,
    MediatorConfig,
    SiteInfo,
    TokenGrid,
    VariantSpec,
    build_site_module,
    config_for,
    infer_grid,
    mask_kind_of,
    register_variant,
    relative_error,
    spec_for,
    spec_named,
)

from .support import make_site, padding_mask, tensors


def test_each_config_type_has_its_own_spec():
    names = {config: spec_for(config()).name for config in (ExactConfig, AgentConfig, LinearConfig, MediatorConfig)}
    assert names == {ExactConfig: "exact", AgentConfig: "agent", LinearConfig: "linear", MediatorConfig: "mediator"}
    assert all(spec_named(name).config_type is config for config, name in names.items())
    assert config_for("agent", agent_fraction=0.5) == AgentConfig(agent_fraction=0.5)


def test_unknown_configs_and_duplicate_registrations_are_errors():
    @dataclasses.dataclass(frozen=True)
    class NoSuchConfig:
        pass

    with pytest.raises(TypeError, match="NoSuchConfig"):
        spec_for(NoSuchConfig())
    with pytest.raises(KeyError, match="flash"):
        config_for("flash")
    taken_name = dataclasses.replace(spec_named("agent"), config_type=NoSuchConfig)
    taken_config = dataclasses.replace(spec_named("agent"), name="agent2")
    for spec in (taken_name, taken_config):
        with pytest.raises(ValueError, match="already registered"):
            register_variant(spec)
    with pytest.raises(TypeError, match="NoSuchConfig"):
        spec_for(NoSuchConfig())  # a refused registration leaves nothing behind
    assert isinstance(spec_named("agent"), VariantSpec)


def test_build_refuses_with_the_reason():
    with pytest.raises(ValueError, match="causal"):
        build_site_module(MediatorConfig(), make_site(causal=True))


def test_exact_module_is_exact_and_relative_error_skips_fully_masked_rows():
    site = make_site(mask_kind="boolean")
    q, k, v = tensors(site)
    mask = torch.ones(2, 1, 48, 48, dtype=torch.bool)
    mask[0, :, 5] = False  # query 5 of batch 0 sees no key: NaN in softmax attention
    exact = build_site_module(ExactConfig(), site)
    assert relative_error(exact, q, k, v, mask, 0.25) == 0.0
    agent_site = make_site(mask_kind="key_padding")
    agent = build_site_module(AgentConfig(), agent_site)
    error = relative_error(agent, q, k, v, padding_mask(2, 48, [48, 30]), 0.25)
    assert 0.01 < error < 1.0


def test_site_info_defaults_and_grid_inference():
    site = SiteInfo.from_shape({"B": 2, "H": 8, "N": 197, "d": 64}, causal=False)
    assert (site.Hkv, site.M, site.e, site.softmax_scale, site.is_self_attention) == (8, 197, 64, 0.125, True)
    assert infer_grid(197) == TokenGrid(14, 14, True)
    assert infer_grid(196) == TokenGrid(14, 14, False)
    assert infer_grid(200) is None


def test_mask_kind_of_names_concrete_masks():
    padding = padding_mask(2, 6, [6, 4])
    lower = torch.ones(6, 6, dtype=torch.bool).tril()
    additive_padding = torch.zeros(2, 1, 1, 6).masked_fill(~padding, float("-inf"))
    assert mask_kind_of(None) is None
    assert mask_kind_of(padding) == "key_padding"
    assert mask_kind_of(padding.expand(2, 1, 6, 6)) == "key_padding"  # transformers' expanded form
    assert mask_kind_of(lower & padding) == "causal"
    assert mask_kind_of(additive_padding + torch.zeros(6, 6).masked_fill(~lower, float("-inf"))) == "causal"
    assert mask_kind_of(lower & ~torch.ones(6, 6, dtype=torch.bool).tril(-2)) == "boolean"  # sliding window
    assert mask_kind_of(torch.randn(6, 6)) == "additive"
