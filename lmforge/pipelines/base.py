"""The pipeline base class: inputs in, results out, in the order given.

    items --preprocess (check, tokenize, truncate)--> rows of token ids (an item may give several: QA chunks)
    rows --length-sorted batches, each padded to its own longest row--> _forward (one model call per batch)
    row outputs --regrouped per item, in input order--> postprocess --> one result per item

Sorting rows by length before batching (`lmforge.data.batching.length_sorted_batches`) means a batch of
short sentences never pays for the padding of a long one; results are put back in the caller's order.
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmforge.constants import NO_LENGTH_LIMIT, context_length
from lmforge.data.batching import length_sorted_batches


@dataclass
class Feature:
    """What `preprocess` makes of one input: the model rows it needs (one per chunk; each a dict of
    token-id lists, `input_ids` at least) and whatever `postprocess` needs to build the result."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def warn(message: str) -> None:
    """A UserWarning pointing at the caller's line: the first frame outside lmforge.pipelines."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def pipeline_device(device: int | str | torch.device | None) -> torch.device | None:
    """transformers' device convention: None = leave the model where it is, -1 = CPU, 0.. = that GPU."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise TypeError(f"device must be an int, a str or a torch.device, got {device!r}")
    if isinstance(device, int):
        return torch.device("cpu") if device < 0 else torch.device("cuda", device)
    return torch.device(device)


