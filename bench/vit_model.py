"""Model level: transformers ViT at 1024×1024, `attnopt.optimize(budget=0.3)` against the original,
with and without Inductor underneath.

ViT with patch 16 (N = 64² + 1 = 4097 tokens), hidden 384, 6 heads, 4 layers, SDPA attention,
random init (seeded), batch 1, fp32, torch.set_num_threads(2). Rows, each timed in turns with the
others (bench/timing.py, fastest forward kept):

- eager: the model as it is;
- inductor: `torch.compile(model)` — the row every other is compared with;
- attnopt exact, eager graph: `attnopt.rewrite(model, "exact", inner="eager")` (no Inductor);
- attnopt exact + inductor: `attnopt.rewrite(model, "exact", inner="inductor")` (Inductor underneath);
- attnopt optimize + inductor: `attnopt.optimize(model, budget, inner="inductor")`;
- ceiling: every attention replaced by an opaque op that reads q, k, v and returns zeros shaped
  like the attention's output, compiled by Inductor: no attention variant can beat it.

Prints the report, the plan's predicted speed-up, each row's time, its ratio to Inductor alone
(and to eager: the optimized model's target is ≥ 3× over the eager original), its first-call
(compile and plan) time and how far its output is from the original's.

    python bench/vit_model.py                       # 1024², budget 0.3
    python bench/vit_model.py --image 512 --seconds 10
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
from transformers import AttentionInterface, ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnopt  # noqa: E402
from timing import interleaved_best_seconds  # noqa: E402

TARGET = 3.0


def build(image: int, attention: str = "sdpa") -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = ViTConfig(image_size=image, patch_size=16, hidden_size=384, num_attention_heads=6, num_hidden_layers=4,
                       intermediate_size=4 * 384, attn_implementation=attention)
    return ViTModel(config, add_pooling_layer=False).eval(), torch.randn(1, 3, image, image)


@torch.library.custom_op("attnopt_bench::zero_attention", mutates_args=())
def zero_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ceiling's attention: reads q, k, v (so nothing feeding them is dead code) and returns
    zeros of the attention output's shape (B, N, H, e), at the cost of one allocation and fill."""
    return v.new_zeros(v.shape[0], q.shape[2], v.shape[1], v.shape[3])


@zero_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.new_empty(v.shape[0], q.shape[2], v.shape[1], v.shape[3])


def _zero_attention_forward(module, query, key, value, attention_mask, **_kwargs):
    return zero_attention(query, key, value), None


AttentionInterface.register("attnopt_bench_zeros", _zero_attention_forward)


def compiled_and_seconds(make, pixels: torch.Tensor):
    """`make()`'s model and the time of making it and running it once (compile, plan)."""
    start = time.perf_counter()
    model = make()
    model(pixels)
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--max-error", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget of the interleaved runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, pixels = build(args.image)
    ceiling_model, _ = build(args.image, "attnopt_bench_zeros")
    budget = attnopt.Budget(time=args.budget, max_error=args.max_error)
    first_call = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always", attnopt.BudgetNotMetWarning)
        inductor, first_call["inductor"] = compiled_and_seconds(lambda: torch.compile(model), pixels)
        exact_eager, first_call["attnopt exact, eager graph"] = compiled_and_seconds(
            lambda: attnopt.rewrite(model, "exact", args=(pixels,), inner="eager"), pixels)
        exact, first_call["attnopt exact + inductor"] = compiled_and_seconds(
            lambda: attnopt.rewrite(model, "exact", args=(pixels,), inner="inductor"), pixels)
        fast, first_call["attnopt optimize + inductor"] = compiled_and_seconds(
            lambda: attnopt.optimize(model, budget, args=(pixels,), inner="inductor"), pixels)
        ceiling, first_call["ceiling (zero-cost attention) + inductor"] = compiled_and_seconds(
            lambda: torch.compile(ceiling_model), pixels)
        report = attnopt.report_of(fast)
        print(report)
        rows = {"eager": model, "inductor": inductor, "attnopt exact, eager graph": exact_eager,
                "attnopt exact + inductor": exact,
                "attnopt optimize + inductor": fast, "ceiling (zero-cost attention) + inductor": ceiling}
        reference = model(pixels).last_hidden_state
        outputs = {name: run(pixels).last_hidden_state for name, run in rows.items()}
        best = interleaved_best_seconds({name: (lambda run=run: run(pixels)) for name, run in rows.items()},
                                        args.seconds)
    plan = report.plans[0]
    print(f"\nViT {args.image}² (N={(args.image // 16) ** 2 + 1}), {budget}: plan predicts "
          f"{plan.predicted_speedup:.2f}×, budget met: {plan.budget_met}")
    for name, run in (("exact", exact), ("optimize", fast)):
        seconds = run._attnopt_backend.inner_seconds
        print(f"attnopt {name}: {len(seconds)} Inductor compile(s), {sum(seconds):.1f} s; notes: {report_of_notes(run)}")
    print("| row | ms | × vs inductor | × vs eager | first call s | output rel. error | CLS cosine |")
    print("|---|---|---|---|---|---|---|")
    for name in rows:
        out = outputs[name]
        error = ((out - reference).norm() / reference.norm()).item()
        cls_cosine = F.cosine_similarity(out[:, 0], reference[:, 0], dim=-1).item()
        first = f"{first_call[name]:.1f}" if name in first_call else "-"
        print(f"| {name} | {best[name] * 1e3:.0f} | {best['inductor'] / best[name]:.2f}× | {best['eager'] / best[name]:.2f}× "
              f"| {first} | {error:.3f} | {cls_cosine:.4f} |")
    speedup = best["eager"] / best["attnopt optimize + inductor"]
    print(f"target ≥ {TARGET:g}× over the eager original: {'met' if speedup >= TARGET else 'NOT met'} ({speedup:.2f}×)")


def report_of_notes(module) -> str:
    notes = attnopt.report_of(module).notes
    return "; ".join(notes) if notes else "none"


if __name__ == "__main__":
    main()
