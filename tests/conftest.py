"""Set before anything imports Triton: on a machine without an NVIDIA GPU, Triton's interpreter.

Triton's standard library (tl.zeros, tl.max, ...) is built in interpreter mode or not when
`triton.language` is first imported, and `import torch._dynamo` (so `import attnopt`) imports it.
The kernel tests run the generated kernels in the interpreter, so the mode must be fixed here,
at the root of the test session, before any test module is collected — not in
tests/kernels/conftest.py, which pytest imports only after the detection tests' modules.
"""

import os
from pathlib import Path

if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
# Quick and reproducible: a few hundred cases in about two minutes on two CPU cores.
settings.register_profile("soundness", max_examples=130, derandomize=True, database=None, **_SOUNDNESS_COMMON)
# Long runs: thousands of cases, new draws every run.
settings.register_profile("soak", max_examples=4000, derandomize=False, database=None, **_SOUNDNESS_COMMON)
