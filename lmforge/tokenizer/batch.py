"""What ``Tokenizer.__call__`` returns and how it gets there: :class:`BatchEncoding`, the checks of the
``padding`` / ``truncation`` / text / id arguments, padding rows and turning them into tensors or arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class PaddingSide:
    """The `padding_side` property every tokenizer class shares: where ``padding`` adds pad tokens,
    "right" (default) or "left" (for batched generation), checked when set."""

    _padding_side = "right"

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
        self._padding_side = side


class BatchEncoding(dict):
    """Output of :meth:`Tokenizer.__call__`: a dict (``input_ids``, ``attention_mask``, ...)
    whose keys are also readable as attributes, like Hugging Face's ``BatchEncoding``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; available: {sorted(self)}") from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every torch tensor value to ``device`` (in place) and return ``self``."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def as_text_list(text: Any, name: str) -> list[str]:
    """``text`` (one str or a list of str) as a list; ``name`` is the argument's name for the error."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError(f"{name} must be a str or a list of str, got {type(text).__name__}")


def as_id_list(ids: Any, what: str = "convert_ids_to_tokens") -> list[int]:
    """Token ids from a list, tuple, 1-D torch tensor or numpy array; ``what`` names the caller for the error."""
    if isinstance(ids, int):
        return [ids]
    if hasattr(ids, "tolist"):  # torch.Tensor / numpy.ndarray
        if getattr(ids, "ndim", 1) > 1:
            raise ValueError(f"{what} takes one sequence, got a {ids.ndim}-D array/tensor; use batch_decode")
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else [int(i) for i in ids]
    out = []
    for i in ids:
        if isinstance(i, (list, tuple)) or getattr(i, "ndim", 0) > 0:
            raise ValueError(f"{what} takes one sequence of ids, got nested lists; use batch_decode")
        out.append(int(i))
    return out


def padding_mode(padding: bool | str, max_length: int | None) -> str:
    """``padding`` as one of "do_not_pad", "longest", "max_length" (transformers' names and aliases)."""
    modes = {
        False: "do_not_pad",
        "do_not_pad": "do_not_pad",
        True: "longest",
        "longest": "longest",
        "max_length": "max_length",
    }
    try:
        mode = modes[padding]
    except (KeyError, TypeError):
        raise ValueError(
            f"padding must be False/'do_not_pad', True/'longest' or 'max_length', got {padding!r}"
        ) from None
    if mode == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length=...; or use padding=True to pad to the longest")
    return mode


def truncation_mode(truncation: bool | str) -> str | None:
    """``truncation`` as the backend's strategy name, or None for no truncation."""
    modes = {
        False: None,
        "do_not_truncate": None,
        True: "longest_first",
        "longest_first": "longest_first",
        "only_first": "only_first",
        "only_second": "only_second",
    }
    try:
        return modes[truncation]
    except (KeyError, TypeError):
        raise ValueError(
            "truncation must be False/'do_not_truncate', True/'longest_first', 'only_first' or "
            f"'only_second', got {truncation!r}"
        ) from None


def check_return_tensors(return_tensors: str | None) -> None:
    """Refuse a ``return_tensors`` other than None (lists), "pt" (torch) or "np" (numpy)."""
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")


def pack_batch(
    columns: dict[str, list[list[Any]]],
    pad_mode: str,
    max_length: int | None,
    pad_values: dict[str, Any],
    side: str,
    return_tensors: str | None,
    is_batch: bool,
) -> BatchEncoding:
    """The :class:`BatchEncoding` of ``columns`` (key -> one row per text): rows padded as ``pad_mode`` asks (to the
    longest ``input_ids`` row, or to ``max_length``) with ``pad_values[key]`` on ``side``, then made tensors of kind
    ``return_tensors``, or kept as lists (one flat row when the input was a single text, ``is_batch`` False)."""
    if pad_mode != "do_not_pad":
        longest = max((len(row) for row in columns["input_ids"]), default=0)
        target = max_length if pad_mode == "max_length" else longest
        columns = {key: [pad_row(row, target, pad_values[key], side) for row in rows] for key, rows in columns.items()}
    out = BatchEncoding()
    for key, rows in columns.items():
        if return_tensors is not None:
            out[key] = to_tensor(rows, key, return_tensors)
        else:
            out[key] = rows if is_batch else rows[0]
    return out


def as_id_rows(sequences: Any) -> list[Any]:
    """The rows of a 2-D tensor/array or a list of id sequences, for ``batch_decode``."""
    if hasattr(sequences, "tolist"):
        if getattr(sequences, "ndim", 2) != 2:
            raise ValueError(
                f"batch_decode takes a 2-D tensor/array, got {sequences.ndim}-D; use decode for a single sequence"
            )
        return sequences.tolist()
    return list(sequences)


def pad_row(row: list[Any], target: int, value: Any, side: str) -> list[Any]:
    """``row`` filled with ``value`` up to ``target`` items on ``side`` ("right" or "left")."""
    missing = target - len(row)
    if missing <= 0:
        return row
    return row + [value] * missing if side == "right" else [value] * missing + row


def to_tensor(rows: list[list[Any]], key: str, kind: str) -> Any:
    """Equal-length ``rows`` of column ``key`` as a ``kind`` ("pt": torch.long, "np": int64) tensor of shape
    (B, T), or (B, T, 2) for ``offset_mapping``; an empty batch or empty rows keep that rank."""
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"cannot make a tensor of {key}: sequences have different lengths "
            f"({min(lengths)}..{max(lengths)}); pass padding=True (or padding='max_length' with "
            "max_length=...) to return tensors for a batch of unequal texts"
        )
    empty = not rows or max(lengths) == 0  # torch/numpy would give shape (B,) or (0,): keep (B, 0[, 2])
    empty_shape = (len(rows), 0, *((2,) if key == "offset_mapping" else ()))
    if kind == "pt":
        tensor = torch.tensor(rows, dtype=torch.long)
        return tensor.reshape(empty_shape) if empty else tensor
    array = np.array(rows, dtype=np.int64)
    return array.reshape(empty_shape) if empty else array
