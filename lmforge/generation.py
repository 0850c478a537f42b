"""Text generation: sampling rules, a KV-cached decoding loop, stop criteria and streaming.

    prompt ids (B, T) --prefill (one forward, fills the preallocated KV cache)--> logits of the last position
    then per step: logits -> [repetition penalty] -> [logits processors] -> sample_next_token -> append
    -> one-token forward

Left-padded batches need `attention_mask`; positions are counted from each row's first real token,
so every row decodes exactly as it would alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.constants import context_length
from lmforge.nn import KVCache

#: (token ids so far (B, t), next-token logits (B, V)) -> adjusted logits (B, V)
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]


@dataclass
class GenerationConfig:
    """Decoding options. `temperature == 0` or `do_sample=False` means greedy (argmax)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from logits (B, V) -> (B,). temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty: logits of tokens already in `seen` (B, L) are divided (if > 0) or multiplied
    (if < 0) by `penalty`."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


class StopStrings:
    """Finds stop strings in the decoded tail of each row's new tokens."""

    def __init__(self, stop: list[str], tokenizer: Any) -> None:
        if stop and tokenizer is None:
            raise ValueError("stop strings need the tokenizer: pass tokenizer=... to generate()")
        self.stop, self.tokenizer = stop, tokenizer
        # a stop string of n UTF-8 bytes spans at most n tokens, plus one partly outside it
        self.window = max((len(s.encode("utf-8")) for s in stop), default=0) + 1

    def hit(self, new_tokens: Tensor) -> Tensor:
        """new_tokens (B, n) -> (B,) bool: the tail of the row contains a stop string."""
        tails = self.tokenizer.batch_decode(new_tokens[:, -self.window :].tolist())
        return torch.tensor([any(s in t for s in self.stop) for t in tails], device=new_tokens.device)


def _options(generation_config: GenerationConfig | None, kwargs: dict[str, Any], model: Any) -> GenerationConfig:
    cfg = GenerationConfig(**asdict(generation_config)) if generation_config else GenerationConfig()
    for key, value in kwargs.items():
        if not hasattr(cfg, key):
            raise TypeError(f"generate() got an unknown option {key!r}")
        setattr(cfg, key, value)
    if cfg.stop is None:
        cfg.stop = []
    if not cfg.do_sample and (cfg.temperature not in (0, 1.0) or cfg.top_k or cfg.top_p is not None):
        warnings.warn("temperature/top_k/top_p only take effect with do_sample=True; decoding greedily", stacklevel=4)
    if cfg.eos_token_id is None:
        cfg.eos_token_id = getattr(model.config, "eos_token_id", None)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = getattr(model.config, "pad_token_id", None)
    cfg.validate()
    return cfg


