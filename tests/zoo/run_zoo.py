"""Runs the transformers zoo and writes docs/zoo_coverage.md.

    python tests/zoo/run_zoo.py                          # every model type, eager then sdpa
    python tests/zoo/run_zoo.py --types bert,gpt2,t5     # a few
    python tests/zoo/run_zoo.py --limit 50 --total 1800  # the first 50 types, 30 minutes at most
    python tests/zoo/run_zoo.py --resume                 # continue a run (entries already in --jsonl are kept)
    python tests/zoo/run_zoo.py --resume --rerun skipped # ... and run the skipped entries again
    python tests/zoo/run_zoo.py --report-only            # re-render the markdown from --jsonl

Each entry (model type x attention implementation) runs in a worker process with a time budget
(--budget seconds); a worker that overruns or dies is replaced and the entry recorded as a
timeout/crash. Results are appended to --jsonl as they come, so an interrupted run loses nothing.
Nothing is downloaded (HF_HUB_OFFLINE=1): every model is random-init from a tiny config.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_JSONL = Path(tempfile.gettempdir()) / "attnopt_zoo_results.jsonl"
DEFAULT_MARKDOWN = ROOT / "docs" / "zoo_coverage.md"
OUTCOMES = ("all", "partial", "none", "no-attention", "error", "WRONG", "timeout", "crash", "skipped")


def _worker(conn) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from zoo import zoo

    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(zoo.measure(*task).to_dict())


class Worker:
    def __init__(self) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()

    def run(self, task: tuple[str, str], budget: float) -> dict | str:
        """The entry's result, or "timeout" / "crash"."""
        self.conn.send(task)
        if not self.conn.poll(budget):
            return "timeout"
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return "crash"

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


def run(tasks: list[tuple[str, str]], jsonl: Path, budget: float, total: float, startup: float = 60.0) -> None:
    start = time.monotonic()
    worker = None
    with jsonl.open("a") as out:
        for index, task in enumerate(tasks):
            if time.monotonic() - start > total:
                print(f"total time budget spent: {len(tasks) - index} entries not run", flush=True)
                break
            fresh = worker is None
            if fresh:
                worker = Worker()
            began = time.monotonic()
            result = worker.run(task, budget + (startup if fresh else 0))
            if isinstance(result, str):
                worker.stop()
                worker = None
                result = {"model_type": task[0], "implementation": task[1], "outcome": result,
                          "skip_reason": f"{result} after {time.monotonic() - began:.0f} s", "errors": [],
                          "seconds": round(time.monotonic() - began, 1)}
            out.write(json.dumps(result) + "\n")
            out.flush()
            print(f"[{index + 1}/{len(tasks)} {time.monotonic() - start:.0f}s] {task[0]} {task[1]}: "
                  f"{result['outcome']} ({result.get('seconds', 0)} s) {result.get('skip_reason', '')[:100]}", flush=True)
    if worker is not None:
        worker.conn.send(None)
        worker.stop()


# ── The markdown ───────────────────────────────────────────────────────────────────────────────


def load(jsonl: Path) -> dict[tuple[str, str], dict]:
    """The last result of each entry."""
    results = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                results[(r["model_type"], r["implementation"])] = r
    return results


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _generic(reason: str) -> str:
    """A reason with its numbers and paths taken out, so that equal causes are counted together."""
    reason = re.sub(r"/\S+/", "", reason)
    reason = re.sub(r"(?<=\w)_\d+\b", "", reason)  # `score_14` -> `score`
    reason = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", reason)
    reason = re.sub(r"\(\s*N(,\s*N)*\s*\)", "(…)", reason)
    return reason


def _refusals(r: dict) -> str:
    counts = collections.Counter(r.get("refused", []))
    return "; ".join(f"{n}× {reason}" if n > 1 else reason for reason, n in counts.items())


def _silently_missed(r: dict) -> int:
    return max(0, r.get("left_original", 0) - len(r.get("refused", [])))


