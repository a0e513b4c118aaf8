"""Fixtures for the detection tests: every test starts from an empty dynamo cache and a fixed seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo_and_seed():
    """Compiled code from one test must not leak into the next (recompile limits, stale guards)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


# Known gaps, each a real failure today, kept visible: strict xfails fail the run the moment the
# behaviour changes, so fixing one means deleting its line here.
KNOWN_GAPS: dict[str, str] = {}
# Hypothesis draws new programs each run: a test that fails only on some draws cannot be a strict
# xfail, so it is listed here instead (none at the moment; former failing draws are @examples).
FLAKY_GAPS: dict[str, str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.name in KNOWN_GAPS:
            item.add_marker(pytest.mark.xfail(reason=KNOWN_GAPS[item.name], strict=True))
        elif item.name in FLAKY_GAPS:
            item.add_marker(pytest.mark.xfail(reason=FLAKY_GAPS[item.name], strict=False))
