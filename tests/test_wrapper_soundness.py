"""The wrapper is what it says: one backend per torch.compile call, no dynamo state left behind by
dropped rewrites, copies and pickles that own their weights, hooks that run, and clear errors
for bad inputs, bad variant parameters and unusable cache folders."""

from __future__ import annotations

import copy
import gc
import io
import math
import pathlib
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.guards import DeletedGuardManagerWrapper
from torch._dynamo.resume_execution import ContinueExecutionCache

import attnopt
from attnopt import capture, costmodel
from attnopt.costmodel import DeviceProfile
from attnopt.kernels import kernel_cache
from attnopt.variants import AgentConfig, LinearConfig, MediatorConfig, MediatorSchedule, mediator_count

PROFILE = DeviceProfile(name="test CPU", matmul_flops_per_s=1e11, bandwidth_bytes_per_s=2e10,
                        elementwise_ops_per_s=2e9, call_overhead_s=2e-6)
FEW = [AgentConfig(agent_fraction=0.1, selection="pool"), LinearConfig(feature_map="elu1"),
       MediatorConfig(n_mediators=16)]
WIDTH, HEADS = 32, 2


def attention(x: torch.Tensor, qkv: nn.Linear, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    batch, n, dim = x.shape
    q, k, v = qkv(x).view(batch, n, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(dim // HEADS) + bias).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(batch, n, dim)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(attention(x, self.qkv))


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class GraphBreaking(TwoBlocks):
    """A Python branch on a tensor's value between the blocks: dynamo captures two graphs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        x = x * 0.5 if x.sum().item() > 0 else x - 1.0
        return self.blocks[1](x)


class BiasedAttention(nn.Module):
    """No parameters: the heads come from the input, an additive bias from a buffer."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = k = v = x.view(*x.shape[:2], HEADS, WIDTH // HEADS).transpose(1, 2)
        return F.softmax(q @ k.transpose(-2, -1) * 0.25 + self.bias, dim=-1) @ v


class WithUnusedArgument(Block):
    def forward(self, x: torch.Tensor, unused=None) -> torch.Tensor:
        return super().forward(x)


def tokens(n: int = 8, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, n, WIDTH)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def seeded(factory, seed: int):
    torch.manual_seed(seed)
    return factory().eval()


# ── A: one backend, one report per torch.compile call ─────────────────────────────────────────


@pytest.mark.slow
def test_each_torch_compile_call_plans_and_reports_its_own_model():
    """m1 attends uniformly (q = k = 0), so linear attention is exact for it; m2's attention is
    not. With one backend shared by options, m2 ran under m1's plan and report."""
    m1, m2 = seeded(TwoBlocks, 0), seeded(TwoBlocks, 1)
    with torch.no_grad():
        for block in m1.blocks:
            block.qkv.weight[: 2 * WIDTH].zero_()
            block.qkv.bias[: 2 * WIDTH].zero_()
    x = tokens(128)
    options = {"budget": attnopt.Budget(max_error=0.05), "candidates": FEW, "device": PROFILE}
    c1 = torch.compile(m1, backend="attnopt", options=dict(options))
    c2 = torch.compile(m2, backend="attnopt", options=dict(options))
    with torch.no_grad():
        out1, out2 = c1(x), c2(x)
        expected1, expected2 = m1(x), m2(x)
    r1, r2 = attnopt.report_of(c1), attnopt.report_of(c2)
    assert r1 is not r2
    assert len(r1.sites) == len(r2.sites) == 2 and len(r1.plans) == len(r2.plans) == 1
    assert all(site.decision.variant != "softmax" for site in r1.sites)
    assert relative(out1, expected1) == pytest.approx(r1.plans[0].output_error, rel=1e-3, abs=1e-6)
    assert all(site.decision.variant == "softmax" for site in r2.sites)
    torch.testing.assert_close(out2, expected2)


def test_parameter_free_models_compiled_separately_keep_separate_reports():
    x = tokens()
    models = [BiasedAttention(torch.zeros(8, 8)), BiasedAttention(torch.randn(8, 8) * 3)]
    compiled = [torch.compile(model, backend="attnopt") for model in models]
    with torch.no_grad():
        for model, call in zip(models, compiled):
            torch.testing.assert_close(call(x), model(x))
    reports = [attnopt.report_of(call) for call in compiled]
    assert reports[0] is not reports[1]
    assert [len(report.sites) for report in reports] == [1, 1]
    assert [report.graphs for report in reports] == [1, 1]
    assert [report.sites[0].decision.variant for report in reports] == ["exact", "exact"]


@pytest.mark.slow
def test_a_recompile_stays_on_the_backend_of_its_compiled_model():
    m1, m2 = seeded(TwoBlocks, 0), seeded(TwoBlocks, 1)
    c1, c2 = torch.compile(m1, backend="attnopt"), torch.compile(m2, backend="attnopt")
    with torch.no_grad():
        c1(tokens(8))
        c2(tokens(8))
        c1(tokens(12, batch=3))
    r1, r2 = attnopt.report_of(c1), attnopt.report_of(c2)
    assert {site.signature for site in r1.sites} == {"2x8x32", "3x12x32"}
    assert {site.signature for site in r2.sites} == {"2x8x32"}


@pytest.mark.slow
def test_separately_compiled_instances_beyond_the_recompile_limit_are_all_rewritten():
    limit = torch._dynamo.config.recompile_limit
    x = tokens()
    reports = []
    for seed in range(limit + 2):
        model = seeded(Block, seed)
        call = torch.compile(model, backend="attnopt")
        with torch.no_grad():
            torch.testing.assert_close(call(x), model(x))
        reports.append(attnopt.report_of(call))
    assert all(len(report.sites) == 1 and report.sites[0].decision.variant == "exact" for report in reports)
    assert len({id(report) for report in reports}) == len(reports)


def test_report_of_raises_for_anything_attnopt_did_not_compile_or_has_not_run():
    model, x = seeded(Block, 0), tokens()
    with torch.no_grad():
        torch.compile(seeded(Block, 1), backend="attnopt")(x)  # an attnopt backend exists meanwhile
        eager = torch.compile(model, backend="eager")
        eager(x)
    for foreign in (model, eager, nn.Linear(2, 2)):
        with pytest.raises(attnopt.AttnoptError, match="not produced by attnopt"):
            attnopt.report_of(foreign)
    with pytest.raises(attnopt.AttnoptError, match="has not run yet"):
        attnopt.report_of(torch.compile(model, backend="attnopt"))


@pytest.mark.slow
def test_a_dropped_compiled_model_frees_its_backend():
    call = torch.compile(seeded(Block, 0), backend="attnopt")
    with torch.no_grad():
        call(tokens())
    report = weakref.ref(attnopt.report_of(call))
    del call
    gc.collect()
    assert report() is None


# ── B: no dynamo state left behind ────────────────────────────────────────────────────────────


def _codes_of(model: nn.Module) -> list:
    """The model's forward and the resume functions dynamo made from it."""
    forward = type(model).forward.__code__
    return [forward] + list(ContinueExecutionCache.cache.get(forward, {}).values())


def _live_entries(code) -> int:
    return sum(not isinstance(entry.guard_manager, DeletedGuardManagerWrapper)
               for entry in _debug_get_cache_entry_list(code))


def _live_entries_on_attnopt_code() -> int:
    return sum(_live_entries(code) for code in capture._compiled_codes() if code.co_filename == capture.__file__)


@pytest.mark.slow
def test_dropped_rewrites_leave_no_cache_entries_and_change_nothing_for_torch_compile():
    model, x = seeded(GraphBreaking, 0), tokens()
    gc.collect()
    live_before = _live_entries_on_attnopt_code()  # rewrites other tests still hold
    dropped = []
    for _ in range(20):
        rewritten = attnopt.rewrite(model, "exact", args=(x,))
        dropped.append(weakref.ref(rewritten))
        del rewritten
    gc.collect()
    assert all(ref() is None for ref in dropped)
    codes = _codes_of(model)
    assert len(codes) == 2  # forward and its resume function, each compiled by every rewrite
    assert [_live_entries(code) for code in codes] == [0, 0]
    assert all(len(_debug_get_cache_entry_list(code)) <= 1 for code in codes)
    assert _live_entries_on_attnopt_code() == live_before

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=counting_backend)(x), model(x))
    assert len(graphs) == 2
    again = attnopt.rewrite(model, "exact", args=(x,))
    assert len(attnopt.report_of(again).sites) == 2
    assert [_live_entries(code) for code in codes] == [2, 2]  # the user's compile and this rewrite


def test_a_dropped_rewrite_frees_its_backend():
    rewritten = attnopt.rewrite(seeded(Block, 0), "exact", args=(tokens(),))
    report = weakref.ref(attnopt.report_of(rewritten))
    del rewritten
    gc.collect()
    assert report() is None


# ── C: copies, pickles and hooks ──────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_a_deep_copy_owns_and_uses_its_own_weights():
    model, x = seeded(TwoBlocks, 0), tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    twin = copy.deepcopy(rewritten)
    with torch.no_grad():
        before = rewritten(x)
        torch.testing.assert_close(twin(x), before)
        twin.model.blocks[0].proj.weight.mul_(2.0)
        torch.testing.assert_close(twin(x), twin.model(x))
        assert relative(twin(x), before) > 1e-2
        torch.testing.assert_close(rewritten(x), before)
        model.blocks[1].proj.weight.mul_(3.0)
        torch.testing.assert_close(rewritten(x), model(x))
        torch.testing.assert_close(twin(x), twin.model(x))
    assert attnopt.report_of(twin) is not attnopt.report_of(rewritten)
    assert [site.decision.variant for site in attnopt.report_of(twin).sites] == ["exact", "exact"]


@pytest.mark.slow
@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_a_pickled_rewrite_loads_as_a_working_rewrite_of_its_own_weights(save):
    model, x = seeded(TwoBlocks, 0), tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    if save == "pickle":
        loaded = pickle.loads(pickle.dumps(rewritten))
    else:
        buffer = io.BytesIO()
        torch.save(rewritten, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, attnopt.AttnoptModule) and loaded.model is not model
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert [site.decision.variant for site in attnopt.report_of(loaded).sites] == ["exact", "exact"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["blocks.1", "blocks.0.proj"])
def test_a_forward_hook_registered_after_the_rewrite_runs(where):
    """Dynamo guards on the hooks of the modules it inlined (built-in ones included): the call recompiles."""
    model, x = seeded(TwoBlocks, 0), tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x,))
    hooked = model.get_submodule(where)
    calls = []

    def halve(module, inputs, output):
        calls.append(module)
        return output * 0.5

    handle = hooked.register_forward_hook(halve)
    with torch.no_grad():
        out = rewritten(x)
        assert calls == [hooked]
        torch.testing.assert_close(out, model(x))
        handle.remove()
        torch.testing.assert_close(rewritten(x), model(x))
    assert len(calls) == 2  # the rewrite's call and the eager reference, not the call after removal
    # the example, the hooked call and the call after removal each compiled and rewrote a graph
    sites = attnopt.report_of(rewritten).sites
    assert len({site.graph for site in sites}) == 3 and all(site.decision.variant == "exact" for site in sites)


