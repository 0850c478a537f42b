"""Continuous batching: one thread owns the model and runs one step at a time for every active sequence.

    HTTP handlers --submit(Request)--> waiting queue --admit (token budget, free slots)--> every step: one forward
    of one row of tokens: the newest token of each decoding sequence and the whole prompt of each request just
    admitted (its prefill) --> per-row penalties and sampling --> text pieces to each request --> retire finished

Each sequence owns a row ("slot") of a preallocated KV cache for the whole context and is numbered from position
0 in it, so sequences of any lengths decode side by side: a decoding token attends over its own row (the columns
past its length masked), a prompt causally over itself. Prefilling in the step's forward reads the weights once
for both (a separate prefill forward per request took a third of the scheduler's time at 16 requests). Active rows
are kept in slots 0..n-1 (a retiring row's slot is filled by the last one), so a step reads plain views of the
cache. The attention of a sequence is the arithmetic of `model.generate` (its prefill and its decoding steps).

Everything else that needs the model (embeddings, pipelines, encoder-decoder generation) runs as a job on the
same thread between steps, so the model is never used by two threads at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.constants import context_length
from lmforge.generation import TextStream, apply_repetition_penalty
from lmforge.serving.step import CompiledStep, SlotCache

log = logging.getLogger("lmforge.serve")


class QueueFull(RuntimeError):
    """The waiting queue holds --max-queue requests already (the server answers 429)."""


@dataclass
class SamplingParams:
    """One request's decoding options, OpenAI's names; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # how many alternatives per token (0: the chosen token only); None: off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # vLLM's extras: no end (EOS, stop_token_ids) before this many tokens,
    stop_token_ids: list[int] = field(default_factory=list)  # more tokens that end a sequence as EOS does,
    ignore_eos: bool = False  # the model's EOS does not end it (stop_token_ids still do)
    constraint: Any = None  # a json_mode.JSONConstraint: the answer is one JSON object (JSON mode, a schema)

    def ends(self, eos: set[int]) -> set[int]:
        """The tokens that end a sequence of this request, given the model's EOS ids."""
        return (set() if self.ignore_eos else eos) | set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and not self.penalised

    @property
    def penalised(self) -> bool:
        """Whether a row's logits are changed before it picks (penalties, logit_bias, min_tokens, JSON mode): such
        rows pick alone."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.constraint is not None
        )

    def adjust(self, logits: Tensor, seen: Tensor | None, counts: Tensor | None) -> Tensor:
        """Next-token logits (B, V) (float32, changed in place) under the penalties and logit_bias, in that order.
        seen (B, L): the tokens the repetition penalty looks at (None: not applied here); counts (B, V) or (V,):
        how often each token was generated, for the presence/frequency penalties (None: none yet)."""
        if seen is not None and self.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if counts is not None and (self.presence_penalty or self.frequency_penalty):
            logits -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0).float()
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=logits.device)
            logits[:, ids] += torch.tensor(list(self.logit_bias.values()), device=logits.device)
        return logits


@dataclass
class Piece:
    """What one step gives a request for one of its sequences (choice `index`)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None = None  # per token: {"id", "logprob", "top": [(id, logprob), ...]}
    finish_reason: str | None = None


#: what a request receives: a piece of a choice, None (all choices finished) or the error that ended it
Event = Piece | BaseException | None


class Request:
    """A completion request: `n` continuations of each prompt, choices numbered prompt-major.

    `emit(piece)` is called on the scheduler thread for every piece (the HTTP layer hands it to its event loop);
    `emit(None)` once all choices have finished, or `emit(error)` instead if the scheduler failed. `cancel()`
    (the client went away) retires the request's sequences at the next step.
    """

    def __init__(self, prompts: list[list[int]], params: SamplingParams, n: int, emit: Callable[[Event], None]) -> None:
        self.prompts, self.params, self.n, self.emit = prompts, params, n, emit
        self.arrival = time.perf_counter()
        self.cancelled = False
        self.prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, whatever n is (as OpenAI counts)
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self._left = len(prompts) * n

    def cancel(self) -> None:
        self.cancelled = True

    def ended(self, choices: int = 1) -> bool:
        """`choices` of its choices have ended: True when none is left (the request's None is then due)."""
        self._left -= choices
        return self._left == 0

    @property
    def size(self) -> int:
        """Rows this request needs in the batch."""
        return len(self.prompts) * self.n


