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
