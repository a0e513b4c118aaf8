"""Real loops: the module `rewrite`/`optimize` return stands in for the model (attributes,
methods, `generate`, state dicts), decode steps share their analysis, and `report_of` finds the
report of every way of compiling with the attnopt backend."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import attnopt
from attnopt.costmodel import DeviceProfile
from attnopt.variants import LinearConfig

WIDTH, HEADS = 32, 2
PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.note = "a user attribute"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(dim // HEADS)).softmax(-1)
        return x + self.proj((weights @ v).transpose(1, 2).reshape(batch, n, dim))

    def twice(self, x: torch.Tensor) -> torch.Tensor:
        """A method that calls the model: through a rewrite, it runs the rewritten forward."""
        return self(self(x))

    def remember(self, value: int) -> None:
        self.remembered = value


def tokens(n: int = 8, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, n, WIDTH)


def seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory().eval()




# ── the returned module stands in for the model ───────────────────────────────────────────────


def test_the_rewrite_forwards_the_models_attributes_and_methods(exact_op_calls):
    model, x = seeded(Block), tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    assert rewritten.note == "a user attribute"
    assert rewritten.qkv is model.qkv
    with pytest.raises(AttributeError, match="no_such_thing"):
        rewritten.no_such_thing  # noqa: B018
    assert not hasattr(rewritten, "__no_such_dunder__")
    with torch.no_grad():
        torch.testing.assert_close(rewritten.twice(x), model.twice(x))  # compiles for no_grad
        before = exact_op_calls[0]
        torch.testing.assert_close(rewritten.twice(x), model.twice(x))
    assert exact_op_calls[0] - before == 2  # both calls inside the method ran the rewritten graph
    rewritten.remember(7)  # what a method sets, it sets on the model
    assert model.remembered == 7 and rewritten.remembered == 7


def test_a_half_built_rewrite_raises_attribute_errors_not_recursion():
    shell = attnopt.AttnoptModule.__new__(attnopt.AttnoptModule)
    for name in ("model", "anything", "_attnopt_call", "__deepcopy__"):
        with pytest.raises(AttributeError):
            getattr(shell, name)


def test_a_deep_copy_of_a_rewrite_still_forwards_to_its_own_model():
    model, x = seeded(Block), tokens()
    twin = copy.deepcopy(attnopt.rewrite(model, "exact", args=(x,)))
    assert twin.note == "a user attribute" and twin.qkv is not model.qkv
    with torch.no_grad():
        torch.testing.assert_close(twin.twice(x), model.twice(x))


def test_the_state_dict_is_the_models_and_the_models_loads_into_it():
    model, x = seeded(Block), tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    assert list(rewritten.state_dict()) == list(model.state_dict())
    other = seeded(Block, 1)
    assert rewritten.load_state_dict(other.state_dict()) is not None
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), other(x))
        torch.testing.assert_close(model.qkv.weight, other.qkv.weight)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        rewritten.load_state_dict({**other.state_dict(), "model.qkv.weight": other.qkv.weight})


def test_a_rewrite_inside_a_larger_module_saves_and_loads_the_models_keys():
    model, x = seeded(Block), tokens()
    outer = nn.Sequential(attnopt.rewrite(model, "exact", args=(x,)), nn.Linear(WIDTH, WIDTH))
    plain = nn.Sequential(seeded(Block, 1), nn.Linear(WIDTH, WIDTH))
    assert list(outer.state_dict()) == list(plain.state_dict())
    outer.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(outer(x), plain(x))


# ── decode loops ──────────────────────────────────────────────────────────────────────────────


def test_growing_lengths_are_analysed_once_per_power_of_two_bucket(exact_op_calls):
    model = seeded(Block)
    rewritten = attnopt.rewrite(model, "exact")
    lengths = range(5, 34)
    with torch.no_grad():
        for n in lengths:
            x = tokens(n, batch=1)
            torch.testing.assert_close(rewritten(x), model(x))
    report = attnopt.report_of(rewritten)
    analysed = {site.signature for site in report.sites}
    # dynamo: one static graph, then sizes made dynamic; attnopt: one analysis per bucket at most
    assert report.graphs <= 3
    assert len(analysed) <= 2 + len({1 << (n - 1).bit_length() for n in lengths})
    assert all(site.decision.variant == "exact" for site in report.sites)
    assert exact_op_calls[0] >= len(lengths)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config)


@pytest.mark.slow
@pytest.mark.parametrize("factory", [_tiny_llama, _tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_generate_on_a_rewrite_gives_the_original_tokens_through_attnopt(factory, exact_op_calls):
    model = seeded(factory)
    prompt = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    new = 24
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    rewritten = attnopt.rewrite(model, "exact")
    assert rewritten.config is model.config
    assert rewritten.device == model.device and rewritten.dtype == model.dtype
    assert rewritten.get_input_embeddings() is model.get_input_embeddings()
    with torch.no_grad():
        actual = rewritten.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert torch.equal(actual, expected)
    layers = model.config.num_hidden_layers
    assert exact_op_calls[0] >= new * layers  # every step ran attnopt's op at every layer
    report = attnopt.report_of(rewritten)
    sites, analysed = len(report.sites), {site.signature for site in report.sites}
    assert report.graphs <= 3  # prefill, first decode step, then one graph with a symbolic KV length
    assert len(analysed) <= 6  # not one per step: KV lengths 6..30 fall in a few power-of-two buckets
    assert all(site.decision.variant == "exact" for site in report.sites)
    with torch.no_grad():
        again = rewritten.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert torch.equal(again, expected)
    assert attnopt.report_of(rewritten).graphs == report.graphs and len(report.sites) == sites


@pytest.mark.slow
def test_an_unmet_budget_warns_once_per_model():
    model = seeded(Block)
    fast = attnopt.optimize(model, attnopt.Budget(time=1e-3), candidates=[LinearConfig(feature_map="elu1")],
                            device=PROFILE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for n in (16, 24, 40):
                fast(tokens(n))
    budget_warnings = [w for w in caught if issubclass(w.category, attnopt.BudgetNotMetWarning)]
    assert len(budget_warnings) == 1
    plans = attnopt.report_of(fast).plans
    assert len(plans) == 3 and not any(plan.budget_met for plan in plans)


# ── report_of and torch.compile's arguments ───────────────────────────────────────────────────


def test_report_of_a_module_compiled_in_place():
    model, x = seeded(Block), tokens()
    model.compile(backend="attnopt")
    with pytest.raises(attnopt.AttnoptError, match="has not run yet"):
        attnopt.report_of(model)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.forward(x))
    report = attnopt.report_of(model)
    assert [site.decision.variant for site in report.sites] == ["exact"]
    eager = seeded(Block)
    eager.compile(backend="eager")
    with pytest.raises(attnopt.AttnoptError, match="not produced by attnopt"):
        attnopt.report_of(eager)


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead", "default"])
def test_torch_compile_takes_a_mode_and_ignores_it(mode):
    model, x = seeded(Block), tokens()
    compiled = torch.compile(model, backend="attnopt", mode=mode)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert [site.decision.variant for site in attnopt.report_of(compiled).sites] == ["exact"]


def test_torch_compile_passes_dynamic_and_fullgraph_to_dynamo():
    model, x = seeded(Block), tokens()
    compiled = torch.compile(model, backend="attnopt", dynamic=True, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        y = tokens(12)
        torch.testing.assert_close(compiled(y), model(y))
    report = attnopt.report_of(compiled)
    # one graph with symbolic sizes, analysed at each call's concrete sizes
    assert report.graphs == 1 and len(report.sites) >= 1
