"""The server's encoder-decoder answers: `generate` on the scheduler thread, greedy requests batched together.

An encoder-decoder (Marian, BART, lmforge's translation and summarisation models) writes its answer with the
model's own `generate`, not with the causal LMs' continuous-batching step. Requests wait in a queue bounded by
--max-queue (a full one is a 429, as for causal LMs), and the scheduler thread answers them in arrival order:

- greedy requests (temperature 0, no penalties, biases or min_tokens) waiting together with the same end tokens
  are answered by one batched `generate` over all their sources, up to --max-num-seqs sources: sixteen concurrent
  translation requests cost about one batched call rather than sixteen. Each answer is the source's own greedy
  decoding; batched, the sources are padded, so the matrices' shapes differ from a source decoded alone and the
  logits agree to float rounding (the same tokens unless two candidates tie within it, as for any batched
  `generate`).
- other requests (sampling, whose seeds must give the same text whatever else waits; penalties) run alone, one
  `generate` per choice.

Text is handed to the event loop after every decoding step (`generate`'s streamer), as the causal LMs' steps
hand theirs over: streamed answers arrive token by token, never splitting a UTF-8 character, and end at an end
token, a stop string or the request's max_tokens; a request is answered as soon as its own rows have ended, even
if others in its batch go on. A request whose client went away before its turn is dropped, and a decoding whose
clients have all gone stops. A failure answers the requests it concerned with the error (the server stays up).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.generation import TextStream
from lmforge.serving.scheduler import Piece, QueueFull, Request, SamplingParams, Scheduler, token_logprobs


class Seq2SeqRunner:
    """The queue of an encoder-decoder's requests and their answers (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, scheduler: Scheduler, max_rows: int, max_queue: int) -> None:
        self.model, self.tokenizer, self.scheduler = model, tokenizer, scheduler
        self.max_rows, self.max_queue = max_rows, max_queue
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._scheduled = False  # whether a job to answer the next group is queued on the scheduler thread
        self.metrics = getattr(scheduler, "metrics", None)  # the server's Prometheus series (None: not counted)

    def submit(self, generation: Request) -> None:
        """Queue a request (from the event loop); QueueFull when --max-queue requests are waiting already."""
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(generation)
            if self.metrics is not None:
                self.metrics.queue_length.set(len(self.waiting))
            if not self._scheduled:
                self._scheduled = True
                self.scheduler.run_job(self._next)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def _next(self) -> None:
        """(A job on the scheduler thread.) Answer the next group, then queue another job if requests still wait:
        one group per job, so the scheduler's other jobs (a pipeline's) and its hand-overs to the event loop
        come in between."""
        group = self._take()
        try:
            if len(group) > 1 or (group and self._batchable(group[0].params)):
                self._greedy(group)
            elif group:
                self._alone(group[0])
        except Exception as error:  # a bad option for generate, or a bug: these requests fail, the server stays up
            for generation in group:
                generation.emit(error)
        finally:
            with self._lock:
                self._scheduled = bool(self.waiting)
                if self._scheduled:
                    self.scheduler.run_job(self._next)

    def _take(self) -> list[Request]:
        """The oldest waiting request, and if it is greedy, the waiting greedy ones with the same end tokens after
        it (their sources up to max_rows); requests whose clients went away are dropped."""
        eos = set(self.scheduler.eos)
        with self._lock:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft().emit(None)
            if not self.waiting:
                return []
            first = self.waiting.popleft()
            group = [first]
            if not self._batchable(first.params):
                return group
            ends, rows = first.params.ends(eos), len(first.prompts)
            kept: deque[Request] = deque()
            for other in self.waiting:
                p, fits = other.params, rows + len(other.prompts) <= self.max_rows
                if other.cancelled or not self._batchable(p) or p.ends(eos) != ends or not fits:
                    kept.append(other)
                    continue
                group.append(other)
                rows += len(other.prompts)
            self.waiting = kept
            if self.metrics is not None:
                self.metrics.queue_length.set(len(self.waiting))
        return group

    @staticmethod
    def _batchable(p: SamplingParams) -> bool:
        return p.greedy

    def _greedy(self, group: list[Request]) -> None:
        """One batched greedy decoding of the group's sources (the n choices of a source are the same text)."""
        rows = [self._row(generation, i, range(i * generation.n, (i + 1) * generation.n))
                for generation in group for i in range(len(generation.prompts))]  # fmt: skip
        ends = group[0].params.ends(set(self.scheduler.eos))
        longest = max(g.params.max_tokens for g in group)
        self._decode(rows, {"max_new_tokens": longest, "eos_token_id": sorted(ends)}, ends)

    def _alone(self, generation: Request) -> None:
        """Each choice of each source by its own decoding, with the request's options (its seed + the choice's
        number, as the causal LMs' rows are seeded)."""
        p = generation.params
        ends = p.ends(set(self.scheduler.eos))
        options: dict[str, Any] = {"max_new_tokens": p.max_tokens, "repetition_penalty": p.repetition_penalty,
                                   "logits_processors": [_adjusted(p)] if p.penalised else [],
                                   "min_new_tokens": p.min_tokens, "eos_token_id": sorted(ends)}  # fmt: skip
        for i in range(len(generation.prompts)):
            for j in range(generation.n):
                if generation.cancelled:  # its client went away: the rest is not decoded
                    generation.emit(None)
                    return
                if p.temperature > 0:
                    seed = p.seed + j if p.seed is not None else None
                    options.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None,
                                   seed=seed)  # fmt: skip
                self._decode([self._row(generation, i, [i * generation.n + j])], options, ends)

    def _row(self, generation: Request, source: int, choices: Any) -> _Row:
        return _Row(
            generation, generation.prompts[source], list(choices), TextStream(self.tokenizer, generation.params.stop)
        )

    def _decode(self, rows: list[_Row], options: dict[str, Any], ends: set[int]) -> None:
        """`generate` over the rows' sources (right-padded, with their mask), each row's text handed over as it is
        written (after every decoding step, as the causal LMs' steps are): never a broken UTF-8 character, ending
        at an end token, a stop string or the row's own max_tokens. It stops early once every row has ended or
        every request has gone; a request gets its None as soon as its last choice has ended."""
        pad = self.model.config.pad_token_id or 0
        width = max(len(row.source) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, S): right-padded sources
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row.source)] = torch.tensor(row.source)
            mask[b, : len(row.source)] = 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        hand_over = getattr(self.scheduler, "after_step", None)  # the mailbox's flush to the event loop
        tops = [row.generation.params.logprobs for row in rows]  # alternatives per token; None: no logprobs
        seen: list[torch.Tensor] = []  # this step's logits (B, V), as the pick sees them, when logprobs are asked

        if any(top is not None for top in tops):

            def record(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # (after generate's min_tokens and
                # repetition penalty, before the presence/frequency penalties and logit_bias)
                seen[:] = [logits.float()]
                return logits

            options = {**options, "logits_processors": [record, *options.get("logits_processors", [])]}

        def step(tokens: torch.Tensor) -> None:  # (B,): this step's token of every row
            for b, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if not row.done:
                    top = tops[b]
                    self._push(row, token, ends, None if top is None else token_logprobs(seen[0][b], token, top))
            if hand_over is not None:
                hand_over()
            if all(row.done or row.generation.cancelled for row in rows):
                raise _Ended

        device = self.model.device
        try:
            self.model.generate(ids.to(device), attention_mask=mask.to(device), streamer=step, **options)
        except _Ended:
            pass
        for row in rows:  # generate reached max_new_tokens first, or every request went away
            if not row.done:
                self._finish(row, [], row.text.finish(), "length")

    def _push(self, row: _Row, token: int, ends: set[int], logprobs: dict[str, Any] | None) -> None:
        """One generated token of a row: the text it completes (if any) to each of the row's choices, or the end;
        with its logprobs (then a piece for every token, as the causal LMs' rows give)."""
        row.written += 1  # (an end token is a generated token too)
        entries = None if logprobs is None else [logprobs]
        if token in ends:
            self._finish(row, [], row.text.finish(), "stop", entries)
            return
        text = row.text.push(token)
        if row.text.stopped:  # a stop string: the text ends before it
            self._finish(row, [token], text, "stop", entries)
        elif row.written >= row.generation.params.max_tokens:
            self._finish(row, [token], text + row.text.finish(), "length", entries)
        elif text or entries:
            self._emit(row, [token], text, None, entries)

    def _finish(
        self, row: _Row, tokens: list[int], text: str, reason: str, logprobs: list[dict[str, Any]] | None = None
    ) -> None:
        row.done = True
        self._emit(row, tokens, text, reason, logprobs)
        generation, written = row.generation, row.written * len(row.choices)
        generation.completion_tokens += written
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(written)
        if generation.ended(len(row.choices)):
            generation.emit(None)

    def _emit(
        self, row: _Row, tokens: list[int], text: str, reason: str | None, logprobs: list[dict[str, Any]] | None = None
    ) -> None:
        generation = row.generation
        if generation.first_token_at is None:
            generation.first_token_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.observe(generation.first_token_at - generation.arrival)
        for index in row.choices:
            generation.emit(Piece(index, text, tokens, logprobs, reason))


@dataclass
class _Row:
    """One source being decoded for a request: the choices it answers, its text so far, whether it has ended."""

    generation: Request
    source: list[int]
    choices: list[int]
    text: TextStream
    written: int = 0  # tokens generated (an end token included)
    done: bool = False


class _Ended(Exception):
    """Raised from generate's streamer once every row has ended (or its client gone): generate stops there."""


def _adjusted(p: SamplingParams) -> Any:
    """A logits processor for `generate` (an encoder-decoder's decoder ids (B, t), logits (B, V)) applying the
    presence/frequency penalties over the generated tokens and logit_bias, as the scheduler does for causal LMs
    (generate applies the repetition penalty itself)."""

    def process(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        counts = None
        if p.presence_penalty or p.frequency_penalty:
            out = ids[:, 1:]  # after the decoder start token: the tokens generated so far
            counts = torch.zeros_like(logits).scatter_add_(1, out, torch.ones(out.shape, dtype=logits.dtype))
        return p.adjust(logits.float().clone(), None, counts)

    return process
