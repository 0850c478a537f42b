"""Data pipeline: read text corpora, tokenize them once to flat token files, cut training blocks.

    from lmforge.data import prepare_corpus, RandomBlockDataset, SequentialBlockDataset
    meta = prepare_corpus("shakespeare", tokenizer, "out/shakespeare")
    train = RandomBlockDataset(meta.train_path, block_size=256, num_samples=100_000, seed=0)
    val = SequentialBlockDataset(meta.val_path, block_size=256)

Modules: corpus.py (sources and documents), bundled.py (the datasets shipped in corpora/ and corpora made
from them), prepare.py (tokenize to .bin + meta.json), blocks.py (datasets over the .bin files), mlm.py (BERT
masking and next-sentence pairs), classification.py (labelled rows and label maps), conll.py (CoNLL token tags),
squad.py (SQuAD QA features), qa_spans.py (QA answer-span decoding), collate.py (padding collator),
hashing.py (counter-based hash), batching.py (length-bucketed inference batches).
Files are read by `lmforge.textio`; `CorpusError` is its `TextFileError`.
Names are imported on first use, so `import lmforge.data` does not load torch.
"""

from __future__ import annotations

from lmforge.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "CorpusError": "lmforge.data.corpus",
    "BUNDLED": "lmforge.data.bundled",
    "BundledCorpus": "lmforge.data.bundled",
    "bundled_path": "lmforge.data.bundled",
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
    "load_classification": "lmforge.data.classification",
    "load_conll": "lmforge.data.conll",
    "tokenize_and_align": "lmforge.data.conll",
    "load_squad": "lmforge.data.squad",
    "prepare_qa_features": "lmforge.data.squad",
    "extract_answer": "lmforge.data.qa_spans",
    "best_span": "lmforge.data.qa_spans",
    "load_sentiment": "lmforge.data.bundled",
    "load_zh_sentiment": "lmforge.data.bundled",
    "zh_reviews_corpus_file": "lmforge.data.bundled",
    "load_translation_pairs": "lmforge.data.bundled",
    "bible_books": "lmforge.data.bundled",
    "bible_training_documents": "lmforge.data.bundled",
    "bible_corpus_file": "lmforge.data.bundled",
    "export_translation_corpus": "lmforge.data.bundled",
    "DEFAULT_TEST_BOOKS": "lmforge.data.bundled",
    "load_summaries": "lmforge.data.bundled",
    "lead_1": "lmforge.data.bundled",
    "summary_split": "lmforge.data.bundled",
    "DataCollator": "lmforge.data.collate",
    "DataCollatorForSeq2Seq": "lmforge.data.collate",
    "length_sorted_batches": "lmforge.data.batching",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
