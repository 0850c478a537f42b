"""A knowledge base's folder: embeddings.safetensors, chunks.jsonl and index.json, written atomically and read
back with every check that the three files belong together.

    embeddings.safetensors   float32 (N, D) unit rows, tensor "embeddings"
    chunks.jsonl             one Chunk per line: {"text", "source", "start", "end"}
    index.json               {"format", "version", "count", "dims", "dtype", "embedder", "chunking", ...}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from lmforge.files import atomic_directory, atomic_write_bytes, atomic_write_text

FORMAT = "lmforge-knowledge-base"
VERSION = 1
INDEX, EMBEDDINGS, CHUNKS = "index.json", "embeddings.safetensors", "chunks.jsonl"
_FORMAT_KEYS = ("format", "version", "count", "dims", "dtype")


@dataclass(frozen=True)
class Chunk:
    """A passage of a source: `text == source_text[start:end]`."""

    text: str
    source: str
    start: int
    end: int


def write_store(directory: str | os.PathLike, embeddings: Tensor, chunks: list[Chunk], info: dict[str, Any]) -> Path:
    """Write `embeddings` (N, D) float32, `chunks` and `info` into `directory`, atomically: a reader sees the
    old knowledge base or the new one. An existing folder is replaced only if it is a knowledge base (or
    empty)."""
    directory = Path(directory)
    if directory.exists() and (
        not directory.is_dir() or (any(directory.iterdir()) and not (directory / INDEX).is_file())
    ):
        raise ValueError(
            f"{directory} exists and is not a knowledge base; saving replaces the whole folder, so "
            "save to a new or empty folder"
        )
    count, dims = embeddings.shape
    index = {"format": FORMAT, "version": VERSION, "count": count, "dims": dims, "dtype": "float32", **info}
    with atomic_directory(directory) as tmp:
        atomic_write_bytes(
            tmp / EMBEDDINGS,
            safetensors_bytes(
                {"embeddings": embeddings.contiguous()}, metadata={"format": FORMAT, "count": str(count)}
            ),
        )
        atomic_write_text(tmp / CHUNKS, "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in chunks))
        atomic_write_text(tmp / INDEX, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return directory


def read_store(directory: str | os.PathLike) -> tuple[Tensor, list[Chunk], dict[str, Any]]:
    """(embeddings (N, D), chunks, info) of a folder written by `write_store`, checking that its three files
    agree; `info` is index.json without its format fields."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no knowledge base at {directory}; build one with KnowledgeBase.build(...)"
            ".save(directory) or `lmforge index`"
        )
    missing = [name for name in (INDEX, EMBEDDINGS, CHUNKS) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a complete knowledge base: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; build it again"
        )
    index = _read_index(directory / INDEX)
    embeddings = _read_embeddings(directory / EMBEDDINGS, index)
    chunks = _read_chunks(directory / CHUNKS, index["count"])
    return embeddings, chunks, {k: v for k, v in index.items() if k not in _FORMAT_KEYS}


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); build the knowledge base again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lmforge knowledge-base index (format {FORMAT!r} expected)")
    if not isinstance(index.get("version"), int) or index["version"] > VERSION:
        raise ValueError(
            f"{path} has format version {index.get('version')!r}; this lmforge reads version "
            f"{VERSION} (upgrade lmforge, or build the knowledge base again)"
        )
    for key in ("count", "dims"):
        if isinstance(index.get(key), bool) or not isinstance(index.get(key), int) or index[key] < 1:
            raise ValueError(f"{path}: {key!r} must be a positive integer, got {index.get(key)!r}")
    if not isinstance(index.get("embedder"), dict):
        raise ValueError(f"{path} has no 'embedder' section; build the knowledge base again")
    index.setdefault("chunking", {})
    return index


def _read_embeddings(path: Path, index: dict[str, Any]) -> Tensor:
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"cannot read {path} ({err}); the file is damaged: build the knowledge base again") from None
    if "embeddings" not in tensors:
        raise ValueError(f"{path} has no 'embeddings' tensor (found {sorted(tensors)})")
    embeddings = tensors["embeddings"]
    if embeddings.dtype != torch.float32 or embeddings.dim() != 2:
        raise ValueError(f"{path}: embeddings must be float32 (N, D), got {embeddings.dtype} {tuple(embeddings.shape)}")
    if tuple(embeddings.shape) != (index["count"], index["dims"]):
        raise ValueError(
            f"{path} holds {tuple(embeddings.shape)} embeddings but index.json says "
            f"{index['count']} chunks of {index['dims']} dims; the files do not belong together: "
            "build the knowledge base again"
        )
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{path} holds NaN or infinite values; build the knowledge base again")
    norms = embeddings.norm(dim=1)
    if not bool(((norms - 1).abs() < 1e-3).all()):
        raise ValueError(
            f"{path}: embeddings are not unit vectors (norms {float(norms.min()):.4g}.."
            f"{float(norms.max()):.4g}); build the knowledge base again"
        )
    return embeddings


def _read_chunks(path: Path, count: int) -> list[Chunk]:
    chunks = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 ({err}); build the knowledge base again") from None
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            chunk = Chunk(record["text"], record["source"], record["start"], record["end"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} line {number} is not a chunk ({type(err).__name__}: {err}); each line needs "
                "text, source, start, end: build the knowledge base again"
            ) from None
        if not (
            isinstance(chunk.text, str)
            and isinstance(chunk.source, str)
            and isinstance(chunk.start, int)
            and isinstance(chunk.end, int)
            and chunk.end - chunk.start == len(chunk.text)
        ):
            raise ValueError(
                f"{path} line {number}: text, source, start, end do not agree (end - start must be "
                "the length of text); build the knowledge base again"
            )
        chunks.append(chunk)
    if len(chunks) != count:
        raise ValueError(
            f"{path} has {len(chunks)} chunks but index.json says {count}; the files do not belong "
            "together: build the knowledge base again"
        )
    return chunks
