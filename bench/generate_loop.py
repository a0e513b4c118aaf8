"""Greedy `generate` through `attnopt.rewrite(model, "exact")`: tiny random-init Llama (GQA) and GPT-2.

For each model, 32 new tokens from an 8-token prompt, on CPU:
- first-call overhead: the rewrite's first `generate` (dynamo compiles, attnopt analyses) minus
  the original's warm `generate`, in seconds;
- steady ratio: the rewrite's warm `generate` time over the original's (best of interleaved
  runs, bench/timing.py), i.e. the per-token slowdown of the decode loop once compiled;
- identical: whether both produce the same tokens;
- graphs / analysed signatures: what the report lists (dynamo graphs; signatures analysed).

    python bench/generate_loop.py
    python bench/generate_loop.py --new-tokens 64 --seconds 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_best_seconds

import attnopt


def tiny_llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def run(name: str, factory, new_tokens: int, prompt_length: int, seconds: float) -> dict:
    torch.manual_seed(0)
    model = factory().eval()
    prompt = torch.randint(3, 256, (1, prompt_length), generator=torch.Generator().manual_seed(0))

    def generate(m):
        with torch.no_grad():
            return m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    expected = generate(model)  # warm the original
    began = time.perf_counter()
    expected = generate(model)
    original_s = time.perf_counter() - began

    rewritten = attnopt.rewrite(model, "exact")
    began = time.perf_counter()
    actual = generate(rewritten)
    first_s = time.perf_counter() - began
    generate(rewritten)  # a second loop may meet a signature the first served from another graph
    report = attnopt.report_of(rewritten)
    graphs, sites = report.graphs, len(report.sites)
    best = interleaved_best_seconds({"original": lambda: generate(model), "attnopt": lambda: generate(rewritten)},
                                    seconds)
    after = attnopt.report_of(rewritten)
    return {
        "model": name, "identical": bool(torch.equal(actual, expected)) and bool(torch.equal(generate(rewritten), expected)),
        "first_overhead_s": first_s - original_s, "original_s": best["original"], "attnopt_s": best["attnopt"],
        "steady_ratio": best["attnopt"] / best["original"], "graphs": after.graphs,
        "analysed_signatures": len({site.signature for site in after.sites}),
        "planned_while_timed": (after.graphs, len(after.sites)) != (graphs, sites),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per model for the steady ratio")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"greedy generate, {args.new_tokens} new tokens, prompt {args.prompt_length}, CPU, 1 thread, "
          f"torch {torch.__version__}")
    print(f"{'model':<10} {'identical':>9} {'first overhead s':>16} {'orig ms':>8} {'attnopt ms':>10} "
          f"{'steady ratio':>12} {'graphs':>6} {'analysed sigs':>13}")
    for name, factory in (("llama-gqa", tiny_llama), ("gpt2", tiny_gpt2)):
        r = run(name, factory, args.new_tokens, args.prompt_length, args.seconds)
        print(f"{r['model']:<10} {r['identical']!s:>9} {r['first_overhead_s']:>16.2f} {1e3 * r['original_s']:>8.1f} "
              f"{1e3 * r['attnopt_s']:>10.1f} {r['steady_ratio']:>12.2f} {r['graphs']:>6} {r['analysed_signatures']:>13}"
              + ("  (planned while timed!)" if r["planned_while_timed"] else ""))


if __name__ == "__main__":
    main()