class Sequence:
    """One continuation being generated: its slot's position, its tokens, its text and its sampling state."""

    def __init__(self, request: Request, index: int, prompt: list[int], tokenizer: Any, eos: set[int]) -> None:
        p = request.params
        self.request, self.index, self.prompt = request, index, prompt
        self.out: list[int] = []
        self.length = len(prompt)  # tokens in the cache
        self.text = TextStream(tokenizer, p.stop)
        self.eos = p.ends(eos)  # the tokens that end this sequence
        # this row's own random numbers (one per sampled token): a Python generator, as a torch.Generator costs a
        # tensor per draw (16 rows: 29 us a step instead of 4)
        self.generator: random.Random | None = None
        if not p.greedy:
            self.generator = random.Random(p.seed + index if p.seed is not None else random.getrandbits(62))
        self.counts: Tensor | None = None  # (V,) how often each token was generated (presence/frequency penalties)
        self.json_state = p.constraint.machine.START if p.constraint is not None else None  # JSON mode: where it is
        self.last_token_at = 0.0

    def pick(self, logits: Tensor) -> int:
        """The next token from this row's logits (V,) under its request's options (penalties included)."""
        p = self.request.params
        if p.penalised:
            seen = torch.tensor(self.prompt + self.out)[None] if p.repetition_penalty != 1.0 else None
            logits = p.adjust(logits[None].float().clone(), seen, self.counts)[0]
            if len(self.out) < p.min_tokens and self.eos:  # not the end yet
                logits[list(self.eos)] = float("-inf")
            if self.json_state is not None:  # only tokens that keep the answer a JSON object's beginning
                logits = logits.masked_fill(~p.constraint.allowed(self.json_state), float("-inf"))
        if p.temperature == 0:
            return int(logits.argmax())
        return sample_rows(logits[None], [self])[0]

    def record(self, token: int, vocab: int) -> None:
        self.out.append(token)
        p = self.request.params
        if self.json_state is not None:
            self.json_state = p.constraint.advance(self.json_state, token)
        if p.presence_penalty or p.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(vocab)
            self.counts[token] += 1


