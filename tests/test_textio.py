"""lmforge.textio: the one text-file reader (compressions, UTF-8 rule, binary/empty files, folders, progress)."""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable
from pathlib import Path

import pytest

from lmforge import textio
from lmforge.data import CorpusError

TEXT = "\ufeffline one\r\nwörld\rstill line two\n" + "x" * 10_000 + "\nlast, no newline"
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda b: b,
    ".gz": lambda b: gzip.compress(b, mtime=0),
    ".xz": lzma.compress,
    ".lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
    ".bz2": bz2.compress,
}


def test_corpus_error_is_the_one_error_type() -> None:
    assert CorpusError is textio.TextFileError and issubclass(CorpusError, ValueError)


@pytest.mark.parametrize("ext", list(COMPRESSORS))
def test_every_compression_reads_the_same_lines_and_reports_all_bytes(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"a.txt{ext}"
    path.write_bytes(COMPRESSORS[ext](TEXT.encode("utf-8")))
    reported: list[int] = []
    lines = list(textio.iter_lines(path, progress=reported.append))
    # the BOM is dropped; lines end at "\n" only and keep their endings as written
    assert lines[:2] == ["line one\r\n", "wörld\rstill line two\n"]
    assert "".join(lines) == TEXT[1:] == textio.read_text(path)
    assert sum(reported) == path.stat().st_size
    assert textio.text_suffix(path) == ".txt" and textio.is_compressed(path) == bool(ext)


@pytest.mark.parametrize("ext", [e for e in COMPRESSORS if e])
def test_damaged_compressed_files_name_the_file(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"bad.txt{ext}"
    path.write_bytes(b"not compressed at all")
    with pytest.raises(textio.TextFileError, match=rf"bad\.txt\{ext}: cannot decompress"):
        textio.read_text(path)
    path.write_bytes(COMPRESSORS[ext](TEXT.encode("utf-8"))[:-12])  # truncated
    with pytest.raises(textio.TextFileError, match="cannot decompress"):
        textio.read_text(path)


def test_invalid_utf8_in_a_compressed_file_names_the_decompressed_offset(tmp_path: Path) -> None:
    path = tmp_path / "late.txt.gz"
    path.write_bytes(gzip.compress(b"x" * 9_000 + b"\nab\xff\n"))
    with pytest.raises(textio.TextFileError, match=r"byte offset 9003 of the decompressed text \(line 2"):
        textio.read_text(path)


def test_binary_missing_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "model.txt").write_bytes(b"PK\x03\x04\x00binary")
    with pytest.raises(textio.TextFileError, match="NUL bytes.*binary file"):
        textio.read_text(tmp_path / "model.txt")
    with pytest.raises(textio.TextFileError, match=r"nope\.txt: no such file"):
        textio.read_text(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(textio.TextFileError, match=r"blank\.txt: the file is empty"):
        textio.read_text(tmp_path / "blank.txt")
    assert textio.read_text(tmp_path / "blank.txt", allow_empty=True) == " \n\t\n"


def test_find_files_is_sorted_recursive_and_skips_hidden(tmp_path: Path) -> None:
    for name in ["b.txt", "a/c.jsonl.xz", "a/d.TXT", ".hidden/e.txt", "a/.f.txt", "g.csv"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = textio.find_files(tmp_path, {".txt", ".jsonl"})
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/c.jsonl.xz", "a/d.TXT", "b.txt"]


def test_parse_json_line_names_file_and_line(tmp_path: Path) -> None:
    assert textio.parse_json_line(tmp_path / "x.jsonl", 1, '{"text": "hi"}', "{}") == {"text": "hi"}
    with pytest.raises(textio.TextFileError, match=r"x\.jsonl, line 4: not valid JSON"):
        textio.parse_json_line(tmp_path / "x.jsonl", 4, '{"text": ', '{"text": "..."}')