# ── D: clear errors ───────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("verb", ["inspect", "rewrite", "optimize"])
def test_a_bare_tensor_as_args_is_named(verb):
    model, x = seeded(Block, 0), tokens()
    call = {"inspect": lambda: attnopt.inspect(model, args=x),
            "rewrite": lambda: attnopt.rewrite(model, "exact", args=x),
            "optimize": lambda: attnopt.optimize(model, 0.5, args=x, device=PROFILE)}[verb]
    with pytest.raises(attnopt.AttnoptError, match=r"`args` must be a tuple .*got Tensor"):
        call()


def test_an_unused_argument_may_change_between_calls():
    """A call with a new signature that dynamo serves with a compiled graph it already has (it
    does not guard every argument the model never reads) ran that graph: it is not eager."""
    model, x = seeded(WithUnusedArgument, 0), tokens()
    rewritten = attnopt.rewrite(model, "exact", args=(x, torch.zeros(3)))
    with torch.no_grad():
        for unused in (torch.zeros(5, 2), None, "text", 3):
            torch.testing.assert_close(rewritten(x, unused), model(x))
    sites = attnopt.report_of(rewritten).sites
    assert sites and all(site.decision.variant == "exact" for site in sites)


def test_a_model_that_runs_no_graph_is_still_refused():
    class Uncompilable(Block):
        @torch._dynamo.disable
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(attnopt.AttnoptError, match="dynamo ran this call eagerly"):
        attnopt.rewrite(Uncompilable().eval(), "exact", args=(tokens(),))


