"""Find and read text corpora as a stream of documents.

A *source* is one of:
  - a bundled corpus name (`shakespeare`, `zh_poems`, `sanguo`; see `BUNDLED`), or the name of a
    corpus made from bundled fine-tuning data without its held-out part (`bible-en-es-train`,
    `zh-reviews-train`; see `DERIVED`),
  - a `.txt` file: documents are separated by blank lines (newlines inside a document are kept),
  - a `.jsonl` file: one JSON object per line, the document in its `"text"` field,
  - a folder: every `.txt`/`.jsonl` file below it, recursively, in sorted order,
  - any of these files compressed as `.gz` or `.xz` (e.g. `books.txt.xz`).

Files are checked as they are read; every problem raises `CorpusError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import lzma
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

Source = Union[str, "os.PathLike[str]"]

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"

# bytes inspected up front for NUL bytes (the cheap "is this a binary file?" test)
_SNIFF_BYTES = 8192
_TEXT_FORMATS = {".txt": "txt", ".jsonl": "jsonl"}
_COMPRESSIONS = (".gz", ".xz")


class CorpusError(ValueError):
    """A corpus source is missing, unreadable or malformed; the message names file and fix."""


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


#: both sides of the bundled English-Spanish verse pairs, training books only (held-out books excluded)
BIBLE_TRAIN = "bible-en-es-train"
#: the training split of the bundled Chinese sentiment reviews, one review per document, no labels
ZH_REVIEWS_TRAIN = "zh-reviews-train"
#: corpus names made from bundled fine-tuning data (without its held-out part): the name of the
#: `lmforge.data.finetune` function that writes the corpus file once and returns its path
DERIVED = {BIBLE_TRAIN: "bible_corpus_file", ZH_REVIEWS_TRAIN: "zh_reviews_corpus_file"}


def _find_bundled(name: str) -> BundledCorpus | None:
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
    corpus = _find_bundled(name)
    if corpus is None:
        raise CorpusError(f"{name!r} is not a bundled corpus; choose one of: {', '.join(BUNDLED)}")
    if not corpus.path.is_file():
        raise CorpusError(
            f"bundled corpus file {corpus.path} is missing from the installation; "
            "reinstall lmforge (the corpora ship as package data)"
        )
    return corpus.path


@dataclass(frozen=True)
class SourceFile:
    """One file to read: its path, format ("txt" or "jsonl") and whether it is one document."""

    path: Path
    format: str
    one_document: bool = False


def _text_format(path: Path) -> str | None:
    """Return "txt"/"jsonl" for a supported file name (compressed or not), else None."""
    name = path.name.lower()
    for compression in _COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
            break
    return _TEXT_FORMATS.get(os.path.splitext(name)[1])


def _as_list(sources: Source | Sequence[Source]) -> list[Source]:
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    return list(sources)


def resolve_sources(sources: Source | Sequence[Source]) -> list[SourceFile]:
    """Turn source names, files and folders into the ordered list of files to read.

    An existing path wins over a bundled name of the same spelling. Folders are searched
    recursively for .txt/.jsonl files (optionally .gz/.xz); hidden files and folders are
    skipped, and the files are sorted so every run reads them in the same order.
    """
    items = _as_list(sources)
    if not items:
        raise CorpusError(
            "no corpus sources given; pass a bundled name, a .txt/.jsonl file or a folder"
        )
    files: list[SourceFile] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and _text_format(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CorpusError(
                    f"{path}: folder holds no text files; put .txt or .jsonl files "
                    "(optionally .gz/.xz compressed) in it"
                )
            files.extend(SourceFile(p, _text_format(p)) for p in found)  # type: ignore[arg-type]
        elif path.is_file():
            fmt = _text_format(path)
            if fmt is None:
                raise CorpusError(
                    f"{path}: unsupported file type; expected .txt or .jsonl, optionally "
                    "compressed as .gz or .xz. Rename a plain-text file to .txt"
                )
            files.append(SourceFile(path, fmt))
        elif isinstance(item, str) and _find_bundled(item) is not None:
            corpus = _find_bundled(item)
            files.append(SourceFile(bundled_path(item), "txt", corpus.one_document))  # type: ignore[union-attr]
        elif isinstance(item, str) and item in DERIVED:
            from lmforge.data import finetune  # lazy: finetune.py imports this module

            files.append(SourceFile(getattr(finetune, DERIVED[item])(), "txt"))
        else:
            raise CorpusError(
                f"{path}: no such file or folder (relative to {Path.cwd()}), and not a bundled "
                f"corpus name ({', '.join([*BUNDLED, *DERIVED])}); check the path"
            )
    return files


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Yield (decompressed byte stream, raw file); the raw file's position measures progress."""
    with open(path, "rb") as raw:
        name = path.name.lower()
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, raw  # type: ignore[misc]
        elif name.endswith(".xz"):
            with lzma.LZMAFile(raw, mode="rb") as stream:
                yield stream, raw  # type: ignore[misc]
        else:
            yield raw, raw


