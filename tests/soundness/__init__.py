"""Property-based soundness suite: attnopt must never silently change what a program computes.

Every generated attention program (tests/soundness/programs.py, strategies.py) is either
rewritten by `attnopt.rewrite(model, "exact", args=example)` — and then equal to the original on
fresh inputs (fresh masks with fully masked and all-keep rows, fresh fill and scale tensors), in
both grad modes, with equal gradients — or refused with a reason in `attnopt.report_of(...)`.

    python -m pytest tests/soundness                           # quick, reproducible (~2 min)
    python -m pytest tests/soundness --hypothesis-profile=soak  # thousands of new cases
    python tests/soundness/run_soak.py                          # the same, then the outcome table

The outcome table is printed at the end of the run and written, with every failure group and a
standalone reproducer each, to .pytest_cache/d/soundness/ (or $ATTNOPT_SOUNDNESS_DIR).
"""
