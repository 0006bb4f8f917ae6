"""Held-out evaluation prompts, one JSON object a line in ``data/prompts.jsonl``: domain, text, source.

Every prompt has the same byte length so that a whole domain (or all of them) runs as one batch with no
padding, and every routed token is a real prompt or generated token.

Regenerate (deterministic for a given Python) with ``python -m moeprobe.demo.prompts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .corpus import DOMAINS, build_corpus

PROMPT_BYTES = 160
PROMPTS_PER_DOMAIN = 8
_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    domain: str
    text: str
    source: str


def load_prompts() -> list[Prompt]:
    """The prompts shipped with the package, in domain order."""
    text = resources.files("moeprobe.demo").joinpath("data", _FILE).read_text(encoding="utf-8")
    return [Prompt(**json.loads(line)) for line in text.splitlines() if line.strip()]


def make_prompts(held_out: dict[str, bytes], train: dict[str, bytes]) -> list[Prompt]:
    """Windows of PROMPT_BYTES at evenly spaced line starts of each domain's held-out text; a window that
    also occurs verbatim in the training text (shared boilerplate) moves on to the next line."""
    prompts: list[Prompt] = []
    for domain in DOMAINS:
        data = held_out[domain]
        stride = len(data) // PROMPTS_PER_DOMAIN
        for i in range(PROMPTS_PER_DOMAIN):
            start = data.find(b"\n", i * stride) + 1
            while True:
                # Skip blank lines so no prompt starts in the gap between two documents.
                while data[start : start + 1] == b"\n":
                    start += 1
                window = data[start : start + PROMPT_BYTES]
                if window not in train[domain]:
                    break
                start = data.find(b"\n", start) + 1
            prompts.append(Prompt(domain, window.decode("ascii"), f"held-out byte {start}"))
    return prompts


def write_prompts(path: Path) -> None:
    corpus = build_corpus()
    prompts = make_prompts({d: s.held_out for d, s in corpus.items()}, {d: s.train for d, s in corpus.items()})
    with path.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"domain": p.domain, "text": p.text, "source": p.source}) + "\n")


if __name__ == "__main__":
    target = Path(__file__).parent / "data" / _FILE
    write_prompts(target)
    print(f"wrote {target}")