def _iter_lines(path: Path, progress: Callable[[int], None] | None) -> Iterator[tuple[int, str]]:
    """Yield (line number, line with its "\\n") of a UTF-8 text file, checking it is text.

    `progress`, if given, is called with the number of on-disk bytes consumed since its last
    call; over the whole file the calls add up to the file size.
    """
    compressed = path.name.lower().endswith(_COMPRESSIONS)
    where = " of the decompressed text" if compressed else ""
    size = path.stat().st_size
    reported = 0
    try:
        with _open_binary(path) as (stream, raw):
            head = stream.read(_SNIFF_BYTES)
            if b"\0" in head:
                first_nul = head.index(b"\0")
                raise CorpusError(
                    f"{path}: contains NUL bytes (first at byte {first_nul}{where}); this looks "
                    "like a binary file, not text. Pass only UTF-8 text (.txt/.jsonl) files"
                )
            offset = 0  # byte offset of the current line in the (decompressed) text
            for lineno, line in enumerate(_lines(head, stream), start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(
                        f"{path}: not valid UTF-8 at byte offset {offset + err.start}{where} "
                        f"(line {lineno}: {err.reason}). Re-encode the file to UTF-8, e.g. "
                        "`iconv -f GB18030 -t UTF-8 old.txt > new.txt` (with the file's real "
                        "encoding)"
                    ) from None
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]  # drop a UTF-8 byte-order mark
                offset += len(line)
                if progress is not None and lineno % 256 == 0:
                    position = raw.tell()
                    progress(position - reported)
                    reported = position
                yield lineno, text
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile) as err:
        raise CorpusError(
            f"{path}: cannot decompress ({err}); the file is truncated or not really "
            f"{path.suffix}-compressed. Re-create it, or decompress it by hand to check"
        ) from None
    if progress is not None:
        progress(size - reported)


def _lines(head: bytes, stream: BinaryIO) -> Iterator[bytes]:
    """Yield the lines of `head + rest of stream` without reading the stream into memory."""
    pending = b""
    for line in head.splitlines(keepends=True):
        if pending:
            yield pending
        pending = line
    if pending and not pending.endswith(b"\n"):
        pending += stream.readline()  # finish the line cut by the end of `head`
    if pending:
        yield pending
    yield from stream


def _iter_txt(
    path: Path, one_document: bool, progress: Callable[[int], None] | None
) -> Iterator[str]:
    """Yield the documents of a text file: blocks separated by blank (whitespace-only) lines."""
    lines: list[str] = []
    for _, line in _iter_lines(path, progress):
        if line.strip() or (one_document and lines):
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\r\n")
            lines = []
    text = "".join(lines).rstrip() if one_document else "".join(lines).rstrip("\r\n")
    if text:
        yield text


def parse_json_line(path: Path, lineno: int, line: str, example: str) -> Any:
    """One line of a JSON-lines file, or a CorpusError naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise CorpusError(
            f"{path}, line {lineno}: not valid JSON ({err.msg}); each line must be one JSON "
            f"object such as {example}"
        ) from None


def _iter_jsonl(path: Path, progress: Callable[[int], None] | None) -> Iterator[str]:
    """Yield the "text" field of each line of a JSON-lines file, skip blank lines, empty texts."""
    for lineno, line in _iter_lines(path, progress):
        if not line.strip():
            continue
        record = parse_json_line(path, lineno, line, '{"text": "..."}')
        if not isinstance(record, dict) or "text" not in record:
            found = f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
            raise CorpusError(
                f'{path}, line {lineno}: no "text" field (found {found}); each line must be a JSON '
                'object with the document in "text", e.g. {"text": "Once upon a time..."}'
            )
        text = record["text"]
        if not isinstance(text, str):
            raise CorpusError(
                f'{path}, line {lineno}: "text" must be a string, got {type(text).__name__}; '
                "store the document as a JSON string"
            )
        if text.strip():
            yield text


def iter_file_documents(
    file: SourceFile, progress: Callable[[int], None] | None = None
) -> Iterator[str]:
    """Yield the documents of one resolved source file; raise CorpusError if it holds none."""
    if file.format == "jsonl":
        documents = _iter_jsonl(file.path, progress)
    else:
        documents = _iter_txt(file.path, file.one_document, progress)
    count = 0
    for doc in documents:
        count += 1
        yield doc
    if count == 0:
        what = 'no non-empty "text" documents' if file.format == "jsonl" else "only whitespace"
        raise CorpusError(
            f"{file.path}: the file is empty ({what}); remove it from the sources or fill it"
        )


def iter_documents(sources: Source | Sequence[Source]) -> Iterator[str]:
    """Yield every document of the sources, file by file, in a deterministic order (streaming)."""
    for file in resolve_sources(sources):
        yield from iter_file_documents(file)


def read_documents(sources: Source | Sequence[Source]) -> list[str]:
    """Return all documents of the sources as a list (convenient for small corpora and tests)."""
    return list(iter_documents(sources))
