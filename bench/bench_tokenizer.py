"""WordPiece training: `Tokenizer.train_wordpiece` against tokenizers' own `WordPieceTrainer`, same pipeline.

Both learn a BERT vocabulary (BERT's normalizer and pre-tokenizer, lowercasing, `##` pieces, the five BERT
special tokens, min_frequency 2) from the same bundled corpus, alternating, `--repeat` times each. lmforge runs
the same BPE merges over an alphabet whose numbering is fixed, so every run learns the same vocabulary;
tokenizers numbers the `##` pieces in hash-map order (huggingface/tokenizers#1794), so its runs may differ.

Per corpus: median seconds of each (ratio = peer time / lmforge time, > 1 means lmforge is faster), how many
distinct vocabularies each side's runs learnt, the vocabulary size, the pieces the two share (against the
peer's first run), and the tokens each tokenizer makes of the corpus' first 2,000 lines (special tokens not
counted).

    python bench/bench_tokenizer.py            # the bundled corpora the BERT recipes train on (~1 min)
    python bench/bench_tokenizer.py --quick    # smoke check (a few seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_json, print_table, start_run  # noqa: E402

#: (bundled corpus, vocabulary size): what the BERT recipes train on (zh-reviews: bert-zh-reviews.yaml, sanguo:
#: bert-sanguo.yaml), and English at the GPT recipes' vocabulary size.
CORPORA = [("zh-reviews-train", 6000), ("sanguo", 8000), ("shakespeare", 8000)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_peer(texts: list[str], vocab_size: int) -> Any:
    """tokenizers' WordPieceTrainer on lmforge's BERT pipeline (the one `train_wordpiece` builds)."""
    from tokenizers import AddedToken, models, trainers

    from lmforge.tokenizer.backends import bert_wordpiece_backend

    backend = bert_wordpiece_backend(
        models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100),
        lowercase=True,
        strip_accents=None,
        handle_chinese_chars=True,
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIALS],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


def train_ours(texts: list[str], vocab_size: int) -> Any:
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.train_wordpiece(iterator=texts, vocab_size=vocab_size, min_frequency=2).backend


def lines_of(name: str) -> list[str]:
    from lmforge.data import iter_documents

    return [line for doc in iter_documents([name]) for line in doc.splitlines() if line.strip()]


def run(name: str, vocab_size: int, repeat: int, limit: int | None) -> dict[str, Any]:
    texts = lines_of(name)[:limit]
    times: dict[str, list[float]] = {"lmforge": [], "tokenizers": []}
    vocabs: dict[str, list[dict[str, int]]] = {"lmforge": [], "tokenizers": []}
    backends: dict[str, Any] = {}
    for _ in range(repeat):  # alternating, so the machine's drift hits both
        for side, train in (("lmforge", train_ours), ("tokenizers", train_peer)):
            start = time.perf_counter()
            backend = train(texts, vocab_size)
            times[side].append(time.perf_counter() - start)
            vocabs[side].append(backend.get_vocab())
            backends.setdefault(side, backend)
    sample = texts[:2000]
    ours, theirs = vocabs["lmforge"][0], vocabs["tokenizers"][0]
    result = {
        "corpus": name,
        "lines": len(texts),
        "chars": sum(map(len, texts)),
        "vocab_size": vocab_size,
        "seconds": {side: statistics.median(t) for side, t in times.items()},
        "distinct_vocabularies": {
            side: len({json.dumps(sorted(v.items())) for v in vs}) for side, vs in vocabs.items()
        },
        "pieces": {side: len(v[0]) for side, v in vocabs.items()},
        "shared_pieces": len(set(ours) & set(theirs)),
        "tokens_2000_lines": {
            side: sum(len(e.ids) for e in b.encode_batch(sample, add_special_tokens=False))
            for side, b in backends.items()
        },
    }
    result["ratio"] = result["seconds"]["tokenizers"] / result["seconds"]["lmforge"]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per side and corpus (default 3)")
    p.add_argument("--quick", action="store_true", help="one corpus, 2,000 lines, 2 runs a side: checks it runs")
    args = p.parse_args(argv)
    info = start_run(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    corpora = CORPORA[:1] if args.quick else CORPORA
    repeat, limit = (2, 2000) if args.quick else (args.repeat, None)
    results = [run(name, vocab, repeat, limit) for name, vocab in corpora]
    rows = [
        [
            r["corpus"],
            f"{r['lines']:,} / {r['chars']:,}",
            f"{r['seconds']['lmforge']:.2f}",
            f"{r['seconds']['tokenizers']:.2f}",
            f"{r['ratio']:.2f}x",
            f"{r['distinct_vocabularies']['lmforge']} / {r['distinct_vocabularies']['tokenizers']} of {repeat}",
            f"{r['pieces']['lmforge']} / {r['pieces']['tokenizers']}",
            f"{r['shared_pieces']} ({r['shared_pieces'] / r['pieces']['tokenizers']:.1%})",
            f"{r['tokens_2000_lines']['lmforge']:,} / {r['tokens_2000_lines']['tokenizers']:,}",
        ]
        for r in results
    ]
    print_table(
        [
            "corpus",
            "lines / chars",
            "lmforge s",
            "tokenizers s",
            "ratio",
            "distinct vocabularies (lmforge / tokenizers)",
            "pieces",
            "shared",
            "tokens, 2,000 lines",
        ],
        rows,
    )
    summary = {"bench": "tokenizer", "machine": info, "repeat": repeat, "results": results}
    print_json(summary)
    return summary


if __name__ == "__main__":
    main()
