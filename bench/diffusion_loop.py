"""A 20-step DDIM sampler through attnopt: tiny random-init diffusers DiT and UNet, CPU.

Each model's forward takes a Python-int timestep every step, as a user's sampling loop passes it.
Rows per model:
- exact: `attnopt.rewrite(model, "exact")` — graphs and analyses the loop needs (one each is
  the target: every int timestep shares one graph), end-of-loop error, first-loop overhead;
- optimize: `attnopt.optimize(model, Budget(time=T, loop_error=E), loop=sampler)` — planning
  rounds and seconds, the largest per-call error of the sites it rewrote, the end-of-loop error
  (the report's, and measured again here on a second seed the planner never saw), whether the
  loop budget is met, and the steady loop time against the original's (interleaved best-of).

Per optimize row, each planning round's per-call budget, end-of-loop error, rewritten sites, wall
time (building and planning the module, and running the loop with it) and the site evaluations it
took from earlier rounds, and the plan returned (each rewritten site's variant and parameters).
`--from-scratch` plans every round from scratch (`attnopt.loops.REUSE_EVALUATIONS = False`: the
planning before later rounds reused the first's candidate evaluations) for comparison.

    python bench/diffusion_loop.py
    python bench/diffusion_loop.py --size 64 --loop-error 0.05 --time 0.7 --seconds 4
    python bench/diffusion_loop.py --models dit --seconds 1 [--from-scratch]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_best_seconds

import attnopt


def tiny_dit(size: int) -> tuple[torch.nn.Module, callable]:
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=4, sample_size=size,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32).eval()
    labels = torch.tensor([1])
    return model, lambda m, x, t: m(hidden_states=x, timestep=torch.tensor([t]), class_labels=labels).sample


def tiny_unet(size: int) -> tuple[torch.nn.Module, callable]:
    model = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    return model, lambda m, x, t: m(x, t, encoder_hidden_states=text).sample


def sampler(denoise, size: int, steps: int, seed: int):
    """The DDIM loop: Python-int timesteps, noise from a seeded generator."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)

    def run(model: torch.nn.Module) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(denoise(model, x, int(t)), t, x).prev_sample
        return x

    return run


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def run(name: str, factory, size: int, steps: int, budget: attnopt.Budget, seconds: float) -> list[dict]:
    torch.manual_seed(0)
    model, denoise = factory(size)
    loop, held_out = sampler(denoise, size, steps, seed=1), sampler(denoise, size, steps, seed=7)
    began = time.perf_counter()
    expected = loop(model)
    original_s = time.perf_counter() - began
    rows = []

    exact = attnopt.rewrite(model, "exact")
    began = time.perf_counter()
    actual = loop(exact)
    first_s = time.perf_counter() - began
    report = attnopt.report_of(exact)
    rows.append({"model": name, "mode": "exact", "graphs": report.graphs,
                 "analyses": len({(s.graph, s.signature) for s in report.sites}),
                 "sites": len(report.sites), "loop_error": relative(actual, expected),
                 "held_out_error": relative(held_out(exact), held_out(model)), "first_overhead_s": first_s - original_s})

    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = attnopt.optimize(model, budget, loop=loop)
    planning_s = time.perf_counter() - began
    report = attnopt.report_of(fast)
    check = report.loop
    best = interleaved_best_seconds({"original": lambda: loop(model), "attnopt": lambda: loop(fast)}, seconds)
    after = attnopt.report_of(fast)
    rows.append({"model": name, "mode": "optimize", "graphs": after.graphs, "plans": len(after.plans),
                 "rounds": len(check.rounds), "planning_s": planning_s,
                 "rewritten": f"{len(report.rewritten)}/{len(report.sites)}",
                 "largest_call_error": check.largest_call_error, "loop_error": check.error,
                 "held_out_error": relative(held_out(fast), held_out(model)), "met": check.met,
                 "speedup": best["original"] / best["attnopt"],
                 "predicted": min((p.predicted_speedup or 1.0) for p in report.plans) if report.plans else 1.0,
                 "round_details": check.rounds,
                 "plan": [(s.id, s.decision.variant, {k: v for k, v in s.decision.params.items()
                                                      if k in ("n_mediators", "agent_count", "feature_map",
                                                               "exact_heads", "window")}, s.decision.error)
                          for s in report.rewritten],
                 "warnings": sorted({str(w.message)[:80] for w in caught})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent size (DiT tokens: (size/2)²)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loop-error", type=float, default=0.05)
    parser.add_argument("--time", type=float, default=0.7)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per model for the steady ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="dit,unet", help="comma-separated: dit, unet")
    parser.add_argument("--from-scratch", action="store_true",
                        help="plan every loop round from scratch (no evaluations reused between rounds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attnopt.loops.REUSE_EVALUATIONS = not args.from_scratch
    budget = attnopt.Budget(time=args.time, loop_error=args.loop_error)
    print(f"{args.steps}-step DDIM, latent {args.size}², {budget}, CPU, {args.threads} threads, torch {torch.__version__}, "
          f"rounds {'from scratch' if args.from_scratch else 'reusing evaluations'}")
    factories = {"dit": tiny_dit, "unet": tiny_unet}
    for name in args.models.split(","):
        factory = factories[name.strip()]
        for r in run(name, factory, args.size, args.steps, budget, args.seconds):
            if r["mode"] == "exact":
                print(f"{name:<5} exact    graphs {r['graphs']}, analyses {r['analyses']}, sites {r['sites']}, "
                      f"end-of-loop error {r['loop_error']:.2e} (held-out seed {r['held_out_error']:.2e}), "
                      f"first-loop overhead {r['first_overhead_s']:.1f} s")
            else:
                print(f"{name:<5} optimize graphs {r['graphs']}, plans {r['plans']}, rounds {r['rounds']} "
                      f"({r['planning_s']:.1f} s), rewritten {r['rewritten']}, largest per-call error "
                      f"{r['largest_call_error']:.3g}, end-of-loop error {r['loop_error']:.3g} (held-out seed "
                      f"{r['held_out_error']:.3g}), loop budget met {r['met']}, loop {r['speedup']:.2f}x faster "
                      f"measured ({r['predicted']:.2f}x predicted)")
                for i, lr in enumerate(r["round_details"], 1):
                    print(f"      round {i}: {lr.per_call}: end-of-loop error {lr.loop_error:.4g}, "
                          f"{lr.rewritten_sites} site(s) rewritten, {lr.seconds:.1f} s "
                          f"(policy {lr.planning_seconds:.1f} s), "
                          f"{lr.reused_sites} site evaluation(s) reused")
                print(f"      plan: {r['plan']}")
                for message in r["warnings"]:
                    print(f"      warning: {message}")


if __name__ == "__main__":
    main()
