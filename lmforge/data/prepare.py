"""Tokenize a corpus once into flat token files: `train.bin`, `val.bin` and `meta.json`.

Each `.bin` file is the token ids of its documents, one after another, each document followed
by the tokenizer's EOS id, stored as a raw little-endian uint16 array (uint32 for vocabularies
with more than 65535 ids). `RandomBlockDataset` / `SequentialBlockDataset` read them via memmap.

Train/val split: document i goes to val when `counter_uniform(seed, i) < val_fraction`, so the
split is deterministic and about `val_fraction` of the documents are val. When that cannot give
two non-empty splits (a single document, or a small corpus where no document draws val), the
last `val_fraction` of the *tokens* become val instead (that cut may fall inside a document);
`CorpusMeta.split_by` records which rule was used.

A later call with the same sources (same size and mtime), tokenizer, val_fraction and seed
reuses the files instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from tqdm.auto import tqdm

from lmforge.data.corpus import Source, SourceFile, iter_file_documents, resolve_sources
from lmforge.data.hashing import counter_uniform

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}

# Documents longer than this are encoded in pieces (see _split_long_text) so that the token
# lists of one huge document never sit in memory all at once.
_PIECE_CHARS = 200_000
# A batch is encoded when it holds `batch_docs` documents or this many characters.
_BATCH_CHARS = 4_000_000


class TokenizerLike(Protocol):
    """What preparation needs from a tokenizer; `lmforge.tokenizer.Tokenizer` provides it."""

    @property
    def eos_token_id(self) -> int | None: ...

    def encode_batch_fast(self, texts: Sequence[str]) -> list[list[int]]: ...

    def __len__(self) -> int: ...  # vocabulary size, special tokens included

    def save_pretrained(self, directory: Any) -> Any: ...


def choose_token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest dtype for the token files: uint16 up to 65535 ids, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """Return a SHA-256 of the tokenizer's saved vocabulary and merges (its tokenizer.json).

    Two tokenizers with the same fingerprint give the same ids, so cached token files stay valid.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        main = [p for p in files if p.name == "tokenizer.json"]
        for path in main or files:  # fall back to every saved file for other formats
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class CorpusMeta:
    """What `prepare_corpus` wrote (the contents of meta.json) plus the folder it lives in."""

    dtype: str  # numpy dtype name of the .bin files: "uint16" or "uint32"
    vocab_size: int
    eos_token_id: int
    train_tokens: int
    val_tokens: int
    train_docs: int  # documents whose EOS lies in the split
    val_docs: int
    split_by: str  # "documents" (hashed document split) or "tokens" (last tokens are val)
    val_fraction: float
    seed: int
    tokenizer_fingerprint: str
    sources: list[dict[str, Any]]  # [{"path", "size", "mtime_ns"}] in reading order
    format_version: int = FORMAT_VERSION
    out_dir: Path | None = field(default=None, compare=False)  # not saved; set on load

    def path(self, split: str) -> Path:
        """Path of the token file of `split` ("train" or "val")."""
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        if self.out_dir is None:
            raise ValueError("this CorpusMeta has no out_dir; load it with CorpusMeta.load(out_dir)")
        return Path(self.out_dir) / SPLIT_FILES[split]

    @property
    def train_path(self) -> Path:
        return self.path("train")

    @property
    def val_path(self) -> Path:
        return self.path("val")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable fields (everything but out_dir)."""
        data = dataclasses.asdict(self)
        data.pop("out_dir")
        return data

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> CorpusMeta:
        """Read `out_dir/meta.json` written by `prepare_corpus`."""
        path = Path(out_dir) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run prepare_corpus(..., out_dir={str(out_dir)!r}) first")
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(cls)} - {"out_dir"}
        if data.get("format_version") != FORMAT_VERSION or not names <= data.keys():
            raise ValueError(f"{path}: not a meta.json of this lmforge version; run prepare_corpus again")
        return cls(**{k: data[k] for k in names}, out_dir=Path(out_dir))


def _source_record(file: SourceFile) -> dict[str, Any]:
    stat = file.path.stat()
    return {"path": str(file.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load_cached(out_dir: Path, expected: dict[str, Any]) -> CorpusMeta | None:
    """Return the saved meta if it was made from exactly these inputs and its files are intact."""
    try:
        meta = CorpusMeta.load(out_dir)
    except (OSError, ValueError, TypeError):
        return None
    saved = meta.to_dict()
    if any(saved[key] != value for key, value in expected.items()):
        return None
    itemsize = np.dtype(meta.dtype).itemsize
    for split, n_tokens in (("train", meta.train_tokens), ("val", meta.val_tokens)):
        path = meta.path(split)
        if not path.is_file() or path.stat().st_size != n_tokens * itemsize:
            return None
    return meta


def _split_long_text(text: str, max_chars: int) -> list[str]:
    """Cut a long document into pieces of at most about `max_chars` characters.

    Cuts go right after a newline that has a non-space character on both sides: GPT-2-style
    pre-tokenization never joins such a newline with its neighbours, so encoding the pieces
    gives the same ids as encoding the whole text. Text with no such newline in a window is
    cut hard at `max_chars` (ids near that cut may then differ slightly).
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + 1, end)
        while cut != -1 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind("\n", start + 1, cut)
        cut = end if cut == -1 else cut + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class _SplitWriter:
    """Encodes batches of documents and appends their ids (plus EOS) to the train/val files."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        files: dict[str, BinaryIO],
        dtype: np.dtype,
        vocab_size: int,
        eos: int,
        val_fraction: float,
        seed: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.files = files  # {"train": file, "val": file}, opened for binary writing
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.eos = eos
        self.val_fraction = val_fraction
        self.seed = seed
        self.tokens = {"train": 0, "val": 0}
        self.docs = {"train": 0, "val": 0}
        self.num_docs = 0
        self.pieces: list[str] = []
        self.piece_docs: list[int] = []  # index of the document each piece belongs to
        self.batch_docs = 0
        self.batch_chars = 0

    def add(self, doc: str) -> None:
        for piece in _split_long_text(doc, _PIECE_CHARS):
            self.pieces.append(piece)
            self.piece_docs.append(self.num_docs)
        self.num_docs += 1
        self.batch_docs += 1
        self.batch_chars += len(doc)

    def flush(self) -> None:
        """Encode the pending documents and append them to their split files."""
        if not self.pieces:
            return
        ids = self.tokenizer.encode_batch_fast(self.pieces)
        parts: dict[str, list[list[int]]] = {"train": [], "val": []}
        for k, (doc_index, piece_ids) in enumerate(zip(self.piece_docs, ids, strict=True)):
            split = "val" if counter_uniform(self.seed, doc_index) < self.val_fraction else "train"
            parts[split].append(piece_ids)
            if k + 1 == len(ids) or self.piece_docs[k + 1] != doc_index:  # last piece of the doc
                parts[split].append([self.eos])
                self.docs[split] += 1
        for split, lists in parts.items():
            count = sum(len(x) for x in lists)
            if count == 0:
                continue
            # [count] ids of this batch for this split, in document order
            array = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=count)
            if array.min() < 0 or array.max() >= self.vocab_size:
                raise ValueError(
                    f"tokenizer produced id {int(array.max())} outside [0, {self.vocab_size}); "
                    "len(tokenizer) must count every id, special tokens included"
                )
            self.files[split].write(array.astype(self.dtype).tobytes())
            self.tokens[split] += count
        self.pieces, self.piece_docs = [], []
        self.batch_docs = self.batch_chars = 0


def _split_tail_tokens(train_tmp: Path, val_tmp: Path, itemsize: int, val_fraction: float) -> int:
    """Make the last `val_fraction` of all tokens the val split; return the number of val tokens.

    Called when one of the two files holds every document (in order) and the other is empty.
    """
    if val_tmp.stat().st_size > 0:  # everything landed in val: make it the "all" file
        os.replace(val_tmp, train_tmp)
        val_tmp.write_bytes(b"")
    total = train_tmp.stat().st_size // itemsize
    n_val = min(max(1, round(total * val_fraction)), total - 1)
    with open(train_tmp, "rb") as src, open(val_tmp, "wb") as dst:
        src.seek((total - n_val) * itemsize)
        shutil.copyfileobj(src, dst)  # copies in chunks: memory stays bounded
    os.truncate(train_tmp, (total - n_val) * itemsize)
    return n_val


def _count_token(path: Path, dtype: np.dtype, token: int, chunk: int = 1 << 22) -> int:
    """Count occurrences of `token` in a token file, reading it in chunks."""
    n_tokens = path.stat().st_size // dtype.itemsize
    if n_tokens == 0:
        return 0
    ids = np.memmap(path, dtype=dtype, mode="r")  # [n_tokens]
    return sum(int(np.count_nonzero(ids[i : i + chunk] == token)) for i in range(0, n_tokens, chunk))


def prepare_corpus(
    sources: Source | Sequence[Source],
    tokenizer: TokenizerLike,
    out_dir: str | os.PathLike[str],
    val_fraction: float = 0.05,
    seed: int = 0,
    show_progress: bool = True,
    batch_docs: int = 1024,
) -> CorpusMeta:
    """Tokenize the sources once into `out_dir/{train,val}.bin` + `meta.json`; return the meta.

    Documents are encoded in batches of `batch_docs` with `tokenizer.encode_batch_fast` and
    streamed to disk, so memory stays bounded whatever the corpus size. Files are written under
    temporary names and renamed into place; meta.json is written last, so a crash never leaves
    a meta.json that describes half-written token files. See the module docstring for the
    split rule and the cache.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set one (documents are separated by EOS)")
    files = resolve_sources(sources)
    vocab_size = len(tokenizer)
    dtype = choose_token_dtype(vocab_size)
    expected = {
        "format_version": FORMAT_VERSION,
        "sources": [_source_record(f) for f in files],
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = _load_cached(out_dir, expected)
    if cached is not None:
        return cached

    (out_dir / META_FILE).unlink(missing_ok=True)  # the old files are about to be replaced
    tmp = {split: out_dir / f".{name}.tmp-{os.getpid()}" for split, name in SPLIT_FILES.items()}
    meta_tmp = out_dir / f".{META_FILE}.tmp-{os.getpid()}"
    try:
        total_bytes = sum(record["size"] for record in expected["sources"])
        with (
            open(tmp["train"], "wb") as f_train,
            open(tmp["val"], "wb") as f_val,
            tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                desc="tokenizing",
                disable=not show_progress,
            ) as bar,
        ):
            writer = _SplitWriter(
                tokenizer,
                {"train": f_train, "val": f_val},
                dtype,
                vocab_size,
                eos,
                val_fraction,
                seed,
            )
            for file in files:
                for doc in iter_file_documents(file, progress=bar.update):
                    writer.add(doc)
                    if writer.batch_docs >= batch_docs or writer.batch_chars >= _BATCH_CHARS:
                        writer.flush()
                        bar.set_postfix(tokens=writer.tokens["train"] + writer.tokens["val"])
            writer.flush()

        tokens, docs, split_by = dict(writer.tokens), dict(writer.docs), "documents"
        one_split_empty = tokens["train"] == 0 or tokens["val"] == 0
        if val_fraction > 0 and (writer.num_docs == 1 or one_split_empty):
            split_by = "tokens"
            total = tokens["train"] + tokens["val"]
            tokens["val"] = _split_tail_tokens(tmp["train"], tmp["val"], dtype.itemsize, val_fraction)
            tokens["train"] = total - tokens["val"]
            docs["val"] = _count_token(tmp["val"], dtype, eos)
            docs["train"] = writer.num_docs - docs["val"]

        meta = CorpusMeta(
            dtype=dtype.name,
            vocab_size=vocab_size,
            eos_token_id=eos,
            train_tokens=tokens["train"],
            val_tokens=tokens["val"],
            train_docs=docs["train"],
            val_docs=docs["val"],
            split_by=split_by,
            val_fraction=val_fraction,
            seed=seed,
            tokenizer_fingerprint=expected["tokenizer_fingerprint"],
            sources=expected["sources"],
            out_dir=out_dir,
        )
        for split in SPLIT_FILES:
            os.replace(tmp[split], meta.path(split))
        meta_tmp.write_text(json.dumps(meta.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(meta_tmp, out_dir / META_FILE)
    finally:
        for path in (*tmp.values(), meta_tmp):
            path.unlink(missing_ok=True)
    return meta
