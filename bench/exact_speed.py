"""Exact attention on CPU against the original's fused SDPA: is "exact" ever slower than the original?

attnopt::exact_attention runs torch's F.scaled_dot_product_attention on CPU wherever that is
the op's own function (kernels/exact.py, _sdpa_computes) and the dense reference elsewhere. Timed,
fp32, torch.set_num_threads(2), under torch.no_grad():

(a) the bare op at two sites, against F.scaled_dot_product_attention on the same tensors:
    - DiT-like: B=2, H=16, N=M=1024, d=72, no mask;
    - BERT-like: B=4, H=12, N=M=512, d=64, key-padding mask (half the rows padded from key 384),
      as an SDPA site passes it (bool, zero_empty_rows) and as a hand-written (eager) BERT does
      (float finfo.min mask, NaN rule for empty rows);
    "reference" is the dense path the op took before (exact_attention_reference), for scale.
(b) through the public API, `attnopt.rewrite(model, "exact", args=...)` against the original:
    - a module that calls F.scaled_dot_product_attention at the DiT-like site;
    - a random-init transformers BertModel (2 layers, hidden 384, 12 heads, intermediate 1536,
      attn_implementation="sdpa", eval) on 4×512 tokens with the same padding.
    "rewrite, no SDPA" is the rewritten model with the op's SDPA dispatch switched off (the
    reference path, as before), measured in the same run.

(c) the same two models under Inductor: `torch.compile(original)` against
    `attnopt.rewrite(original, "exact", inner="inductor")`.
A GPT-2 decode step is timed by bench/generate_loop.py (steady per-token time of greedy decoding).

The candidates take turns, one call each per round, after a warm-up; each reports the median of
its calls and its time over the baseline's (SDPA / the original), so > 1 means slower.

    python bench/exact_speed.py                 # ~2 minutes on 2 cores
    python bench/exact_speed.py --rounds 5      # quicker
    python bench/exact_speed.py --only inductor --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_median_seconds  # noqa: E402

import attnopt  # noqa: E402
from attnopt.kernels import exact as exact_module  # noqa: E402
from attnopt.kernels import exact_attention, exact_attention_reference  # noqa: E402

THREADS = 2


@contextlib.contextmanager
def sdpa_dispatch_off() -> Iterator[None]:
    """The op as it was before: the reference on CPU for every call."""
    computes = exact_module._sdpa_computes
    exact_module._sdpa_computes = lambda *args, **kwargs: False
    try:
        yield
    finally:
        exact_module._sdpa_computes = computes


def without_dispatch(run: Callable[[], object]) -> Callable[[], object]:
    def call():
        with sdpa_dispatch_off():
            return run()

    return call


def padding_keep(batch: int, length: int, padded_from: int) -> torch.Tensor:
    """(B, M) 1/0: the odd rows padded from `padded_from` on."""
    keep = torch.ones(batch, length, dtype=torch.long)
    keep[1::2, padded_from:] = 0
    return keep


def report(title: str, baseline: str, best: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, seconds in best.items():
        ratio = seconds / best[baseline]
        print(f"  {name:<34} {seconds * 1e3:9.2f} ms   {ratio:5.2f}x {baseline}")


def bare_op_sites(rounds: int) -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 1024, 72, generator=generator) for _ in range(3))
    scale = 72**-0.5
    report("(a) DiT-like site B=2 H=16 N=1024 d=72, no mask", "sdpa", interleaved_median_seconds({
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "exact op": lambda: exact_attention(q, k, v, scale=scale),
        "reference (old path)": lambda: exact_attention_reference(q, k, v, scale=scale),
    }, rounds))

    q, k, v = (torch.randn(4, 12, 512, 64, generator=generator) for _ in range(3))
    scale = 64**-0.5
    keep = padding_keep(4, 512, 384).bool()[:, None, None, :]
    additive = torch.zeros(4, 1, 1, 512).masked_fill(~keep, torch.finfo(torch.float32).min)
    report("(a) BERT-like site B=4 H=12 N=512 d=64, key-padding mask", "sdpa", interleaved_median_seconds({
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale),
        "exact op, bool (SDPA site)": lambda: exact_attention(q, k, v, keep, scale=scale, zero_empty_rows=True),
        "exact op, finfo.min (eager site)": lambda: exact_attention(q, k, v, additive, scale=scale),
        "reference (old path), bool": lambda: exact_attention_reference(
            q, k, v, keep, scale=scale, zero_empty_rows=True),
    }, rounds))


class SdpaModel(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def check_equal(rewritten: torch.Tensor, original: torch.Tensor, what: str) -> None:
    error = ((rewritten - original).norm() / original.norm()).item()
    print(f"  {what}: relative L2 error of the rewrite {error:.1e}")
    assert error < 1e-5, error


def public_api(rounds: int) -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 16, 1024, 72, generator=generator) for _ in range(3))
    original = SdpaModel().eval()
    rewritten = attnopt.rewrite(SdpaModel().eval(), "exact", args=(q, k, v))
    check_equal(rewritten(q, k, v), original(q, k, v), "SDPA module")
    report("(b) attnopt.rewrite(SDPA module, 'exact'), DiT-like site", "original", interleaved_median_seconds({
        "original": lambda: original(q, k, v),
        "rewrite": lambda: rewritten(q, k, v),
        "rewrite, no SDPA (old path)": without_dispatch(lambda: rewritten(q, k, v)),
    }, rounds))

    bert, kwargs = _bert(generator)
    rewritten_bert = attnopt.rewrite(bert, "exact", kwargs=kwargs)
    sites = attnopt.report_of(rewritten_bert).sites
    print(f"  BertModel: {sum(site.rewritable for site in sites)} of {len(sites)} sites rewritten")
    check_equal(rewritten_bert(**kwargs).last_hidden_state, bert(**kwargs).last_hidden_state, "BertModel")
    report("(b) attnopt.rewrite(BertModel 2x384/12 heads, sdpa, 'exact'), 4x512 tokens", "original",
           interleaved_median_seconds({
               "original": lambda: bert(**kwargs),
               "rewrite": lambda: rewritten_bert(**kwargs),
               "rewrite, no SDPA (old path)": without_dispatch(lambda: rewritten_bert(**kwargs)),
           }, rounds))


def under_inductor(rounds: int) -> None:
    """(c) Inductor underneath: `torch.compile(original)` against `attnopt.rewrite(original, "exact",
    inner="inductor")` (the rewritten graph compiled by Inductor, attnopt's op opaque in it)."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 16, 1024, 72, generator=generator) for _ in range(3))
    model = SdpaModel().eval()
    compiled = torch.compile(model)
    rewritten = attnopt.rewrite(model, "exact", args=(q, k, v), inner="inductor")
    check_equal(rewritten(q, k, v), compiled(q, k, v), "SDPA module under Inductor")
    report("(c) Inductor: torch.compile(SDPA module) vs attnopt exact + Inductor, DiT-like site", "inductor",
           interleaved_median_seconds({
               "inductor": lambda: compiled(q, k, v),
               "attnopt exact + inductor": lambda: rewritten(q, k, v),
           }, rounds))

    bert, kwargs = _bert(generator)
    compiled_bert = torch.compile(bert)
    rewritten_bert = attnopt.rewrite(bert, "exact", kwargs=kwargs, inner="inductor")
    print(f"  BertModel under Inductor: notes {attnopt.report_of(rewritten_bert).notes or 'none'}")
    check_equal(rewritten_bert(**kwargs).last_hidden_state, compiled_bert(**kwargs).last_hidden_state,
                "BertModel under Inductor")
    report("(c) Inductor: torch.compile(BertModel) vs attnopt exact + Inductor, 4x512 tokens", "inductor",
           interleaved_median_seconds({
               "inductor": lambda: compiled_bert(**kwargs),
               "attnopt exact + inductor": lambda: rewritten_bert(**kwargs),
           }, rounds))


def _bert(generator: torch.Generator) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A random-init BertModel (2 layers, hidden 384, 12 heads, sdpa) and 4x512 padded inputs."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536,
                        attn_implementation="sdpa")
    bert = BertModel(config, add_pooling_layer=False).eval()
    kwargs = {"input_ids": torch.randint(1000, config.vocab_size, (4, 512), generator=generator),
              "attention_mask": padding_keep(4, 512, 384)}
    return bert, kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="timed calls of each candidate (median reported)")
    parser.add_argument("--only", choices=("op", "api", "inductor"), default=None)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, fp32, median of {args.rounds} interleaved calls")
    with torch.no_grad():  # not inference_mode: attnopt.rewrite fails on inference tensors
        if args.only in (None, "op"):
            bare_op_sites(args.rounds)
        if args.only in (None, "api"):
            public_api(args.rounds)
        if args.only in (None, "inductor"):
            under_inductor(args.rounds)


if __name__ == "__main__":
    main()
