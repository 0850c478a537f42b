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

Each choice arrives as one piece, with its whole text, once generated; a request whose client went away before
its turn is dropped. A failure answers the requests it concerned with the error (the server stays up).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from lmforge.serving.scheduler import Piece, QueueFull, Request, SamplingParams, Scheduler


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
                p = other.params
                if other.cancelled or not self._batchable(p) or p.ends(eos) != ends or rows + len(other.prompts) > \
                        self.max_rows:  # fmt: skip
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
        """One batched greedy `generate` over the group's sources; each choice of a source is its decoding
        (greedy: the n choices of one source are the same text)."""
        sources = [ids for generation in group for ids in generation.prompts]
        pad = self.model.config.pad_token_id or 0
        width = max(len(s) for s in sources)
        ids = torch.full((len(sources), width), pad, dtype=torch.long)  # (B, S): right-padded sources
        mask = torch.zeros((len(sources), width), dtype=torch.long)
        for row, source in enumerate(sources):
            ids[row, : len(source)] = torch.tensor(source)
            mask[row, : len(source)] = 1
        ends = group[0].params.ends(set(self.scheduler.eos))
        longest = max(g.params.max_tokens for g in group)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(sources))
        device = self.model.device
        out = self.model.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest, eos_token_id=sorted(ends)
        )[:, 1:].tolist()  # fmt: skip  (after the start token)
        row = 0
        for generation in group:
            for i in range(len(generation.prompts)):
                tokens = out[row][: generation.params.max_tokens]
                row += 1
                for j in range(generation.n):
                    self._answer(generation, i * generation.n + j, tokens, ends)
            generation.emit(None)

    def _alone(self, generation: Request) -> None:
        """Each choice of each source by its own `generate` call, with the request's options."""
        p = generation.params
        ends = p.ends(set(self.scheduler.eos))
        for i, source in enumerate(generation.prompts):
            ids = torch.tensor([source], device=self.model.device)
            for j in range(generation.n):
                if generation.cancelled:
                    generation.emit(None)
                    return
                options: dict[str, Any] = {"max_new_tokens": p.max_tokens, "repetition_penalty": p.repetition_penalty,
                                           "logits_processors": [_adjusted(p)] if p.penalised else [],
                                           "min_new_tokens": p.min_tokens, "eos_token_id": sorted(ends)}  # fmt: skip
                if p.temperature > 0:
                    seed = p.seed + j if p.seed is not None else None
                    options.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None,
                                   seed=seed)  # fmt: skip
                tokens = self.model.generate(ids, **options)[0, 1:].tolist()  # after the decoder start token
                self._answer(generation, i * generation.n + j, tokens, ends)
        generation.emit(None)

    def _answer(self, generation: Request, index: int, tokens: list[int], ends: set[int]) -> None:
        """Choice `index` from its generated tokens: the text up to the first end token or stop string."""
        p = generation.params
        ended = next((k for k, t in enumerate(tokens) if t in ends), None)
        kept = tokens if ended is None else tokens[:ended]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = min((text.find(s) for s in p.stop if s in text), default=-1)
        finish = "stop" if ended is not None or cut >= 0 else "length"
        if cut >= 0:
            text = text[:cut]
        written = len(kept) + (ended is not None)  # the end token is a generated token too
        generation.completion_tokens += written
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(written)
            if index == 0:  # the whole answer arrives at once: its first token with it
                self.metrics.ttft.observe(time.perf_counter() - generation.arrival)
        generation.emit(Piece(index, text, kept, None, finish))


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
