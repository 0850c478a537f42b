"""Data pipeline: read text corpora, tokenize them once to flat token files, cut training blocks.

    from lmforge.data import prepare_corpus, RandomBlockDataset, SequentialBlockDataset
    meta = prepare_corpus("shakespeare", tokenizer, "out/shakespeare")
    train = RandomBlockDataset(meta.train_path, block_size=256, num_samples=100_000, seed=0)
    val = SequentialBlockDataset(meta.val_path, block_size=256)

Modules: corpus.py (sources and documents), prepare.py (tokenize to .bin + meta.json),
blocks.py (datasets over the .bin files), mlm.py (BERT masking and
next-sentence pairs), finetune.py (classification, CoNLL token tags, SQuAD QA, translation pairs),
hashing.py (counter-based hash), batching.py (length-bucketed inference batches), corpora/ (bundled text).
Names are imported on first use, so `import lmforge.data` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "CorpusError": "lmforge.data.corpus",
    "BUNDLED": "lmforge.data.corpus",
    "BundledCorpus": "lmforge.data.corpus",
    "bundled_path": "lmforge.data.corpus",
    "resolve_sources": "lmforge.data.corpus",
    "iter_documents": "lmforge.data.corpus",
    "read_documents": "lmforge.data.corpus",
    "prepare_corpus": "lmforge.data.prepare",
    "CorpusMeta": "lmforge.data.prepare",
    "choose_token_dtype": "lmforge.data.prepare",
    "tokenizer_fingerprint": "lmforge.data.prepare",
    "RandomBlockDataset": "lmforge.data.blocks",
    "SequentialBlockDataset": "lmforge.data.blocks",
    "MLMCollator": "lmforge.data.mlm",
    "nsp_pairs": "lmforge.data.mlm",
    "load_classification": "lmforge.data.finetune",
    "load_conll": "lmforge.data.finetune",
    "tokenize_and_align": "lmforge.data.finetune",
    "load_squad": "lmforge.data.finetune",
    "prepare_qa_features": "lmforge.data.finetune",
    "extract_answer": "lmforge.data.qa_spans",
    "best_span": "lmforge.data.qa_spans",
    "load_sentiment": "lmforge.data.finetune",
    "load_zh_sentiment": "lmforge.data.finetune",
    "zh_reviews_corpus_file": "lmforge.data.finetune",
    "load_translation_pairs": "lmforge.data.finetune",
    "bible_books": "lmforge.data.finetune",
    "bible_training_documents": "lmforge.data.finetune",
    "bible_corpus_file": "lmforge.data.finetune",
    "export_translation_corpus": "lmforge.data.finetune",
    "DEFAULT_TEST_BOOKS": "lmforge.data.finetune",
    "DataCollator": "lmforge.data.collate",
    "length_sorted_batches": "lmforge.data.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
