"""Write `shakespeare_word_order.jsonl`: a multiple-choice task for lm-evaluation-harness from the held-out end of
the bundled Shakespeare corpus (the quick start trains on the first 95% of its tokens and validates on the rest).

Each item is a speaker's name and the line before; the choices are the speech's next line and three shufflings
of its words, all in lower case without punctuation. The choices hold the same characters, so only the words'
order tells them apart: a model that has learnt the plays' English gives the true order the highest likelihood
far more often than chance (0.25).
Run: `python examples/lm_eval/make_word_order.py`.
"""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

from lmforge.data.bundled import bundled_path

HERE = Path(__file__).parent
ITEMS, CHOICES, HELD_OUT = 100, 4, 0.04  # the last 4% of the lines lie inside the quick start's validation 5%


def speeches(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(speaker, the speech's lines) for every speech: a "NAME." line, then its lines up to a blank one."""
    found, i = [], 0
    while i < len(lines):
        name = lines[i].strip()
        if name.endswith(".") and len(name) > 2 and name[:-1].replace(" ", "").isupper():
            body = []
            i += 1
            while i < len(lines) and lines[i].strip():
                if not lines[i].lstrip().startswith("["):  # stage directions are not spoken
                    body.append(lines[i].strip())
                i += 1
            found.append((name, body))
        i += 1
    return found


def plain(line: str) -> str:
    """The line in lower case without punctuation, so that every ordering of its words has the same characters."""
    return " ".join("".join(c for c in word if c.isalpha() or c == "'") for word in line.lower().split())


def items() -> list[dict]:
    """The task's items: {"context", "choices", "label"} (the same every run: seeded)."""
    with lzma.open(bundled_path("shakespeare"), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    tail = speeches(lines[int(len(lines) * (1 - HELD_OUT)) :])
    rng = random.Random(0)
    candidates = [(name, body, k) for name, body in tail for k, line in enumerate(body)
                  if 6 <= len(plain(line).split()) <= 12]  # fmt: skip
    rows = []
    for name, body, k in rng.sample(candidates, ITEMS):
        words = plain(body[k]).split()
        true, wrong = " ".join(words), []
        while len(wrong) < CHOICES - 1:
            shuffled = rng.sample(words, len(words))
            text = " ".join(shuffled)
            if text != true and text not in wrong:
                wrong.append(text)
        label = rng.randrange(CHOICES)
        choices = wrong[:label] + [true] + wrong[label:]
        rows.append({"context": "\n".join([name, *body[max(0, k - 1) : k]]), "choices": ["\n" + c for c in choices],
                     "label": label})  # fmt: skip
    return rows


def main() -> None:
    rows = items()
    out = HERE / "shakespeare_word_order.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} items -> {out}")


if __name__ == "__main__":
    main()