@pytest.mark.parametrize("variant, params, name", [
    ("agent", {"kmeans_window": 0}, "kmeans_window"),
    ("agent", {"agent_count": 2.5}, "agent_count"),
    ("agent", {"kmeans_iterations": 1.5}, "kmeans_iterations"),
    ("agent", {"temperature": float("nan")}, "temperature"),
    ("agent", {"agent_fraction": True}, "agent_fraction"),
    ("agent", {"shortcut_offsets": (0.5,)}, "shortcut_offsets"),
    ("mediator", {"n_mediators": 2.5}, "n_mediators"),
    ("mediator", {"n_mediators": "8"}, "n_mediators"),
    ("mediator", {"kmeans_iterations": -1}, "kmeans_iterations"),
    ("linear", {"power": 0}, "power"),
    ("linear", {"eps": -1e-6}, "eps"),
    ("agent", {"d": 0}, "'d'"),
])
def test_nonsense_variant_parameters_are_named(variant, params, name):
    with pytest.raises(attnopt.AttnoptError, match=f"bad parameters for the {variant} variant: .*{name}"):
        attnopt.rewrite(seeded(Block, 0), variant, **params)


def test_a_non_integer_mediator_count_is_named():
    with pytest.raises(ValueError, match="mediator_count must be an integer"):
        with mediator_count(2.5):
            pass
    with pytest.raises(ValueError, match="mediator count must be an integer"):
        MediatorSchedule(((0, 16), (500, 7.5)))
    with pytest.raises(ValueError, match="n_mediators must be an integer"):
        MediatorConfig(n_mediators=16.0)