def sample_rows(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of logits (n, V), each row under its own sequence's temperature, top-k, top-p and seeded
    generator (a `random.Random`), all rows at once: inverse-CDF sampling, one uniform number per row (a multinomial
    per row costs ~0.2 ms on a 4,096-token vocabulary; this is one softmax and one cumsum for the batch)."""
    params = [s.request.params for s in seqs]
    V = logits.size(-1)
    x = logits.float() / torch.tensor([p.temperature for p in params])[:, None]  # (n, V)
    order = None
    if any(p.top_k or p.top_p < 1.0 for p in params):
        x, order = x.sort(dim=-1, descending=True)  # (n, V), rank 0 first
        keep = torch.tensor([p.top_k or V for p in params])[:, None]
        x = x.masked_fill(torch.arange(V)[None] >= keep, float("-inf"))  # top-k by rank
    probs = x.softmax(dim=-1)
    if order is not None:  # top-p: drop a token once the tokens ranked above it reach top_p (the first stays)
        top_p = torch.tensor([p.top_p for p in params])[:, None]
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # (n, V)
    u = torch.tensor([s.generator.random() for s in seqs]) * cdf[:, -1]  # (n,) in [0, total)
    index = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=V - 1)  # (n, 1): first cdf > u
    if order is not None:
        index = order.gather(1, index)
    return index[:, 0].tolist()


def _voluntary_switches() -> int:
    """How often the calling thread has blocked (given up its CPU to wait) since it started (Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


class OpenMPWaits:
    """Notices OpenMP threads that sleep between a step's kernels, and says so once in the log.

    PyTorch's CPU kernels run on libgomp's threads, which spin between kernels only while libgomp manages no more
    threads than the process has CPUs. Past that they spin briefly and then sleep, and each of the step's kernels
    waits for a thread to wake. Two ways there: more torch threads than CPUs (`lmforge serve --threads 4` on 2
    CPUs), or a second OpenMP team: another thread of the process ran parallel kernels (e.g. the main thread of a
    notebook or script that used PyTorch before starting the server in process). On a 2-CPU AMD EPYC the second
    cost one stream 47% and sixteen 28% of their tokens/s, the first one stream 65% (BENCHMARKS.md, 2026-12-05
    21:13). The sign is the scheduler thread blocking inside its forwards: every `every`-th forward is measured
    (its thread's voluntary context switches, one system call on each side); `waits_per_step` is the mean of the
    last `window` measured, and a warning is logged once it reaches `limit` (~20 a step in that state against
    ~0-1 otherwise). `read` counts the thread's switches (None: not measured, e.g. not Linux)."""

    def __init__(
        self, every: int = 16, window: int = 32, limit: float = 8.0, read: Callable[[], int] | None = None
    ) -> None:
        self.every, self.window, self.limit = every, window, limit
        self.read = read if read is not None else (_voluntary_switches if sys.platform == "linux" else None)
        self.waits_per_step: float | None = None  # None until `window` forwards have been measured
        self.warned = False
        self._count = 0
        self._recent: deque[int] = deque(maxlen=window)

    def start(self) -> int | None:
        """Before a forward: the switch count if this forward is measured, else None."""
        self._count += 1
        if self.read is None or self._count % self.every:
            return None
        return self.read()

    def stop(self, started: int | None) -> None:
        """After the forward that `start` returned `started` for."""
        if started is None:
            return
        self._recent.append(self.read() - started)
        if len(self._recent) < self.window:
            return
        self.waits_per_step = sum(self._recent) / len(self._recent)
        if self.waits_per_step >= self.limit and not self.warned:
            self.warned = True
            advice = _openmp_advice()
            log.warning(json.dumps({"event": "openmp_waits", "waits_per_step": self.waits_per_step, "why": advice}))


def _openmp_advice() -> str:
    """Why the OpenMP threads sleep between kernels (see OpenMPWaits) and what to do, for the warning."""
    threads = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > cpus:
        return (
            f"the model's OpenMP threads sleep between kernels: PyTorch runs {threads} threads on {cpus} CPUs, so "
            f"libgomp stopped spinning and every kernel waits for a thread to wake. Use at most {cpus} "
            f"(`lmforge serve --threads {cpus}`)"
        )
    return (
        "the model's OpenMP threads sleep between kernels: another thread of this process ran PyTorch's parallel "
        "kernels before the server started, so libgomp stopped spinning; steps can take up to twice as long. Serve "
        "from a process of its own (`lmforge serve`), or start the server before running PyTorch on other threads"
    )


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future


class Scheduler:
    """The thread that owns `model`: continuous batching of completion requests, plus jobs run between steps.

    max_num_seqs: most sequences decoded together (rows of the KV cache). max_batch_tokens: most tokens one step
    may process (one per active sequence, plus the prompts prefilled in that step). max_queue: most requests
    waiting; beyond it `submit` raises QueueFull. stream_interval: `after_step` runs after every this many steps
    while sequences are decoding (always once none are, and after a failure), so the events of that many steps
    are handed over together: fewer wake-ups of the HTTP layer, each stream's tokens in groups. eager: always call
    the model's modules; otherwise a GPT-2-style model's step runs as one TorchScript function (`step.CompiledStep`:
    the same logits, less Python per step).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 2048,
        max_queue: int = 256,
        metrics: Any = None,
        stream_interval: int = 1,
        eager: bool = False,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (steps between hand-overs), got {stream_interval}")
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_batch_tokens, self.max_queue = max_num_seqs, max_batch_tokens, max_queue
        self.stream_interval = stream_interval
        self.eager = eager
        self.compiled: CompiledStep | None = None  # built on the scheduler thread when it starts
        self.metrics = metrics
        self.waits = OpenMPWaits()  # a process set up so that OpenMP's threads sleep between kernels: one warning
        eos = getattr(model.config, "eos_token_id", None) if model is not None else None
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.waiting: deque[Request] = deque()
        self.jobs: deque[_Job] = deque()
        self.active: list[Sequence] = []
        self.cache: SlotCache | None = None
        self._wake = threading.Condition()
        # called on the scheduler thread after every `stream_interval` steps (and once nothing is decoding, and
        # after failing requests): where the HTTP layer hands the steps' events to its event loop (app.Mailbox)
        self.after_step: Callable[[], None] | None = None
        self._steps_held = 0  # steps whose events after_step has not handed over yet
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the step in progress, cancel what is left and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        """Queue a request (raises QueueFull when --max-queue requests are already waiting, ValueError for an
        empty prompt or one longer than the model's context)."""
        ctx = context_length(self.model.config)
        for prompt in request.prompts:
            if not prompt or len(prompt) > ctx:
                raise ValueError(f"a prompt of {len(prompt)} tokens: give 1 to {ctx} (the model's context) tokens")
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(request)
            self._wake.notify()
        self._gauge()

    def run_job(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the scheduler thread between steps; its result (or exception) arrives in the Future."""
        job = _Job(fn, Future())
        with self._wake:
            self.jobs.append(job)
            self._wake.notify()
        return job.future

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        if not self.eager and self.model is not None:
            with torch.inference_mode():
                self.compiled = CompiledStep.build(self.model)
        while True:
            with self._wake:
                while not (self._stopping or self.waiting or self.jobs or self.active):
                    self._wake.wait()
                if self._stopping:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
            for job in jobs:
                self._run_job(job)
            try:
                with torch.inference_mode():
                    admitted = self._admit()
                    if self.active or admitted:
                        self._step(admitted)
            except Exception as error:  # a bug or an out-of-memory: fail the requests in flight, keep serving
                self._fail_all(error)
            self._steps_held += 1
            if self.after_step is not None and (self._steps_held >= self.stream_interval or not self.active):
                self._steps_held = 0
                self.after_step()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _run_job(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode():
                job.future.set_result(job.fn())
        except BaseException as error:  # handed to the waiting handler, which answers with an error
            job.future.set_exception(error)

    def _admit(self) -> list[Request]:
        """Take waiting requests into this step while rows are free and its token budget allows (their prompts
        are prefilled in the step's forward)."""
        budget = self.max_batch_tokens - len(self.active)
        rows = len(self.active)
        admitted: list[Request] = []
        while True:
            with self._wake:
                if not self.waiting:
                    break
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    request.emit(None)
                    continue
                cost = sum(len(p) for p in request.prompts)
                if request.size > self.max_num_seqs - rows or (admitted and cost > budget):
                    break  # first come, first served: the head of the queue waits for room
                self.waiting.popleft()
            admitted.append(request)
            rows += request.size
            budget -= cost
        self._gauge()
        return admitted

    def _ensure_cache(self, rows: int) -> SlotCache:
        """A cache with at least `rows` slots (grown by doubling, up to max_num_seqs; rows are copied over)."""
        if self.cache is not None and self.cache.slots >= rows:
            return self.cache
        slots = min(self.max_num_seqs, max(4, 1 << math.ceil(math.log2(max(rows, 1)))))
        grown = SlotCache(self.model, slots)
        if self.cache is not None:
            for i, seq in enumerate(self.active):
                grown.k[:, i, :, : seq.length] = self.cache.k[:, i, :, : seq.length]
                grown.v[:, i, :, : seq.length] = self.cache.v[:, i, :, : seq.length]
        self.cache = grown
        return grown

    def _step(self, admitted: list[Request]) -> None:
        """One forward: the newest token of every active row, and the prompts of the requests just admitted;
        every row (old and new) picks its next token."""
        n = len(self.active)
        new_rows = sum(r.size for r in admitted)
        cache = self._ensure_cache(n + new_rows)
        tokens = [s.out[-1] for s in self.active]
        positions = [s.length for s in self.active]
        slots = list(range(n))
        segments: list[tuple[int, int]] = []
        keep = list(range(n))  # which positions' logits are needed: each row's newest, each prompt's last
        fresh: list[Sequence] = []
        for request in admitted:
            for p, prompt in enumerate(request.prompts):
                slot = n + len(fresh)
                segments.append((len(tokens), len(prompt)))
                keep.append(len(tokens) + len(prompt) - 1)
                tokens += prompt
                positions += range(len(prompt))
                slots += [slot] * len(prompt)
                fresh += [
                    Sequence(request, p * request.n + j, prompt, self.tokenizer, self.eos) for j in range(request.n)
                ]
        device = cache.k.device
        where = torch.tensor(positions, device=device)  # (T,) each token's position in its own sequence
        cache.bind(torch.tensor(slots, device=device), where, n, segments)
        # every position's logits in a step without prompts (no gather)
        kept = torch.tensor(keep, device=device) if len(keep) < len(tokens) else None
        started = self.waits.start()
        logits = self._forward(torch.tensor([tokens], device=device), where[None], cache, kept)  # (n + prompts, V)
        self.waits.stop(started)
        # each prompt's keys/values were written to its first choice's slot; the other choices get copies
        rows_logits = list(range(n))  # row -> its line of `logits`
        first = n  # slot of the segment's first choice
        for i, (_, length) in enumerate(segments):
            choices = fresh[first - n].request.n
            for j in range(1, choices):
                cache.copy(first, first + j, length)
            rows_logits += [n + i] * choices
            first += choices
        for seq in self.active:
            seq.length += 1
        self.active += fresh
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self.active))
        chosen: dict[int, int] = {}  # row -> token, for the rows picked together
        greedy = [i for i, s in enumerate(self.active) if s.request.params.greedy]
        if greedy:
            chosen.update(zip(greedy, _lines(logits, [rows_logits[i] for i in greedy]).argmax(-1).tolist()))
        sampled = [i for i, s in enumerate(self.active) if s.generator is not None and not s.request.params.penalised]
        if sampled:
            picked = sample_rows(_lines(logits, [rows_logits[i] for i in sampled]), [self.active[i] for i in sampled])
            chosen.update(zip(sampled, picked))
        vocab = logits.size(-1)
        taken = 0
        for i, seq in enumerate(self.active):  # penalised rows pick alone
            taken += self._take(seq, logits, rows_logits[i], vocab, chosen.get(i))
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(taken)
        self._retire()

    def _forward(self, input_ids: Tensor, position_ids: Tensor, cache: SlotCache, keep: Tensor | None) -> Tensor:
        """The step's logits (len(keep) or T, V) for input_ids (1, T): the compiled step where there is one."""
        if self.compiled is not None:
            try:
                return self.compiled(input_ids, position_ids, cache, keep)
            except Exception as error:  # something the compiled step does not cover after all: the modules from now
                # on (rerunning the step is safe: it writes the same keys and values to the same places)
                reason = f"{type(error).__name__}: {error}"
                log.warning(json.dumps({"event": "step", "compiled": False, "reason": reason}))
                self.compiled = None
        return self.model(
            input_ids, position_ids=position_ids, past_key_values=cache, logits_to_keep=0 if keep is None else keep
        ).logits[0]

    def _take(self, seq: Sequence, logits: Tensor, row: int, vocab: int, token: int | None = None) -> int:
        """Pick (unless given) and record seq's next token from line `row` of `logits`; hand its text to the
        request. Returns the number of tokens taken (0 for a cancelled request)."""
        request = seq.request
        if request.cancelled:
            return 0
        if token is None:
            token = seq.pick(logits[row])
        seq.record(token, vocab)
        request.completion_tokens += 1
        now = time.perf_counter()
        if self.metrics is not None:
            if request.first_token_at is None:
                self.metrics.ttft.observe(now - request.arrival)
            elif seq.last_token_at:
                self.metrics.itl.observe(now - seq.last_token_at)
        if request.first_token_at is None:
            request.first_token_at = now
        seq.last_token_at = now
        top = request.params.logprobs
        logprobs = [token_logprobs(logits[row], token, top)] if top is not None else None
        finish = None
        if token in seq.eos:
            text, finish = seq.text.finish(), "stop"
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                finish = "stop"
            elif seq.json_state is not None and request.params.constraint.complete(seq.json_state):
                text += seq.text.finish()  # JSON mode: the object is closed
                finish = "stop"
            elif len(seq.out) >= request.params.max_tokens or seq.length + 1 >= self.cache.ctx:
                text += seq.text.finish()
                finish = "length"
        request.emit(Piece(seq.index, text, [token], logprobs, finish))
        if finish is not None:
            seq.text.stopped = True
            if request.ended():
                request.emit(None)
        return 1

    def _retire(self) -> None:
        """Drop finished and cancelled sequences; the last active row moves into each freed slot."""
        i = 0
        while i < len(self.active):
            seq = self.active[i]
            if seq.text.stopped or seq.request.cancelled:
                last = len(self.active) - 1
                if i != last:
                    self.cache.copy(last, i, self.active[last].length)
                    self.active[i] = self.active[last]
                self.active.pop()
                if seq.request.cancelled and seq.request._left > 0:
                    seq.request._left = 0
                    seq.request.emit(None)
                continue
            i += 1
        self._gauge()

    def _fail_all(self, error: BaseException) -> None:
        """End every request in flight or waiting with `error` (each handler answers with it)."""
        requests = {id(s.request): s.request for s in self.active}
        with self._wake:
            requests.update({id(r): r for r in self.waiting})
            self.waiting.clear()
            jobs = list(self.jobs)
            self.jobs.clear()
        self.active.clear()
        for request in requests.values():
            if request._left > 0:
                request._left = 0
                request.emit(error)
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
        self._steps_held = 0
        if self.after_step is not None:
            self.after_step()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self.waiting))
            self.metrics.running.set(len(self.active))


def _lines(logits: Tensor, index: list[int]) -> Tensor:
    """logits[index] for a list of line numbers: a view when they are consecutive (every step without a new
    prompt), else one index_select. Indexing with the Python list itself took ~75 us for 16 lines of 4,096
    on a 2-core AMD EPYC (Zen 3), a view 3 us and index_select 20 us."""
    first = index[0]
    if index == list(range(first, first + len(index))):
        return logits[first : first + len(index)]
    return logits.index_select(0, torch.tensor(index, device=logits.device))


def token_logprobs(logits: Tensor, token: int, top: int) -> dict[str, Any]:
    """{"id", "logprob", "top": [(id, logprob), ...]} for `token` under the distribution of `logits` (V,) (the
    model's own, before penalties and biases), with the `top` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = logp.topk(min(top, logp.numel()))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return {"id": token, "logprob": float(logp[token]), "top": alternatives}
