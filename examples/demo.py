"""The main job, end to end on a model built in this repo (examples/demo_model.py):
find every attention site, rewrite them exactly, check the outputs, and print the report.

    python examples/demo.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnopt  # noqa: E402
from demo_model import factory  # noqa: E402


def main() -> None:
    model, args, kwargs = factory()
    print(attnopt.inspect(model, args, kwargs))

    exact = attnopt.rewrite(model, "exact", args, kwargs)
    with torch.no_grad():
        reference, rewritten = model(*args, **kwargs), exact(*args, **kwargs)
    error = ((rewritten - reference).norm() / reference.norm()).item()
    print(attnopt.report_of(exact))
    print(f"exact rewrite: {len(attnopt.report_of(exact).rewritten)} site(s) rewritten, "
          f"relative error vs the original {error:.1e}")


if __name__ == "__main__":
    main()