def _file_as_cache_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "not-a-folder"
    target.write_text("a file where the cache folder should be")
    return target


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes fail as on a read-only folder (chmod does not stop root, who runs some CI)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    monkeypatch.setattr(kernel_cache.tempfile, "mkstemp", refuse)


KERNEL_TEXT = 'def double(x):\n    """A stand-in for a generated kernel module."""\n    return 2 * x\n'


@pytest.mark.parametrize("damage", ["cache dir is a file", "read-only", "folder in the entry's place"])
def test_an_unusable_cache_folder_keeps_kernels_in_memory(tmp_path, monkeypatch, damage):
    import inspect

    monkeypatch.setattr(kernel_cache, "_loaded", {})
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    if damage == "cache dir is a file":
        monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(_file_as_cache_dir(tmp_path)))
    elif damage == "read-only":
        _read_only(monkeypatch)
    else:
        kernel_cache.entry_path(KERNEL_TEXT).mkdir(parents=True)
    with pytest.warns(UserWarning, match="could not store a generated kernel module"):
        module = kernel_cache.load_module(KERNEL_TEXT)
    assert module.double(21) == 42
    assert "stand-in" in inspect.getsource(module.double)


@pytest.mark.parametrize("damage", ["cache dir is a file", "read-only", "folder in the entry's place"])
def test_an_unusable_cache_folder_keeps_the_device_profile_in_memory(tmp_path, monkeypatch, damage):
    measured = []
    monkeypatch.setattr(costmodel, "measure_device", lambda device, dtype: measured.append(device) or PROFILE)
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    if damage == "cache dir is a file":
        monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(_file_as_cache_dir(tmp_path)))
    elif damage == "read-only":
        _read_only(monkeypatch)
    else:
        costmodel.cache_path(torch.device("cpu")).mkdir(parents=True)
    with pytest.warns(UserWarning, match="could not save the device profile"):
        assert costmodel.device_profile("cpu") == PROFILE
    assert costmodel.device_profile("cpu") == PROFILE
    assert len(measured) == 1  # kept in memory, not measured again


@pytest.mark.slow
def test_optimize_runs_when_its_device_profile_cannot_be_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(costmodel, "measure_device", lambda device, dtype: PROFILE)
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(_file_as_cache_dir(tmp_path)))
    model, x = seeded(TwoBlocks, 0), tokens(64)
    with pytest.warns(UserWarning, match="could not save the device profile"):
        fast = attnopt.optimize(model, attnopt.Budget(max_error=0.05), args=(x,), candidates=FEW)
    assert len(attnopt.report_of(fast).sites) == 2


def test_rewrite_under_inference_mode_with_an_input_written_in_place():
    """Inference tensors keep no version counter: what the graph writes is read from the graph."""
    class WritesItsMask(nn.Module):
        def forward(self, q, k, v, mask):
            mask.add_(0.0)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.inference_mode():
        q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., -2:] = float("-inf")
        rewritten = attnopt.rewrite(WritesItsMask(), "exact", args=(q, k, v, mask))
        torch.testing.assert_close(rewritten(q, k, v, mask), WritesItsMask()(q, k, v, mask), rtol=1e-5, atol=1e-6)
    (site,) = attnopt.report_of(rewritten).sites
    assert site.decision.variant == "exact"
