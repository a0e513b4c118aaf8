"""Model level: transformers ViT at 1024×1024, `attnopt.optimize(budget=0.3)` against the original.

ViT with patch 16 (N = 64² + 1 = 4097 tokens), hidden 384, 6 heads, 4 layers, SDPA attention,
random init (seeded), batch 1, fp32, torch.set_num_threads(2). Planning runs on the same input;
then the original and the optimized model take turns (bench/timing.py) and each keeps its
fastest forward. Prints the report, the plan's predicted speed-up, the measured one (target
≥ 3×), and how far the optimized outputs are from the original's.

    python bench/vit_model.py                       # budget 0.3
    python bench/vit_model.py --budget 0.3 --max-error 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnopt  # noqa: E402
from timing import interleaved_best_seconds  # noqa: E402

TARGET = 3.0


def build(image: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = ViTConfig(image_size=image, patch_size=16, hidden_size=384, num_attention_heads=6, num_hidden_layers=4,
                       intermediate_size=4 * 384, attn_implementation="sdpa")
    return ViTModel(config, add_pooling_layer=False).eval(), torch.randn(1, 3, image, image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--max-error", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget of the interleaved runs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, pixels = build(args.image)
    budget = attnopt.Budget(time=args.budget, max_error=args.max_error)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always", attnopt.BudgetNotMetWarning)
        start = time.perf_counter()
        fast = attnopt.optimize(model, budget, args=(pixels,))
        planning = time.perf_counter() - start
        report = attnopt.report_of(fast)
        print(report)
        reference, optimized = model(pixels).last_hidden_state, fast(pixels).last_hidden_state
        best = interleaved_best_seconds({"original": lambda: model(pixels), "optimized": lambda: fast(pixels)},
                                        args.seconds)
    error = ((optimized - reference).norm() / reference.norm()).item()
    cls_cosine = F.cosine_similarity(optimized[:, 0], reference[:, 0], dim=-1).item()
    speedup = best["original"] / best["optimized"]
    plan = report.plans[0]
    print(f"\nViT {args.image}² (N={(args.image // 16) ** 2 + 1}), {budget}: planning took {planning:.0f} s")
    print("| original ms | optimized ms | measured × | predicted × | budget met | output rel. error | CLS cosine |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {best['original'] * 1e3:.0f} | {best['optimized'] * 1e3:.0f} | {speedup:.2f}× "
          f"| {plan.predicted_speedup:.2f}× | {plan.budget_met} | {error:.3f} | {cls_cosine:.4f} |")
    print(f"target ≥ {TARGET:g}×: {'met' if speedup >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