def describe(value: Any, limit: int = 40) -> str:
    """A short repr for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def index_list(indices: Sequence[int], limit: int = 8) -> str:
    """'3' / '3, 7' / '3, 7, ... (12 in all)' for warnings that name several inputs."""
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown if len(indices) <= limit else f"{shown}, ... ({len(indices)} in all)"


class Pipeline:
    """Base of every pipeline: `preprocess -> _forward -> postprocess`, batched by length.

    `__call__` takes one input (a str, or a dict for the tasks that take pairs), a list of them (a list
    of results comes back, in order), or any other iterable (a generator of results comes back; it reads
    `batch_size` inputs at a time, so an endless stream works). Options given to the constructor are
    the defaults of every call; options given to a call override them for that call only.

    Subclasses set `task`, define `_options` (their keyword options, with defaults, as a signature),
    `_check_model`, `preprocess`, `_forward` and `postprocess`.
    """

    task: ClassVar[str] = ""
    #: types that mean "one input" (others are iterated)
    single_types: ClassVar[tuple[type, ...]] = (str,)

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        device: int | str | torch.device | None = None,
        batch_size: int = 8,
        **options: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                f"the {self.task} pipeline needs a tokenizer: pass tokenizer=... (a lmforge "
                "Tokenizer, e.g. Tokenizer.from_pretrained(model_dir))"
            )
        self._check_model(model)
        target = pipeline_device(device)
        if target is not None:
            model.to(target)
        self.model = model.eval()  # dropout off: a pipeline only predicts
        self.tokenizer = tokenizer
        self.batch_size = self._check_batch_size(batch_size)
        self._forward_params = set(inspect.signature(model.forward).parameters)
        self.options = dict(options)
        self._parse(self.options)  # a bad default is reported now, not at the first call

    # ------------------------------------------------------------------ hooks for subclasses
    def _check_model(self, model: Any) -> None:
        """Raise TypeError when `model` cannot do this pipeline's task."""

    def _options(self, **options: Any) -> dict[str, Any]:
        """Check this pipeline's options and fill in defaults (subclasses list them in the signature)."""
        return options

    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        """Check and tokenize `items` (the inputs numbered start, start + 1, ...): one Feature each."""
        raise NotImplementedError

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[Any]:
        """Run the model on one batch of rows (in inference mode); one output per row."""
        raise NotImplementedError

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> Any:
        """The result for one input from the outputs of its rows (in row order)."""
        raise NotImplementedError

    def _single_result(self, result: Any, item: Any, opts: dict[str, Any]) -> Any:
        """What a single (non-list) input `item` returns; by default its one result."""
        return result

    def _is_single(self, inputs: Any) -> bool:
        return isinstance(inputs, self.single_types)

    # ------------------------------------------------------------------ calling
    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Run the pipeline on one input, a list of inputs, or an iterable (lazily); see the class doc."""
        batch_size = self._check_batch_size(kwargs.pop("batch_size", self.batch_size))
        opts = self._parse({**self.options, **kwargs})
        if self._is_single(inputs):
            return self._single_result(self._run([inputs], 0, opts, batch_size)[0], inputs, opts)
        if isinstance(inputs, (list, tuple)):
            return self._run(list(inputs), 0, opts, batch_size)
        if isinstance(inputs, Iterable) and not isinstance(inputs, (bytes, dict)):
            return self._iterate(iter(inputs), opts, batch_size)
        raise TypeError(
            f"the {self.task} pipeline takes {self._input_kinds()}, or a list or iterator of them; "
            f"got {type(inputs).__name__}"
        )

    def _iterate(self, inputs: Iterator[Any], opts: dict[str, Any], batch_size: int) -> Iterator[Any]:
        """Results for an iterator of inputs, `batch_size` inputs at a time, yielded as they are ready."""
        start = 0
        while True:
            window = list(itertools.islice(inputs, batch_size))
            if not window:
                return
            yield from self._run(window, start, opts, batch_size)
            start += len(window)

    def _run(self, items: list[Any], start: int, opts: dict[str, Any], batch_size: int) -> list[Any]:
        features = self.preprocess(items, start, opts)
        rows = [(i, row) for i, feature in enumerate(features) for row in feature.rows]
        outputs: list[Any] = [None] * len(rows)
        with torch.inference_mode():
            for batch in self._batches([row for _, row in rows], batch_size, opts):
                for j, out in zip(batch, self._forward([rows[j][1] for j in batch], opts), strict=True):
                    outputs[j] = out
        grouped: list[list[Any]] = [[] for _ in features]
        for (i, _), out in zip(rows, outputs):
            grouped[i].append(out)
        return [self.postprocess(f, outs, opts) for f, outs in zip(features, grouped)]

    def _batches(self, rows: list[dict[str, Any]], batch_size: int, opts: dict[str, Any]) -> list[list[int]]:
        """Row indices grouped into batches of similar length (longest first)."""
        return length_sorted_batches([len(r["input_ids"]) for r in rows], batch_size)

    # ------------------------------------------------------------------ helpers
    def _parse(self, options: dict[str, Any]) -> dict[str, Any]:
        allowed = inspect.signature(self._options).parameters
        unknown = sorted(k for k in options if k not in allowed)
        if unknown:
            raise TypeError(
                f"the {self.task} pipeline has no option {', '.join(map(repr, unknown))}; its options "
                f"are: {', '.join(allowed)} (and batch_size)"
            )
        return self._options(**options)

    @staticmethod
    def _check_batch_size(batch_size: Any) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return batch_size

    def _input_kinds(self) -> str:
        return "a str"

    @property
    def device(self) -> torch.device:
        """Where the model (and every batch) lives."""
        return next(self.model.parameters()).device

    def model_max_length(self) -> int:
        """The longest input the model takes: its position table, or the tokenizer's limit if smaller."""
        limit = context_length(self.model.config, NO_LENGTH_LIMIT)
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", NO_LENGTH_LIMIT) or NO_LENGTH_LIMIT
        return min(limit, tokenizer_limit)

    def _limit(self, max_length: int | None) -> int:
        """`max_length` checked against the model's own limit (None = that limit)."""
        limit = self.model_max_length()
        if max_length is None:
            if limit >= NO_LENGTH_LIMIT:
                raise ValueError("neither the model nor the tokenizer gives a maximum length; pass max_length=...")
            return limit
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if max_length > limit:
            raise ValueError(
                f"max_length={max_length} is more than the model takes ({limit} tokens); use max_length <= {limit}"
            )
        return max_length

    def _check_text(self, value: Any, index: int, what: str = "input", allow_blank: bool = False) -> str:
        """`value` if it is a usable text; else TypeError/ValueError naming the input and the fix."""
        if not isinstance(value, str):
            raise TypeError(
                f"{self.task}: {what} {index} is a {type(value).__name__} ({describe(value)}), not a str; "
                f"pass text (convert it with str(...)) or drop it"
            )
        if not value or (not allow_blank and not value.strip()):
            raise ValueError(
                f"{self.task}: {what} {index} is {'empty' if not value else 'blank'} "
                f"({describe(value)}); there is nothing to process: remove it or give it some text"
            )
        return value

    def _encode(
        self,
        texts: list[str],
        pairs: list[str] | None,
        indices: list[int],
        max_length: int,
        truncation: bool,
        strategy: str = "longest_first",
    ) -> list[Any]:
        """Tokenize (with special tokens, offsets, word ids) as `tokenizers.Encoding`s cut to `max_length`
        tokens. A cut input gives one warning per call naming the inputs, or a ValueError when
        `truncation` is False."""
        inputs: list[Any] = texts if pairs is None else list(zip(texts, pairs, strict=True))
        with self.tokenizer.truncating(max_length, strategy=strategy) as backend:
            try:
                encodings = backend.encode_batch(inputs, add_special_tokens=True)
            except Exception as err:  # the backend raises a bare Exception
                raise ValueError(
                    f"{self.task}: cannot cut the inputs to {max_length} tokens ({err}); use a larger max_length"
                ) from None
        cut = [indices[k] for k, enc in enumerate(encodings) if enc.overflowing]
        if cut and not truncation:
            raise ValueError(
                f"{self.task}: input {index_list(cut)} is longer than {max_length} tokens (the model's "
                "limit); shorten it, or pass truncation=True to cut it to fit"
            )
        if cut:
            warn(
                f"{self.task}: input {index_list(cut)} is longer than {max_length} tokens (the model's limit) and "
                f"was truncated to {max_length}; pass truncation=False to get an error instead"
            )
        for k, enc in enumerate(encodings):
            if not any(m == 0 for m in enc.special_tokens_mask):
                raise ValueError(
                    f"{self.task}: input {indices[k]} ({describe(texts[k])}) gives no tokens; give it some text"
                )
        return encodings

    def _row(self, encoding: Any) -> dict[str, list[int]]:
        row = {"input_ids": list(encoding.ids)}
        if "token_type_ids" in self._forward_params and "token_type_ids" in self.tokenizer.model_input_names:
            row["token_type_ids"] = list(encoding.type_ids)
        return row

    def _pad_id(self) -> int:
        for value in (
            self.tokenizer.pad_token_id,
            getattr(self.model.config, "pad_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            if value is not None:
                return int(value)
        return 0  # masked out anyway

    def _collate(self, rows: list[dict[str, Any]], pad_id: int | None = None, side: str = "right") -> dict[str, Tensor]:
        """Pad a batch of rows to its longest: input_ids, attention_mask (and token_type_ids) (B, T)."""
        pad = self._pad_id() if pad_id is None else pad_id
        longest = max(len(r["input_ids"]) for r in rows)

        def padded(values: list[int], fill: int) -> list[int]:
            extra = [fill] * (longest - len(values))
            return values + extra if side == "right" else extra + values

        batch = {
            "input_ids": [padded(r["input_ids"], pad) for r in rows],
            "attention_mask": [padded([1] * len(r["input_ids"]), 0) for r in rows],
        }
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = [padded(r["token_type_ids"], 0) for r in rows]
        return {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in batch.items()}

    def _model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The collated tensors this model's forward accepts."""
        return {k: v for k, v in batch.items() if k in self._forward_params}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task!r}, model={type(self.model).__name__}, "
            f"device={self.device}, batch_size={self.batch_size})"
        )


def check_model_kind(
    task: str, model: Any, accepted: Sequence[str], predicate: Callable[[Any], bool], hint: str
) -> None:
    """TypeError when `predicate(model)` is False: names the model's class, what the task needs, and `hint`."""
    if not predicate(model):
        raise TypeError(f"the {task} pipeline needs {' or '.join(accepted)}, got {type(model).__name__}; {hint}")
