"""Set before anything imports Triton: on a machine without an NVIDIA GPU, Triton's interpreter.

Triton's standard library (tl.zeros, tl.max, ...) is built in interpreter mode or not when
`triton.language` is first imported, and `import torch._dynamo` (so `import attnopt`) imports it.
The kernel tests run the generated kernels in the interpreter, so the mode must be fixed here,
at the root of the test session, before any test module is collected — not in
tests/kernels/conftest.py, which pytest imports only after the detection tests' modules.
"""

import os
import warnings
from pathlib import Path

import pytest

if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny tensors, where intra-op threads only wait for each other: on a shared
# two-core machine, threads spinning at OpenMP barriers made some tests 5x slower. One thread
# (set before torch is imported) unless the caller chose a number.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Hypothesis profiles for the property-based soundness suite (tests/soundness). Nothing loads
# them globally: tests/soundness uses "soundness" unless `--hypothesis-profile=NAME` picks
# another (e.g. `--hypothesis-profile=soak` for a long run); other tests keep their own settings.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_SOUNDNESS_COMMON = dict(
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # the suite records every case, never shrinks
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
# CI's run, reproducible: about 1100 cases (600 generated programs) in about five minutes on two CPU cores.
settings.register_profile("soundness", max_examples=600, derandomize=True, database=None, **_SOUNDNESS_COMMON)
# Long runs: thousands of cases, new draws every run.
settings.register_profile("soak", max_examples=4000, derandomize=False, database=None, **_SOUNDNESS_COMMON)


# ── Two tiers: `python -m pytest -q` runs everything (CI); `-m "not slow"` is the inner loop ────
#
# A test is slow when it takes more than about a second on two CPU cores. The files of this
# folder mark their own slow tests with `@pytest.mark.slow` (or a module-level `pytestmark`):
# tests/detection/test_architectures.py, the hypothesis-generated programs of
# tests/detection/test_generated.py, opcheck and the Triton-interpreter sweeps of tests/kernels,
# tests/soundness/test_soundness.py, subprocess tests, and the slowest end-to-end tests.
# Test files whose owners mark them here instead are listed below, by file and test function
# (every parametrization of a listed function is slow). Measure with `--durations=40`.
SLOW: dict[str, set[str]] = {
    "tests/test_optimize.py": {
        "test_a_new_input_shape_is_planned_for_that_shape",
        "test_planning_is_deterministic",
        "test_max_error_zero_changes_nothing",
        "test_max_error_bounds_every_site",
        "test_an_unattainable_budget_warns_and_strict_raises",
        "test_short_sequences_stay_exact",
        "test_causal_sites_refuse_agents_and_keep_causality_in_linear_attention",
        "test_rewrite_into_one_variant_reports_its_measured_error",
        "test_torch_compile_takes_a_budget",
        "test_a_diffusers_dit_follows_its_mediator_schedule_across_timesteps",
        "test_vit_at_224_keeps_softmax_where_no_candidate_is_predicted_faster",
    },
    "tests/test_planner.py": {
        "test_attainable_budget_is_met_with_the_least_error_brute_force_finds",  # hypothesis vs brute force
    },
    "tests/variants/test_agent.py": {
        "test_padded_tokens_change_nothing_in_valid_rows",
        "test_half_precision_stays_close_to_float32",
        "test_grouped_query_heads_read_their_kv_head",
        "test_additive_and_per_row_padding_masks_equal_the_boolean_key_mask",
        "test_calibrated_shortcut_recovers_a_previous_token_head",
    },
    "tests/variants/test_mediator.py": {
        "test_initialisation_is_deterministic_and_ignores_padded_queries",
    },
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the tests listed in SLOW, and warns about entries that name no test of their file
    (a renamed test would otherwise move to the fast tier unnoticed)."""
    modules = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        if getattr(item, "originalname", item.name) in SLOW.get(file, ()):
            item.add_marker(pytest.mark.slow)
        if file in SLOW and isinstance(item, pytest.Function):
            modules[file] = item.module
    for file, module in modules.items():
        for name in sorted(SLOW[file]):
            if not callable(getattr(module, name, None)):
                warnings.warn(f"tests/conftest.py SLOW lists {file}::{name}, which does not exist", stacklevel=1)


# ── counting calls: shared by the tests that check what really runs ──────────────────────────────


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch):
    """`count_calls(owner, name)` replaces `owner.name` (for the test) by a wrapper that counts
    its calls in the returned list's one element and then calls the real function."""

    def count(owner: object, name: str) -> list[int]:
        calls = [0]
        real = getattr(owner, name)

        def counting(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
        return calls

    return count


@pytest.fixture
def exact_op_calls(count_calls) -> list[int]:
    """How many times attnopt's exact attention op ran in a rewritten graph (analysis and
    verification run their own copies of the op, which this does not count)."""
    import attnopt.variants.exact as exact_variant

    return count_calls(exact_variant, "exact_attention")
