"""Training and validation batches cut from the flat token files written by `prepare_corpus`.

Every item is a dict of two LongTensors:
  - "input_ids": [block_size]      the model's input, block[:-1]
  - "labels":    [block_size + 1]  the whole block; the model shifts labels itself, so a
                                   labels row one longer than input_ids scores every position.

The token file is opened as a read-only memmap on first use (so datasets pickle cheaply into
DataLoader workers) and each item copies only its own block, so host memory stays flat.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmforge.data.corpus import CorpusError
from lmforge.data.hashing import counter_hash


def _dtype_for(path: Path, dtype: Any) -> np.dtype:
    """The given dtype, else the one in meta.json next to the file, else uint16."""
    if dtype is not None:
        return np.dtype(dtype)
    meta = path.parent / "meta.json"
    if meta.is_file():
        try:
            return np.dtype(json.loads(meta.read_text(encoding="utf-8"))["dtype"])
        except (ValueError, KeyError, TypeError):
            pass  # not our meta.json: fall through to the default
    return np.dtype(np.uint16)


class _TokenBlocks(Dataset):
    """Shared part: lazy memmap of a token file and block slicing."""

    def __init__(self, path: str | os.PathLike[str], block_size: int, dtype: Any = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {self.path} not found; run lmforge.data.prepare_corpus first")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.dtype = _dtype_for(self.path, dtype)
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(
                f"{self.path}: size {size} bytes is not a multiple of {self.dtype.itemsize} "
                f"({self.dtype.name}); pass the dtype the file was written with (see meta.json)"
            )
        self.n_tokens = size // self.dtype.itemsize
        if self.n_tokens < self.block_size + 1:
            split = self.path.stem  # "train" / "val"
            hint = " or a larger val_fraction in prepare_corpus" if split == "val" else ""
            raise CorpusError(
                f"{split} split {self.path} has {self.n_tokens} tokens, but one block needs "
                f"block_size + 1 = {self.block_size + 1}; use a smaller block_size (context "
                f"length) or more data{hint}"
            )
        self._tokens: np.memmap | None = None  # opened lazily, per process

    def tokens(self) -> np.memmap:
        """The whole token file as a read-only memmap, [n_tokens]."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None  # each worker maps the file itself
        return state

    def offset(self, index: int) -> int:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        start = self.offset(index)
        # copy just this block out of the memmap, widened to int64: [block_size + 1]
        block = np.array(self.tokens()[start : start + self.block_size + 1], dtype=np.int64)
        labels = torch.from_numpy(block)
        return {"input_ids": labels[:-1].clone(), "labels": labels}

    def __len__(self) -> int:  # pragma: no cover - defined by subclasses
        raise NotImplementedError


class RandomBlockDataset(_TokenBlocks):
    """`num_samples` blocks of `block_size + 1` tokens at pseudo-random offsets, for training.

    The start of item i is `counter_hash(seed, i) % (n_tokens - block_size)`: a pure function of
    (seed, i), so items never change between calls or workers, and resuming at step k only
    means starting the sampler at index k * batch_size — no data is read to get there.
    """

    def __init__(
        self,
        path_to_bin: str | os.PathLike[str],
        block_size: int,
        num_samples: int,
        seed: int = 0,
        dtype: Any = None,
    ) -> None:
        super().__init__(path_to_bin, block_size, dtype)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)

    def offset(self, index: int) -> int:
        """Token position where item `index` starts."""
        return counter_hash(self.seed, index) % (self.n_tokens - self.block_size)

    def __len__(self) -> int:
        return self.num_samples


class SequentialBlockDataset(_TokenBlocks):
    """Consecutive blocks over a whole split, in order, for validation.

    Item i starts at token i * block_size, so the input windows tile the split without overlap
    and every token after the first is scored exactly once (the label row's last token is the
    next block's first input). Tokens after the last full block are dropped; `max_blocks`
    caps the count for a quicker evaluation.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int,
        max_blocks: int | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(path, block_size, dtype)
        self.num_blocks = (self.n_tokens - 1) // self.block_size
        if max_blocks is not None:
            if max_blocks < 1:
                raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
            self.num_blocks = min(self.num_blocks, int(max_blocks))

    def offset(self, index: int) -> int:
        """Token position where item `index` starts."""
        return index * self.block_size

    def __len__(self) -> int:
        return self.num_blocks
