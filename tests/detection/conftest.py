"""Fixtures for the detection tests: every test starts from an empty dynamo cache and a fixed seed."""

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds on two CPU cores")


@pytest.fixture(autouse=True)
def fresh_dynamo_and_seed():
    """Compiled code from one test must not leak into the next (recompile limits, stale guards)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


# Known gaps, each a real failure today, kept visible: strict xfails fail the run the moment the
# behaviour changes, so fixing one means deleting its line here.
KNOWN_GAPS = {
    "test_exact_rewrite_reproduces_the_architecture[gpt2-eager]": "HF cache objects in the output compare as a different structure",
    "test_exact_rewrite_reproduces_the_architecture[gpt2-sdpa]": "HF cache objects in the output compare as a different structure",
    "test_exact_rewrite_reproduces_the_architecture[llama-gqa-eager]": "HF cache objects in the output compare as a different structure",
    "test_exact_rewrite_reproduces_the_architecture[llama-gqa-sdpa]": "HF cache objects in the output compare as a different structure",
    "test_exact_rewrite_reproduces_the_architecture[t5-eager]": "HF cache objects in the output compare as a different structure",
    "test_exact_rewrite_reproduces_the_architecture[t5-sdpa]": "HF cache objects in the output compare as a different structure",
    "test_exact_rewrite_gives_equal_gradients_in_training_mode[vit-sdpa]": "k_proj.bias gradient (mathematically ~0) differs relatively",
    "test_inspect_finds_idiom_as_rewritable_site_with_its_fields[gqa-unsqueeze-expand-reshape]": "unsqueeze+expand+reshape GQA not detected",
    "test_inspect_finds_idiom_as_rewritable_site_with_its_fields[inductor-checkpoint-wrapped]": "higher-order-op subgraphs are not searched (reported as a note)",
    "test_exact_rewrite_matches_idiom_and_records_exact_decisions[inductor-checkpoint-wrapped]": "higher-order-op subgraphs are not searched (reported as a note)",
}
# Hypothesis draws new programs each run: this one fails only on some draws (a per-head tensor
# scale after a bmm view round trip is refused), so it cannot be a strict xfail.
FLAKY_GAPS = {
    "test_detector_finds_exactly_the_generated_sites_and_rewrites_them_exactly": "tensor scales after a leading-dim view are refused",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.name in KNOWN_GAPS:
            item.add_marker(pytest.mark.xfail(reason=KNOWN_GAPS[item.name], strict=True))
        elif item.name in FLAKY_GAPS:
            item.add_marker(pytest.mark.xfail(reason=FLAKY_GAPS[item.name], strict=False))
