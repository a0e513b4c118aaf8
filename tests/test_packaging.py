"""The repo's kernels/ folder imported under its folder name is attnopt.kernels, not a second copy.

`python -m pytest` (and `python -c` from the repo root) put the root on sys.path; transformers
probes for a top-level `kernels` package and would import ours a second time.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a fresh interpreter imports torch and attnopt
def test_top_level_kernels_is_attnopt_kernels():
    code = ("import sys; sys.path.insert(0, '.'); import kernels, attnopt.kernels, torch;"
            "assert kernels is attnopt.kernels, kernels;"
            "assert torch.ops.attnopt.exact_attention is not None; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
