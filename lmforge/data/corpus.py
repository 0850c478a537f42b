"""Find and read text corpora as a stream of documents.

A *source* is one of:
  - a bundled corpus name (`shakespeare`, `zh_poems`, `sanguo`; see `lmforge.data.bundled.BUNDLED`), or the name
    of a corpus made from bundled fine-tuning data without its held-out part (`bible-en-es-train`,
    `zh-reviews-train`; see `lmforge.data.bundled.DERIVED`),
  - a `.txt` file: documents are separated by blank lines (newlines inside a document are kept),
  - a `.jsonl` file: one JSON object per line, the document in its `"text"` field,
  - a folder: every `.txt`/`.jsonl` file below it, recursively, in sorted order,
  - any of these files compressed (`.gz`, `.xz`, `.lzma`, `.bz2`, e.g. `books.txt.xz`).

Files are read by `lmforge.textio` and checked as they are read; every problem raises `CorpusError` naming the
file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from lmforge.data.bundled import BUNDLED, DERIVED, bundled_path, find_bundled
from lmforge.textio import (
    COMPRESSIONS,
    TextFileError,
    find_files,
    iter_lines,
    parse_json_line,
    text_suffix,
)

Source = Union[str, "os.PathLike[str]"]

#: the error every corpus problem raises: the one text-file error, under the name `lmforge.data` documents
CorpusError = TextFileError

_TEXT_FORMATS = {".txt": "txt", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class SourceFile:
    """One file to read: its path, format ("txt" or "jsonl") and whether it is one document."""

    path: Path
    format: str
    one_document: bool = False


def _text_format(path: Path) -> str | None:
    """Return "txt"/"jsonl" for a supported file name (compressed or not), else None."""
    return _TEXT_FORMATS.get(text_suffix(path))


def _as_list(sources: Source | Sequence[Source]) -> list[Source]:
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    return list(sources)


def resolve_sources(sources: Source | Sequence[Source]) -> list[SourceFile]:
    """Turn source names, files and folders into the ordered list of files to read.

    An existing path wins over a bundled name of the same spelling. Folders are searched
    recursively for .txt/.jsonl files (optionally compressed); hidden files and folders are
    skipped, and the files are sorted so every run reads them in the same order.
    """
    items = _as_list(sources)
    if not items:
        raise CorpusError("no corpus sources given; pass a bundled name, a .txt/.jsonl file or a folder")
    files: list[SourceFile] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = find_files(path, _TEXT_FORMATS)
            if not found:
                raise CorpusError(
                    f"{path}: folder holds no text files; put .txt or .jsonl files "
                    f"(optionally compressed: {'/'.join(COMPRESSIONS)}) in it"
                )
            files.extend(SourceFile(p, _text_format(p)) for p in found)  # type: ignore[arg-type]
        elif path.is_file():
            fmt = _text_format(path)
            if fmt is None:
                raise CorpusError(
                    f"{path}: unsupported file type; expected .txt or .jsonl, optionally compressed as "
                    f"{'/'.join(COMPRESSIONS)}. Rename a plain-text file to .txt"
                )
            files.append(SourceFile(path, fmt))
        elif isinstance(item, str) and (corpus := find_bundled(item)) is not None:
            files.append(SourceFile(bundled_path(item), "txt", corpus.one_document))
        elif isinstance(item, str) and item in DERIVED:
            files.append(SourceFile(DERIVED[item](), "txt"))
        else:
            raise CorpusError(
                f"{path}: no such file or folder (relative to {Path.cwd()}), and not a bundled "
                f"corpus name ({', '.join([*BUNDLED, *DERIVED])}); check the path"
            )
    return files


def _iter_txt(path: Path, one_document: bool, progress: Callable[[int], None] | None) -> Iterator[str]:
    """Yield the documents of a text file: blocks separated by blank (whitespace-only) lines."""
    lines: list[str] = []
    for line in iter_lines(path, progress):
        if line.strip() or (one_document and lines):
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\r\n")
            lines = []
    text = "".join(lines).rstrip() if one_document else "".join(lines).rstrip("\r\n")
    if text:
        yield text


def _iter_jsonl(path: Path, progress: Callable[[int], None] | None) -> Iterator[str]:
    """Yield the "text" field of each line of a JSON-lines file, skip blank lines, empty texts."""
    for lineno, line in enumerate(iter_lines(path, progress), start=1):
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


def iter_file_documents(file: SourceFile, progress: Callable[[int], None] | None = None) -> Iterator[str]:
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
        raise CorpusError(f"{file.path}: the file is empty ({what}); remove it from the sources or fill it")


def iter_documents(sources: Source | Sequence[Source]) -> Iterator[str]:
    """Yield every document of the sources, file by file, in a deterministic order (streaming)."""
    for file in resolve_sources(sources):
        yield from iter_file_documents(file)


def read_documents(sources: Source | Sequence[Source]) -> list[str]:
    """Return all documents of the sources as a list (convenient for small corpora and tests)."""
    return list(iter_documents(sources))