def iter_generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    logits_processors: Sequence[LogitsProcessor] = (),
    **kwargs: Any,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), one step at a time. Finished rows yield the pad id.

    `logits_processors`: callables (ids so far (B, t), next-token logits (B, V)) -> logits (B, V), applied
    in order after the repetition penalty and before sampling (e.g. to block words: set their logits to -inf)."""
    cfg = _options(generation_config, kwargs, model)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    B, T = input_ids.shape
    ctx = context_length(model.config)
    if T == 0:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    if T > ctx:
        raise ValueError(
            f"the prompt has {T} tokens but the model's context is {ctx}; shorten the prompt "
            f"or truncate it to the last {ctx} tokens"
        )
    max_new = cfg.max_new_tokens
    if T + max_new > ctx:
        warnings.warn(
            f"max_new_tokens={max_new} would run past the model's context of {ctx} tokens; generating {ctx - T} tokens",
            stacklevel=3,
        )
        max_new = ctx - T
    if max_new == 0:
        return
    if generator is None and cfg.seed is not None and not cfg.greedy:
        generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
    eos = cfg.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
    stopper = StopStrings(cfg.stop, tokenizer) if cfg.stop else None

    seq = torch.full((B, T + max_new), pad, dtype=input_ids.dtype, device=input_ids.device)  # (B, T + new)
    seq[:, :T] = input_ids
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the fast, mask-free path
    mask = None
    if attention_mask is not None:
        mask = torch.ones(B, T + max_new, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :T] = attention_mask
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    can_finish = bool(len(eos_ids)) or stopper is not None  # else every row runs to max_new_tokens
    cache: KVCache | None = model.allocate_cache(B, T + max_new) if use_cache else None

    logits = model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    for step in range(max_new):
        cur = T + step  # tokens so far
        if cfg.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seq[:, :cur], cfg.repetition_penalty)
        for process in logits_processors:
            logits = process(seq[:, :cur], logits)
        if cfg.greedy:
            token = logits.argmax(dim=-1)
        else:
            token = sample_next_token(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        if can_finish:
            token = token.masked_fill(finished, pad)
        seq[:, cur] = token
        yield token
        if step == max_new - 1:
            return
        if can_finish:
            if len(eos_ids):
                finished |= torch.isin(token, eos_ids)
            if stopper is not None:
                finished |= stopper.hit(seq[:, T : cur + 1])
            if bool(finished.all()):
                return
        m = mask[:, : cur + 1] if mask is not None else None
        if cache is not None:
            logits = model(token[:, None], attention_mask=m, past_key_values=cache).logits[:, -1]
        else:
            logits = model(seq[:, : cur + 1], attention_mask=m, logits_to_keep=1).logits[:, -1]


def generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer: Callable[[Tensor], None] | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    **kwargs: Any,
) -> Tensor:
    """Prompt (B, T) followed by up to `max_new_tokens` new tokens: (B, T + n).

    Options (keywords or a GenerationConfig): max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, pad_token_id, stop (strings; needs `tokenizer`), seed; and
    `logits_processors` (see `iter_generate`).
    Generation stops when every row has produced EOS or a stop string; finished rows are padded.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    tokens = []
    with torch.inference_mode():
        for token in iter_generate(
            model,
            input_ids,
            attention_mask,
            generation_config,
            tokenizer,
            generator,
            use_cache,
            logits_processors,
            **kwargs,
        ):
            tokens.append(token)
            if streamer is not None:
                streamer(token)
    if not tokens:
        return input_ids
    # concatenated outside inference mode: the result is an ordinary tensor, usable in training code
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Decodes a short window and emits the new suffix once it no longer ends in U+FFFD (an unfinished
    byte sequence). Works for byte-level BPE and for WordPiece's "##" continuation pieces.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids before this were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def stream(model: Any, tokenizer: Any, prompt: str, **kwargs: Any) -> Iterator[str]:
    """Generate from one text prompt, yielding text pieces as they are decoded.

    Stop strings are honoured in the text: the stream ends just before the stop string, and text that
    could still become one is held back until it is clear.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: pass some text to continue")
    input_ids = torch.tensor([ids], device=model.device)
    stop = kwargs.get("stop") or []
    eos = kwargs.get("eos_token_id", getattr(model.config, "eos_token_id", None))
    tokens = iter_generate(model, input_ids, tokenizer=tokenizer, **kwargs)
    return text_pieces(tokens, tokenizer, eos, stop)


def text_pieces(
    tokens: Iterator[Tensor],
    tokenizer: Any,
    eos_token_id: int | list[int] | None = None,
    stop: str | list[str] | None = None,
    skip_special_tokens: bool = True,
) -> Iterator[str]:
    """Text pieces of a one-row token stream (from `iter_generate`): never a broken UTF-8 character,
    ending at EOS or just before a stop string (a suffix that may become one is held back)."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    pending = ""
    while True:
        # inference mode only while the model runs: the caller's loop body is not inside it
        with torch.inference_mode():
            token = next(tokens, None)
        finished = token is None or int(token[0]) in eos_ids
        pending += decoder.flush() if finished else decoder.push(int(token[0]))
        cut = min((pending.find(s) for s in stop if s in pending), default=-1)
        if cut >= 0:
            if cut:
                yield pending[:cut]
            return
        if finished:
            break
        keep = _partial_stop_suffix(pending, stop)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    if pending:
        yield pending


def _partial_stop_suffix(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