def _type_verdict(entries: list[dict]) -> str:
    outcomes = {e["outcome"] for e in entries}
    for bad in ("WRONG", "error", "crash", "timeout"):
        if bad in outcomes:
            return bad
    ran = [e["outcome"] for e in entries if e["outcome"] != "skipped"]
    if not ran:
        return "skipped"
    if all(o in ("all", "no-attention") for o in ran):
        return "all" if "all" in ran else "no-attention"
    if all(o == "none" for o in ran):
        return "none"
    return "partial"


def render(results: dict[tuple[str, str], dict], order: list[str], note: str = "") -> str:
    by_type: dict[str, list[dict]] = collections.defaultdict(list)
    for (model_type, _), r in sorted(results.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 10**6, kv[0])):
        by_type[model_type].append(r)
    entries = list(results.values())
    entry_counts = collections.Counter(r["outcome"] for r in entries)
    verdicts = {t: _type_verdict(rs) for t, rs in by_type.items()}
    type_counts = collections.Counter(verdicts.values())
    built_types = [t for t, rs in by_type.items() if any(r["outcome"] != "skipped" for r in rs)]
    attention_calls = sum(r.get("original_attention", 0) for r in entries)
    through = sum(min(r.get("through_attnopt", 0), r.get("original_attention", 0)) for r in entries)

    lines = [
        "# Transformers zoo: attnopt's coverage",
        "",
        "Generated by `python tests/zoo/run_zoo.py` (tests/zoo/): every model type of transformers'",
        "`MODEL_MAPPING_NAMES`, built from its config class's defaults shrunk to a tiny random-init config",
        "(2 layers, width 32, 4 heads / 2 kv heads, FFN 64, vocabulary 128, 32-pixel images in 8-pixel",
        "patches; where that fails, only depth and vocabulary shrunk), with `attn_implementation` \"eager\"",
        "and \"sdpa\", in eval mode under `torch.no_grad`, on batch-2 inputs (text: 8 tokens with",
        "padding in one row; encoder-decoders: 5 decoder tokens; vision: pixel values; audio: features",
        "or waveform). For each entry the original is run under a TorchDispatchMode that counts the",
        "attention calls it really makes (fused SDPA kernels, `nn.MultiheadAttention`'s fast path, and",
        "softmaxes over the last dim of rank >= 3 tensors whose result reaches a matmul); then",
        "`attnopt.inspect`; then `attnopt.rewrite(model, \"exact\", inner=\"eager\")`, whose second call is",
        "counted the same way plus the calls of `attnopt::exact_attention`. Outputs are compared",
        f"(relative error max|a-e|/max|e|; above {1e-4:g} in float32 is **WRONG**).",
        "",
        "Outcomes: **all** — every attention call of the original goes through attnopt's op;",
        "**partial** — some do; **none** — none do; **no-attention** — the original makes no attention",
        "call; **error** — inspect, rewrite or the rewritten forward raised; **WRONG** — the exact",
        "rewrite changed the outputs; **timeout**/**crash** — the entry overran its budget or killed its",
        "worker; **skipped** — no tiny config, model or input of the zoo's could be built and run.",
        "\"silently missed\" counts original attention calls the rewritten model still makes beyond the",
        "sites `inspect` reports as refused (with a reason).",
        "",
        *([note, ""] if note else []),
        "## Summary",
        "",
    ]
    seconds = sum(r.get("seconds", 0) for r in entries)
    lines += [f"Time spent in the entries: {seconds / 60:.0f} min (two shared CPU cores; worker start-ups not counted).", ""]
    lines += [
        "| | count |",
        "|---|---:|",
        f"| model types in transformers' MODEL_MAPPING_NAMES | {len(order)} |",
        f"| model types tried | {len(by_type)} |",
        f"| model types built and run (at least one implementation) | {len(built_types)} |",
    ]
    for outcome in ("all", "partial", "none", "no-attention", "error", "WRONG", "timeout", "crash"):
        lines.append(f"| model types: {outcome} | {type_counts.get(outcome, 0)} |")
    lines += [
        f"| entries (type × implementation) tried | {len(entries)} |",
        *(f"| entries with attn_implementation={impl} | {n} |"
          for impl, n in sorted(collections.Counter(r["implementation"] for r in entries).items())),
        *(f"| entries: {o} | {entry_counts.get(o, 0)} |" for o in OUTCOMES),
        f"| attention calls made by the originals (entries run) | {attention_calls} |",
        f"| of which through attnopt's op after the exact rewrite | {through} |",
        f"| entries with silently missed calls | {sum(1 for r in entries if _silently_missed(r))} |",
        "",
        "A model type's verdict is its worst entry's (WRONG > error > crash > timeout), else \"all\" when",
        "every built implementation's calls all go through attnopt, \"none\" when none do, \"partial\" otherwise.",
        "",
    ]

    refusals, refused_sites = collections.Counter(), collections.Counter()
    refusal_types = collections.defaultdict(set)
    for r in entries:
        generic = [_generic(reason) for reason in r.get("refused", [])]
        refused_sites.update(generic)
        for reason in set(generic):
            refusals[reason] += 1
            refusal_types[reason].add(r["model_type"])
    lines += ["## Top refusal reasons", "", "| entries | sites | reason | model types (first 8) |", "|---:|---:|---|---|"]
    for reason, n in refusals.most_common(25):
        types = sorted(refusal_types[reason])
        lines.append(f"| {n} | {refused_sites[reason]} | {_cell(reason, 300)} | "
                     f"{_cell(', '.join(types[:8]) + (' …' if len(types) > 8 else ''))} |")
    if not refusals:
        lines.append("| 0 | 0 | - | - |")
    lines.append("")

    missed = [r for r in entries if _silently_missed(r)]
    lines += ["## Silently missed (original attention calls left, no refused site to explain them)", ""]
    if missed:
        lines += ["| model type | impl | original calls | through attnopt | left | refused sites | graph breaks |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in missed:
            breaks = "; ".join(dict.fromkeys(_generic(b) for b in r.get("graph_breaks", [])))
            lines.append(f"| {r['model_type']} | {r['implementation']} | {r.get('original_attention', 0)} | "
                         f"{r.get('through_attnopt', 0)} | {r.get('left_original', 0)} | {len(r.get('refused', []))} | "
                         f"{_cell(breaks or '-', 200)} |")
    else:
        lines.append("None.")
    lines.append("")

    wrong = [r for r in entries if r["outcome"] == "WRONG"]
    lines += ["## WRONG outcomes", ""]
    if wrong:
        lines += ["| model type | impl | max abs | max rel | inputs |", "|---|---|---:|---:|---|"]
        for r in wrong:
            lines.append(f"| {r['model_type']} | {r['implementation']} | {r.get('max_abs', 0):.3g} | "
                         f"{r.get('max_rel', 0):.3g} | {_cell(r.get('inputs', ''))} |")
        lines += ["", ("Reproduce: `python tests/zoo/run_zoo.py --types TYPE --impl IMPL --jsonl /tmp/z.jsonl "
                       "--markdown /tmp/z.md` (the tiny config is `tests.zoo.zoo.tiny_configs(TYPE)`).")]
    else:
        lines.append("None.")
    lines.append("")

    errors = collections.Counter()
    for r in entries:
        if r["outcome"] in ("error", "crash", "timeout"):
            for e in r.get("errors") or [r.get("skip_reason", r["outcome"])]:
                errors[_generic(e)] += 1
    lines += ["## Errors, crashes and timeouts", "", "| entries | error |", "|---:|---|"]
    lines += [f"| {n} | {_cell(e, 300)} |" for e, n in errors.most_common(25)] or ["| 0 | - |"]
    lines.append("")

    skip_full = collections.Counter(_cell(_generic(r.get("skip_reason", "")), 200) for r in entries
                                    if r["outcome"] == "skipped")
    lines += ["## Why entries were skipped (top 20)", "", "| entries | reason |", "|---:|---|"]
    lines += [f"| {n} | {reason} |" for reason, n in skip_full.most_common(20)] or ["| 0 | - |"]
    lines.append("")

    lines += [
        "## Per model type",
        "",
        "orig = attention calls the original makes (sdpa / softmax→matmul / fused MHA); attnopt = calls",
        "of `attnopt::exact_attention` after the exact rewrite; left = original attention calls the",
        "rewritten model still makes; sites = found by `inspect` (rewritable / refused).",
        "",
        "| model type | impl | outcome | inputs | orig | attnopt | left | sites (rewr./refused) | max rel err | refused / error / skip reason |",
        "|---|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for model_type, rs in by_type.items():
        for r in rs:
            outcome = r["outcome"]
            reason = "; ".join(filter(None, [_refusals(r), "; ".join(r.get("errors", [])), r.get("skip_reason", "")]))
            if _silently_missed(r):
                reason = f"**{_silently_missed(r)} silently missed** " + reason
            if r.get("nondeterministic"):
                reason = "(original nondeterministic) " + reason
            rel = r.get("max_rel")
            shown = "**WRONG** " if outcome == "WRONG" else ""
            inputs = (r.get("inputs") or "").split(":")[0]
            ran = outcome not in ("skipped", "timeout", "crash")
            sites = f"{r.get('sites', 0)} ({r.get('rewritable', 0)}/{len(r.get('refused', []))})" if ran else ""
            lines.append(
                f"| {model_type} | {r['implementation']} | {shown or outcome} | {inputs} | "
                f"{r.get('original_attention', '') if ran else ''} | {r.get('through_attnopt', '') if ran else ''} | "
                f"{r.get('left_original', '') if ran else ''} | "
                f"{sites} | "
                f"{'' if rel is None else f'{rel:.1e}'} | {_cell(reason, 220)} |")
    lines.append("")
    untried = [t for t in order if t not in by_type]
    if untried:
        lines += ["## Model types not tried in this run", "", ", ".join(untried), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", help="comma-separated model types (default: all of MODEL_MAPPING_NAMES)")
    parser.add_argument("--limit", type=int, help="only the first N model types")
    parser.add_argument("--impl", default="eager,sdpa", help="attention implementations, in the order run")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per entry")
    parser.add_argument("--total", type=float, default=float("inf"), help="seconds for the whole run")
    parser.add_argument("--jsonl", type=Path, default=DEFAULT_JSONL)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--resume", action="store_true", help="skip entries already in --jsonl")
    parser.add_argument("--rerun", default="", help="with --resume: outcomes to run again (e.g. skipped,timeout)")
    parser.add_argument("--report-only", action="store_true", help="only render --jsonl into --markdown")
    parser.add_argument("--note", default="", help="a paragraph for the markdown's header (e.g. which entries "
                                                   "were run again, by which command)")
    options = parser.parse_args(argv)

    from zoo import zoo

    order = zoo.model_types()
    types = options.types.split(",") if options.types else order
    if options.limit:
        types = types[: options.limit]
    if not options.report_only:
        if not options.resume and options.jsonl.exists():
            options.jsonl.unlink()
        rerun = set(filter(None, options.rerun.split(",")))
        done = {k for k, r in load(options.jsonl).items() if r["outcome"] not in rerun} if options.resume else set()
        # implementation-major: every type gets its first implementation before any its second
        tasks = [(t, impl) for impl in options.impl.split(",") for t in types if (t, impl) not in done]
        run(tasks, options.jsonl, options.budget, options.total)
    results = load(options.jsonl)
    if options.types or options.limit:
        results = {k: v for k, v in results.items() if k[0] in types}
    options.markdown.write_text(render(results, order, options.note))
    print(f"wrote {options.markdown} ({len(results)} entries)")


if __name__ == "__main__":
    main()
