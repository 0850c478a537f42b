"""The one reader of text files: every lmforge module that reads a user's or a bundled text file uses it.

One set of rules for all of them (corpora, fine-tuning files, knowledge-base documents, tokenizer training):
  - compression by extension: ``.gz``, ``.xz``, ``.lzma``, ``.bz2`` (``books.txt.xz``), decompressed as read;
  - encoding: UTF-8, a leading byte-order mark dropped; lines end at "\\n" and keep their endings as written
    ("\\r\\n" untranslated, a lone "\\r" is not a line end);
  - a file with NUL bytes near its start is a binary file, not text;
  - every problem raises `TextFileError` (a ValueError) whose message names the file, where (line or byte
    offset) and the fix.

API:
  - `TextFileError`: the one error type (`lmforge.data.CorpusError` is this class).
  - `COMPRESSIONS`: the compressed-file extensions read.
  - `is_compressed(path)`: whether the name ends in one of `COMPRESSIONS`.
  - `text_suffix(path)`: the lowercase suffix under any compression ("a.TSV.gz" -> ".tsv").
  - `find_files(folder, suffixes)`: the files below `folder` whose `text_suffix` is one of `suffixes`,
    recursively, hidden files and folders skipped, sorted (every run reads them in the same order).
  - `iter_lines(path, progress=None)`: stream the lines of a file (endings kept), checked as read; memory stays
    flat. `progress(n)` is called now and then with the on-disk bytes consumed since its last call.
  - `read_text(path, allow_empty=False)`: the whole file as one string, same checks; whitespace only is an
    error unless `allow_empty`.
  - `parse_json_line(path, lineno, line, example)`: one JSON-lines record, or a TextFileError naming the line.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

#: compressed-file extension -> its opener (each takes an open binary file and "rb")
_DECOMPRESSORS: dict[str, Callable[..., BinaryIO]] = {
    ".gz": gzip.open,
    ".xz": lzma.open,
    ".lzma": lzma.open,
    ".bz2": bz2.open,
}
COMPRESSIONS = tuple(_DECOMPRESSORS)

# bytes inspected up front for NUL bytes (the cheap "is this a binary file?" test)
_SNIFF_BYTES = 8192
# lines between two progress reports
_PROGRESS_EVERY = 256


class TextFileError(ValueError):
    """A text file is missing, unreadable or malformed; the message names the file, the place and the fix."""


def _compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in _DECOMPRESSORS else None


def is_compressed(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a compressed file (by extension, see `COMPRESSIONS`)."""
    return _compression(Path(path)) is not None


def text_suffix(path: str | os.PathLike[str]) -> str:
    """The lowercase suffix of the text under any compression: "a.TSV.gz" -> ".tsv", "notes" -> ""."""
    path = Path(path)
    if is_compressed(path):
        path = path.with_suffix("")
    return path.suffix.lower()


def find_files(folder: str | os.PathLike[str], suffixes: Collection[str]) -> list[Path]:
    """The files below `folder` (recursively) whose `text_suffix` is in `suffixes`, hidden files and
    folders skipped, in sorted order."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and text_suffix(p) in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Yield (decompressed byte stream, raw file); the raw file's position measures progress."""
    if not path.is_file():
        raise TextFileError(f"{path}: no such file (relative to {Path.cwd()}); check the path")
    compression = _compression(path)
    with open(path, "rb") as raw:
        if compression is None:
            yield raw, raw
        else:
            with _DECOMPRESSORS[compression](raw, "rb") as stream:
                yield stream, raw


def _lines(head: bytes, stream: BinaryIO) -> Iterator[bytes]:
    """Yield the "\\n"-ended lines of `head + rest of stream` without reading the stream into memory."""
    lines = io.BytesIO(head).readlines()
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += stream.readline()  # finish the line cut by the end of `head`
    yield from lines
    yield from stream


def iter_lines(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (compressed or not), each with its line ending, checking as it goes.

    A leading byte-order mark is dropped. `progress`, if given, is called with the number of on-disk bytes
    consumed since its last call; over the whole file the calls add up to the file size.
    """
    path = Path(path)
    where = " of the decompressed text" if is_compressed(path) else ""
    reported = 0
    try:
        with _open_binary(path) as (stream, raw):
            head = stream.read(_SNIFF_BYTES)
            if b"\0" in head:
                first_nul = head.index(b"\0")
                raise TextFileError(
                    f"{path}: contains NUL bytes (first at byte {first_nul}{where}); this looks like a "
                    "binary file, not text. Pass only UTF-8 text files"
                )
            offset = 0  # byte offset of the current line in the (decompressed) text
            for lineno, line in enumerate(_lines(head, stream), start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise TextFileError(
                        f"{path}: not valid UTF-8 at byte offset {offset + err.start}{where} (line {lineno}: "
                        f"{err.reason}). Re-encode the file to UTF-8, e.g. `iconv -f GB18030 -t UTF-8 old.txt > "
                        "new.txt` (with the file's real encoding)"
                    ) from None
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]  # drop a UTF-8 byte-order mark
                offset += len(line)
                if progress is not None and lineno % _PROGRESS_EVERY == 0:
                    position = raw.tell()
                    progress(position - reported)
                    reported = position
                yield text
    except (EOFError, lzma.LZMAError, OSError) as err:
        if isinstance(err, OSError) and not is_compressed(path):
            raise  # a plain file that cannot be read: the OS error says why
        raise TextFileError(
            f"{path}: cannot decompress ({err}); the file is truncated or not really {path.suffix}-compressed. "
            "Re-create it, or decompress it by hand to check"
        ) from None
    if progress is not None:
        progress(path.stat().st_size - reported)


def read_text(path: str | os.PathLike[str], allow_empty: bool = False) -> str:
    """The whole text of a UTF-8 file (compressed or not), checked like `iter_lines`; a file holding only
    whitespace is a TextFileError unless `allow_empty`."""
    text = "".join(iter_lines(path))
    if not allow_empty and not text.strip():
        raise TextFileError(f"{path}: the file is empty (only whitespace); fill it or leave it out")
    return text


def parse_json_line(path: str | os.PathLike[str], lineno: int, line: str, example: str) -> Any:
    """One line of a JSON-lines file, or a TextFileError naming the file and line (`example`: a valid line)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise TextFileError(
            f"{path}, line {lineno}: not valid JSON ({err.msg}); each line must be one JSON object such as {example}"
        ) from None
