"""Fixtures of the soundness suite, the hypothesis profile it runs under, and the session summary
(outcome counts per test, failure groups with reproducers) printed and written to files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from .harness import OUTCOMES, TALLY

DEFAULT_PROFILE = "soundness"


@pytest.fixture
def profile(request: pytest.FixtureRequest) -> settings:
    """The hypothesis settings for this run: `--hypothesis-profile=NAME` if given, else "soundness";
    $ATTNOPT_SOUNDNESS_EXAMPLES overrides its max_examples (each test draws a share of it)."""
    name = request.config.getoption("hypothesis_profile", None) or DEFAULT_PROFILE
    chosen = settings.get_profile(name)
    examples = os.environ.get("ATTNOPT_SOUNDNESS_EXAMPLES")  # run_soak.py --examples N
    return settings(chosen, max_examples=int(examples)) if examples else chosen


@pytest.fixture(autouse=True)
def fresh_dynamo_and_seed():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def output_dir(config: pytest.Config) -> Path:
    chosen = os.environ.get("ATTNOPT_SOUNDNESS_DIR")
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("soundness"))
    path = Path(tempfile.gettempdir()) / "attnopt-soundness"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if not TALLY.counts:
        return
    directory = output_dir(config)
    (directory / "counts.md").write_text(TALLY.table() + "\n")
    (directory / "counts.json").write_text(json.dumps(
        {"outcomes": list(OUTCOMES), "counts": {t: dict(c) for t, c in TALLY.counts.items()},
         "invalid": dict(TALLY.invalid), "failure_groups": len(TALLY.groups()),
         "refusal_reasons": dict(TALLY.reasons.most_common()), "skipped_fresh_inputs": dict(TALLY.skipped)}, indent=2) + "\n")
    (directory / "failures.md").write_text(TALLY.failures_markdown())
    (directory / "cases.jsonl").write_text("".join(json.dumps(case) + "\n" for case in TALLY.cases))
    terminalreporter.section("attnopt soundness: outcomes per case")
    terminalreporter.write_line(TALLY.table())
    terminalreporter.write_line("")
    terminalreporter.write_line(TALLY.reasons_table())
    terminalreporter.write_line("")
    terminalreporter.write_line(f"{len(TALLY.failures)} failing case(s) in {len(TALLY.groups())} group(s); "
                                f"table, groups and reproducers in {directory}/")
