"""Sentence (pair) classification files: labelled rows from .csv/.tsv/.jsonl/.txt, and the label map.

- `read_records`: the records of a labelled file holding the named fields, whatever its format: .csv/.tsv with a
  header row, .jsonl (one object per line) or .txt ("label<TAB>text" per line), optionally compressed.
- `load_classification`: examples ``{"text", "text_pair"?, "label"}`` and a deterministic label map.

Every problem with a file raises `TextFileError` (= `lmforge.data.CorpusError`) naming the file, the line and the
fix; a missing column or field raises its subclass `MissingFieldError`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.textio import TextFileError, parse_json_line, read_text, text_suffix

#: file formats by suffix (under any compression)
FORMATS = (".csv", ".tsv", ".jsonl", ".txt")


class MissingFieldError(TextFileError):
    """A labelled file lacks a column (csv/tsv header) or a field (jsonl record) the caller asked for."""


def file_format(path: Path) -> str:
    """ "csv", "tsv", "jsonl" or "txt" for a labelled file (compressed or not); else a TextFileError."""
    suffix = text_suffix(path)
    if suffix in FORMATS:
        return suffix[1:]
    raise TextFileError(f"{path}: unknown file type {suffix or '(none)'!r}; use .csv, .tsv, .jsonl or .txt")


def read_records(
    path: str | os.PathLike[str], fields: Sequence[str], quoting: int = csv.QUOTE_MINIMAL
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) pairs holding at least `fields`, whatever the file format.

    csv/tsv cells may be quoted as the csv module writes them; ``quoting=csv.QUOTE_NONE`` reads a plain
    tab-separated file whose texts hold literal quote characters. In a .txt file `fields` are (text, label).
    """
    path = Path(path)
    fmt = file_format(path)
    text = read_text(path)
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="," if fmt == "csv" else "\t", quoting=quoting)
        found = reader.fieldnames or []
        missing = [f for f in fields if f not in found]
        if missing:
            raise MissingFieldError(
                f"{path}, line 1: header has no column {', '.join(map(repr, missing))} (found "
                f"{', '.join(map(repr, found))}); rename the column or pass text_field=/label_field=/text_pair_field="
            )
        for row in reader:
            lineno = reader.line_num
            if any(row.get(f) is None for f in fields):
                raise TextFileError(
                    f"{path}, line {lineno}: row has fewer cells than the header; give every row one cell per "
                    "column (quote cells holding the delimiter)"
                )
            yield lineno, row
    elif fmt == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = parse_json_line(path, lineno, line, '{"text": "...", "label": "pos"}')
            if not isinstance(record, dict):
                raise TextFileError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}; write one object "
                    "per line"
                )
            missing = [f for f in fields if f not in record]
            if missing:
                raise MissingFieldError(
                    f"{path}, line {lineno}: no field {', '.join(map(repr, missing))} (found "
                    f"{', '.join(map(repr, sorted(record)))}); rename the field or pass "
                    "text_field=/label_field=/text_pair_field="
                )
            yield lineno, record
    else:  # txt: label<TAB>text
        if len(fields) > 2:
            raise TextFileError(
                f"{path}: .txt files hold 'label<TAB>text' lines, so text_pair_field is not supported; use .csv, "
                ".tsv or .jsonl for text pairs"
            )
        text_field, label_field = fields
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            label, tab, body = line.partition("\t")
            if not tab:
                raise TextFileError(f"{path}, line {lineno}: no TAB; write each line as 'label<TAB>text'")
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
    for lineno, row in read_records(path, fields):
        for field in fields[:1] + fields[2:]:
            if not isinstance(row[field], str):
                raise TextFileError(
                    f"{path}, line {lineno}: field {field!r} must be a string, got {type(row[field]).__name__}"
                )
        label = row[label_field]
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise TextFileError(
                f"{path}, line {lineno}: label must be a string or an integer, got {type(label).__name__}"
            )
        raw.append((lineno, row))
    if not raw:
        raise TextFileError(f"{path}: holds no examples; add at least one labelled line")

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
            raise TextFileError(
                f"{path}, line {lineno}: unknown label {key!r}; known labels are "
                f"{sorted(label2id)}. Fix the label or add it to label2id"
            )
        example: dict[str, Any] = {"text": row[text_field], "label": label2id[key]}
        if text_pair_field:
            example["text_pair"] = row[text_pair_field]
        examples.append(example)
    return examples, label2id
