"""Mediator attention: dense form, example-based init, counts from context and schedule."""

from __future__ import annotations

import pytest
import torch

from attnopt.variants import (
    MediatorConfig,
    MediatorSchedule,
    build_site_module,
    mediator_count,
    mediator_timestep,
    refusal,
)

from .dense import apply, two_stage_weights
from .support import make_site, padding_mask, tensors

SCALE = 0.25
SCHEDULE = MediatorSchedule(((0, 16), (500, 8), (800, 4)))


def built(config=None, site=None, mask=None, seed=0):
    site = site or make_site(mask_kind="key_padding")
    q, k, v = tensors(site, seed)
    config = config or MediatorConfig(n_mediators=16, schedule=SCHEDULE, shortcut_offsets=())
    return build_site_module(config, site, example=(q, k, v, mask)), (q, k, v)


@pytest.mark.parametrize("count", [16, 5])
def test_output_equals_dense_form_with_the_first_mediators(count):
    mask = padding_mask(2, 48, [48, 30])
    module, (q, k, v) = built(mask=mask)
    mediators, log_sizes = module.tokens_for(count)
    torch.testing.assert_close(mediators, module.mediators[:, :count])
    batch_mediators = mediators.unsqueeze(0).expand(2, -1, -1, -1)
    weights = two_stage_weights(q, k, batch_mediators, log_sizes.exp().unsqueeze(0).expand(2, -1, -1),
                                mask[:, 0, 0][:, None].expand(-1, 4, -1), scale=SCALE, token_scale=SCALE * 4.0)
    with mediator_count(count):
        out = module(q, k, v, mask=mask, scale=SCALE)
    torch.testing.assert_close(out.double(), apply(weights, v), rtol=1e-4, atol=1e-5)
    assert weights[1, :, :, 30:].abs().max() == 0


def test_folded_sizes_keep_the_total_count_of_example_queries():
    module, _ = built(mask=padding_mask(2, 48, [48, 30]))
    for count in (16, 7, 1):
        assert torch.allclose(module.tokens_for(count)[1].exp().sum(-1), torch.full((4,), 78.0))


def test_initialisation_is_deterministic_and_ignores_padded_queries():
    mask = padding_mask(2, 48, [48, 30])
    first, (q, k, v) = built(mask=mask)
    second, _ = built(mask=mask)
    torch.testing.assert_close(first.mediators, second.mediators)
    noisy_q = q.clone()
    noisy_q[1, :, 30:] = 1e3
    third = build_site_module(first.config, first.site_info, example=(noisy_q, k, v, mask))
    torch.testing.assert_close(third.mediators, first.mediators)


def test_first_mediator_is_the_largest_cluster():
    module, _ = built(config=MediatorConfig(n_mediators=8, shortcut_offsets=()))
    assert torch.equal(module.log_sizes.argmax(-1), torch.zeros(4, dtype=torch.long))


def test_count_follows_context_and_schedule():
    config = MediatorConfig(n_mediators=12, schedule=SCHEDULE)
    assert config.count() == 12
    with mediator_timestep(torch.tensor([900, 900])):
        assert config.count() == 4
        with mediator_count(10):
            assert config.count() == 10
        with mediator_timestep(600.0):
            assert config.count() == 8
        assert config.count() == 4
    with mediator_timestep(100):
        assert config.count() == 12  # the schedule says 16, capped at n_mediators
    assert MediatorConfig(n_mediators=12).count() == 12
    with mediator_timestep(900):
        assert MediatorConfig(n_mediators=12).count() == 12  # no schedule: the timestep changes nothing


def test_output_changes_with_the_timestep():
    module, (q, k, v) = built()
    with mediator_timestep(100):
        many = module(q, k, v, scale=SCALE)
    with mediator_timestep(900):
        few = module(q, k, v, scale=SCALE)
    with mediator_count(4):
        torch.testing.assert_close(module(q, k, v, scale=SCALE), few)
    assert (many - few).abs().max() > 1e-3


def test_schedule_validation_and_lookup():
    assert [SCHEDULE.count_at(t) for t in (-5, 0, 499, 500, 799, 800, 999)] == [16, 16, 16, 8, 8, 4, 4]
    with pytest.raises(ValueError):
        MediatorSchedule(((500, 8), (0, 16)))
    with pytest.raises(ValueError):
        MediatorSchedule(((0, 0),))
    with pytest.raises(ValueError, match="one timestep"):
        with mediator_timestep(torch.tensor([1, 2])):
            pass


def test_mediators_and_sizes_are_trainable():
    module, (q, k, v) = built()
    module(q, k, v, scale=SCALE).pow(2).sum().backward()
    assert module.mediators.grad.abs().sum() > 0 and module.log_sizes.grad.abs().sum() > 0


def test_refusals_name_the_reason():
    assert "causal" in refusal(MediatorConfig(), make_site(causal=True))
    assert "differs between queries" in refusal(MediatorConfig(), make_site(mask_kind="boolean"))
    assert "dropout" in refusal(MediatorConfig(), make_site(dropout=0.1))


def test_an_example_smaller_than_the_mediator_set_is_an_error():
    site = make_site(B=1, N=10, M=10, mask_kind="key_padding")
    q, k, v = tensors(site)
    with pytest.raises(ValueError, match="fewer than n_mediators=16"):
        build_site_module(MediatorConfig(n_mediators=16), site, example=(q, k, v, None))
