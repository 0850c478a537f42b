"""Text generation: sampling rules, a KV-cached decoding loop, stop criteria and streaming.

    prompt ids (B, T) --prefill (one forward, fills the preallocated KV cache)--> logits of the last position
    then per step: logits -> [repetition penalty] -> [logits processors] -> sample_next_token -> append
    -> one-token forward

Left-padded batches need `attention_mask`; positions are counted from each row's first real token,
so every row decodes exactly as it would alone.

Beam search (`num_beams > 1`, `beam_search`) keeps the `num_beams` best-scoring continuations of each prompt;
it only needs a step "next-token logits for these beams, after reordering the cache to their parents", so the
same search serves decoder-only and encoder-decoder models.

Both loops start from `_start`: a causal LM prefills its prompt; an encoder-decoder (config.is_encoder_decoder)
encodes its source once and decodes from decoder_start_token_id, its cache holding the self-attention keys/values
and the cross-attention keys/values (projected once). config.forced_eos_token_id forces EOS as the last token.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lmforge.constants import context_length
from lmforge.nn import KVCache

#: (token ids so far (B, t), next-token logits (B, V)) -> adjusted logits (B, V)
LogitsProcessor = Callable[[Tensor, Tensor], Tensor]
#: one decoding step: (every row's ids so far (N, t), the row each continues (N,), None = the same row) -> next-token
#: logits (N, V). The model reorders its cache by the parent rows, then runs the last token of each row.
BeamStep = Callable[[Tensor, Tensor | None], Tensor]
_NEG = -1.0e9  # the score that rules a candidate out (finite, so sums stay ordered)


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
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

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
        for name in ("min_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {value!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1 (1 = no beam search), got {self.num_beams!r}")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(
                f"num_return_sequences must be an integer in [1, num_beams={self.num_beams}] (each returned "
                f"sequence is one of the final beams), got {self.num_return_sequences!r}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search is deterministic: num_beams > 1 needs do_sample=False")
        if self.num_beams > 1 and self.stop:
            raise ValueError("stop strings are not supported with beam search (num_beams > 1); use eos_token_id")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def updated(self, **options: Any) -> GenerationConfig:
        """A copy with each option that is not None set (a caller's explicit options over these defaults)."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})


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


def ban_repeated_ngrams(logits: Tensor, ids: Tensor, n: int) -> Tensor:
    """Set to -inf the logits (B, V) of tokens that would repeat an n-gram already in the row of ids (B, t)."""
    t = ids.size(1)
    if t + 1 < n:
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(ids.tolist()):
        tail = tokens[t - n + 1 :]  # the n - 1 tokens the next one would extend
        banned = [tokens[i + n - 1] for i in range(t - n + 1) if tokens[i : i + n - 1] == tail]
        logits[row, banned] = float("-inf")
    return logits


def constrain_logits(logits: Tensor, ids: Tensor, new_tokens: int, cfg: GenerationConfig, eos_ids: Tensor) -> Tensor:
    """The built-in rules on next-token logits (B, V) given the ids so far (B, t), `new_tokens` of them new:
    repetition penalty, no repeated n-grams, and no EOS before `min_new_tokens`."""
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ids, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        logits = ban_repeated_ngrams(logits, ids, cfg.no_repeat_ngram_size)
    if new_tokens < cfg.min_new_tokens and len(eos_ids):
        logits = logits.index_fill(-1, eos_ids, float("-inf"))
    return logits


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


def _new_token_budget(model: Any, T: int, max_new_tokens: int) -> int:
    """How many tokens may follow T tokens of the decoder: `max_new_tokens`, cut (with a warning) to the context."""
    ctx = context_length(model.config)
    if T == 0:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    if T > ctx:
        raise ValueError(
            f"the prompt has {T} tokens but the model's context is {ctx}; shorten the prompt "
            f"or truncate it to the last {ctx} tokens"
        )
    if T + max_new_tokens > ctx:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} would run past the model's context of {ctx} tokens; "
            f"generating {ctx - T} tokens",
            stacklevel=6,
        )
        return ctx - T
    return max_new_tokens


@dataclass
class _Start:
    """A batch ready to decode: the ids the new tokens follow, `prefix` (N, T) (the prompt of a causal LM, the
    decoder start token of an encoder-decoder), the logits of the first new token (N, V) (None when
    max_new == 0), the `step` that gives the next ones, and processors the model's config asks for."""

    prefix: Tensor
    first: Tensor | None
    step: BeamStep
    max_new: int
    processors: list[LogitsProcessor]


def _start(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    rows: int,
    max_new_tokens: int,
    use_cache: bool,
    decoder_input_ids: Tensor | None = None,
    encoder_outputs: Tensor | None = None,
) -> _Start:
    """Run the model on the inputs, each repeated `rows` times (adjacent: the beams of one input), up to the
    first new token's logits. An encoder-decoder (config.is_encoder_decoder) encodes its source once here (unless
    its `encoder_outputs` (B, S, C) are given); its decoder starts from `decoder_input_ids` (B, P) when given (e.g.
    Whisper's prompt), else decoder_start_token_id."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the fast, mask-free path
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    if seq2seq and rows > 1 and encoder_outputs is None and input_ids.size(1) > 0:
        encoder_outputs = model.encode(input_ids, attention_mask)  # (B, S, C): each source once, not once per beam
    if attention_mask is not None:
        attention_mask = attention_mask.repeat_interleave(rows, dim=0)  # never reordered: same for every beam
    if rows > 1:
        input_ids = input_ids.repeat_interleave(rows, dim=0)
        if decoder_input_ids is not None:
            decoder_input_ids = decoder_input_ids.repeat_interleave(rows, dim=0)
        if encoder_outputs is not None:
            encoder_outputs = encoder_outputs.repeat_interleave(rows, dim=0)
    if seq2seq:
        start = _seq2seq_start(
            model, input_ids, attention_mask, max_new_tokens, use_cache, decoder_input_ids, encoder_outputs, rows
        )
    else:
        if decoder_input_ids is not None or encoder_outputs is not None:
            raise ValueError("decoder_input_ids and encoder_outputs are for encoder-decoders; a causal LM has neither")
        start = _causal_start(model, input_ids, attention_mask, max_new_tokens, use_cache)
    forced_eos = getattr(model.config, "forced_eos_token_id", None)
    if forced_eos is not None and start.max_new:
        start.processors.append(_force_eos_at(start.prefix.size(1) + start.max_new - 1, forced_eos))
    return start


def _causal_start(
    model: Any, ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, use_cache: bool
) -> _Start:
    """A decoder-only model: prefill the prompt ids (N, T) into a preallocated KV cache."""
    N, T = ids.shape
    max_new = _new_token_budget(model, T, max_new_tokens)
    mask = None
    if attention_mask is not None:
        mask = torch.ones(N, T + max_new, dtype=attention_mask.dtype, device=ids.device)  # (N, T + new)
        mask[:, :T] = attention_mask
    cache: KVCache | None = model.allocate_cache(N, T + max_new) if use_cache and max_new else None

    def step(seqs: Tensor, parents: Tensor | None) -> Tensor:
        m = mask[:, : seqs.size(1)] if mask is not None else None
        if cache is None:
            return model(seqs, attention_mask=m, logits_to_keep=1).logits[:, -1]
        if parents is not None:
            cache.reorder(parents)
        return model(seqs[:, -1:], attention_mask=m, past_key_values=cache).logits[:, -1]

    first = None
    if max_new:
        m = mask[:, :T] if mask is not None else None
        first = model(ids, attention_mask=m, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return _Start(ids, first, step, max_new, [])


def _seq2seq_start(
    model: Any,
    source: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    use_cache: bool,
    decoder_input_ids: Tensor | None = None,
    encoder_outputs: Tensor | None = None,
    group: int = 1,
) -> _Start:
    """An encoder-decoder: encode the source (N, S, ...) once (token ids, or e.g. audio features), or take its
    `encoder_outputs` (N, S, C) as given; the decoder starts from `decoder_input_ids` (N, P) or else
    decoder_start_token_id, keeps a self-attention KV cache and projects the encoder output to cross-attention
    keys/values once (in the cache). Rows come in groups of `group` copies of one source (its beams), which
    share one copy of those keys/values."""
    if source.size(1) == 0:
        raise ValueError("the source is empty: generation needs at least one source token")
    if decoder_input_ids is None:
        start_id = model.config.decoder_start_token_id
        if start_id is None:
            raise ValueError("an encoder-decoder generates after config.decoder_start_token_id: set it")
        prefix = torch.full((source.size(0), 1), start_id, dtype=torch.long, device=source.device)  # (N, 1)
    else:
        if decoder_input_ids.dim() != 2 or decoder_input_ids.size(0) != source.size(0):
            raise ValueError(
                f"decoder_input_ids must be (batch, length) with one row per source; got "
                f"{tuple(decoder_input_ids.shape)} for {source.size(0)} sources"
            )
        prefix = decoder_input_ids.to(device=source.device, dtype=torch.long)  # (N, P)
    if encoder_outputs is not None and encoder_outputs.size(0) != source.size(0):
        raise ValueError(f"encoder_outputs has {encoder_outputs.size(0)} rows for {source.size(0)} sources")
    memory = model.encode(source, attention_mask) if encoder_outputs is None else encoder_outputs  # (N, S, C)
    P = prefix.size(1)
    max_new = _new_token_budget(model, P, max_new_tokens)
    cache: KVCache | None = model.allocate_cache(source.size(0), P + max_new) if use_cache and max_new else None
    if cache is not None:
        cache.cross_group = group

    def step(seqs: Tensor, parents: Tensor | None) -> Tensor:
        if cache is None:
            return model(attention_mask=attention_mask, decoder_input_ids=seqs, encoder_outputs=memory).logits[:, -1]
        if parents is not None:
            cache.reorder(parents)
        out = model(
            attention_mask=attention_mask, decoder_input_ids=seqs[:, -1:], encoder_outputs=memory, past_key_values=cache
        )
        return out.logits[:, -1]

    first = None
    if max_new:  # the whole prompt in one forward, filling the cache
        if cache is None:
            first = step(prefix, None)
        else:
            out = model(
                attention_mask=attention_mask, decoder_input_ids=prefix, encoder_outputs=memory, past_key_values=cache
            )
            first = out.logits[:, -1]
    return _Start(prefix, first, step, max_new, [])


def _force_eos_at(position: int, eos: int | list[int]) -> LogitsProcessor:
    """The processor behind config.forced_eos_token_id: the token at `position` (counted over the whole decoder
    sequence, so the last one allowed) is EOS."""
    eos_ids = [eos] if isinstance(eos, int) else list(eos)

    def force(ids: Tensor, logits: Tensor) -> Tensor:
        if ids.size(1) != position:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[:, eos_ids] = 0.0
        return forced

    return force


def _eos_and_pad(cfg: GenerationConfig, device: torch.device) -> tuple[Tensor, int]:
    """The EOS ids as a tensor (possibly empty) and the id that pads finished rows (pad, else the first EOS, else 0)."""
    eos = cfg.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
    return eos_ids, pad


def iter_generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    logits_processors: Sequence[LogitsProcessor] = (),
    decoder_input_ids: Tensor | None = None,
    encoder_outputs: Tensor | None = None,
    **kwargs: Any,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), one step at a time. Finished rows yield the pad id.

    `logits_processors`: callables (ids so far (B, t), next-token logits (B, V)) -> logits (B, V), applied
    in order after the repetition penalty and before sampling (e.g. to block words: set their logits to -inf)."""
    cfg = _options(generation_config, kwargs, model)
    if cfg.num_beams > 1:
        raise ValueError("beam search picks its tokens only at the end: use generate(), not iter_generate/stream")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    start = _start(
        model, input_ids, attention_mask, 1, cfg.max_new_tokens, use_cache, decoder_input_ids, encoder_outputs
    )
    yield from _next_tokens(start, cfg, tokenizer, generator, logits_processors)


def _next_tokens(
    start: _Start,
    cfg: GenerationConfig,
    tokenizer: Any,
    generator: torch.Generator | None,
    logits_processors: Sequence[LogitsProcessor],
) -> Iterator[Tensor]:
    """The greedy/sampling loop of `iter_generate` from a started batch: yields (B,) per step."""
    if start.first is None:
        return
    prefix, max_new, logits = start.prefix, start.max_new, start.first
    processors = [*start.processors, *logits_processors]
    B, T = prefix.shape
    if generator is None and cfg.seed is not None and not cfg.greedy:
        generator = torch.Generator(device=prefix.device).manual_seed(cfg.seed)
    eos_ids, pad = _eos_and_pad(cfg, prefix.device)
    stopper = StopStrings(cfg.stop, tokenizer) if cfg.stop else None

    seq = torch.full((B, T + max_new), pad, dtype=prefix.dtype, device=prefix.device)  # (B, T + new)
    seq[:, :T] = prefix
    finished = torch.zeros(B, dtype=torch.bool, device=prefix.device)
    can_finish = bool(len(eos_ids)) or stopper is not None  # else every row runs to max_new_tokens

    for step in range(max_new):
        cur = T + step  # tokens so far
        logits = constrain_logits(logits, seq[:, :cur], step, cfg, eos_ids)
        for process in processors:
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
        logits = start.step(seq[:, : cur + 1], None)


def beam_search(
    first_logits: Tensor,
    prompt: Tensor,
    step: BeamStep,
    cfg: GenerationConfig,
    max_new_tokens: int,
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Tensor:
    """Beam search over B prompts, each given `num_beams` times in a row: prompt (B * K, T) and the logits of
    the token after it, first_logits (B * K, V). Returns (B * R, T + n): the R = `num_return_sequences` best
    finished hypotheses of each prompt, best first, padded after their EOS.

    A beam's score is the sum of its tokens' log-probabilities (after `constrain_logits` and the processors);
    a finished hypothesis is scored by that sum / (new tokens) ** length_penalty. Each step keeps the
    max(2, 1 + #EOS) * K best continuations, so K of them can go on even if others end: the K best that do
    not end are the next beams, and those among the K best that end (EOS, or the length limit) join the
    finished hypotheses, which keep their K best. `early_stopping`: True stops a prompt once K hypotheses
    are finished; False once the best running beam, scored at its current length, cannot beat the worst
    finished one; "never" does the same but scores the beam at the longest length when length_penalty > 0.
    """
    K, R = cfg.num_beams, cfg.num_return_sequences
    N, T = prompt.shape
    B, L, dev = N // K, T + max_new_tokens, prompt.device
    eos_ids, pad = _eos_and_pad(cfg, dev)
    n_cand = max(2, 1 + len(eos_ids)) * K
    in_top_k = torch.arange(n_cand, device=dev) < K  # (n_cand,)
    offset = torch.arange(B, device=dev)[:, None] * K  # (B, 1): first row of each prompt's beams
    beams = torch.full((B, K, L), pad, dtype=prompt.dtype, device=dev)  # running beams
    beams[:, :, :T] = prompt.view(B, K, T)
    scores = torch.zeros(B, K, device=dev)  # (B, K)
    scores[:, 1:] = _NEG  # the K copies of a prompt are one beam at first
    done = beams.clone()  # finished hypotheses (B, K, L), their scores, new-token counts and whether filled
    done_scores = torch.full((B, K), _NEG, device=dev)
    done_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    done_set = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    logits = first_logits
    for new in range(max_new_tokens):
        cur = T + new
        ids = beams[:, :, :cur].reshape(N, cur)
        logp = constrain_logits(logits.float().log_softmax(dim=-1), ids, new, cfg, eos_ids)  # (N, V)
        for process in logits_processors:
            logp = process(ids, logp)
        V = logp.size(-1)
        total = (logp.view(B, K, V) + scores[:, :, None]).view(B, K * V)
        cand_scores, flat = total.topk(n_cand, dim=-1)  # (B, n_cand), best first
        parent = flat // V
        cand = beams.gather(1, parent[:, :, None].expand(-1, -1, L))  # (B, n_cand, L)
        cand[:, :, cur] = flat % V
        ends = torch.isin(cand[:, :, cur], eos_ids) | (cur + 1 >= L)  # (B, n_cand)

        # the next running beams: the K best candidates that go on
        live = cand_scores + ends.float() * _NEG
        keep = live.topk(K, dim=-1).indices  # (B, K)
        beams = cand.gather(1, keep[:, :, None].expand(-1, -1, L))
        scores, parent = live.gather(1, keep), parent.gather(1, keep)

        # the finished hypotheses: those ending among the K best, unless the prompt is already decided
        final = cand_scores / (new + 1) ** cfg.length_penalty
        full = done_set.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        final = final + (full | ~improvable).float() * _NEG + (~(ends & in_top_k)).float() * _NEG
        merged = torch.cat([done_scores, final], dim=1).topk(K, dim=-1).indices  # (B, K)
        done = torch.cat([done, cand], dim=1).gather(1, merged[:, :, None].expand(-1, -1, L))
        done_scores = torch.cat([done_scores, final], dim=1).gather(1, merged)
        cand_len = torch.full_like(flat, new + 1)  # (B, n_cand) new-token counts
        done_len = torch.cat([done_len, cand_len], dim=1).gather(1, merged)
        done_set = torch.cat([done_set, ends & in_top_k], dim=1).gather(1, merged)

        # can the best running beam still beat the worst finished hypothesis?
        length = L - T if cfg.early_stopping == "never" and cfg.length_penalty > 0 else new + 1
        best = scores[:, :1] / length**cfg.length_penalty
        worst = torch.where(done_set, done_scores.min(dim=-1, keepdim=True).values, _NEG)
        improvable &= (best > worst).any(dim=-1, keepdim=True)
        all_full = bool(done_set.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break
        logits = step(beams.view(N, L)[:, : cur + 1], (parent + offset).view(N))
    n = int(done_len[:, :R].max())
    return done[:, :R].reshape(B * R, L)[:, : T + n]


def beam_generate(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cfg: GenerationConfig,
    use_cache: bool = True,
    logits_processors: Sequence[LogitsProcessor] = (),
    decoder_input_ids: Tensor | None = None,
    encoder_outputs: Tensor | None = None,
) -> Tensor:
    """Beam search for a causal LM or an encoder-decoder: inputs (B, T) -> (B * R, T' + n), where T' is the
    prompt's length (causal LM) or the decoder prompt's (encoder-decoder: 1, the decoder start token, unless
    decoder_input_ids is given)."""
    start = _start(
        model,
        input_ids,
        attention_mask,
        cfg.num_beams,
        cfg.max_new_tokens,
        use_cache,
        decoder_input_ids,
        encoder_outputs,
    )
    if start.first is None:
        return start.prefix[:: cfg.num_beams].repeat_interleave(cfg.num_return_sequences, dim=0)
    processors = [*start.processors, *logits_processors]
    return beam_search(start.first, start.prefix, start.step, cfg, start.max_new, processors)


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
    decoder_input_ids: Tensor | None = None,
    encoder_outputs: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Prompt (B, T) followed by up to `max_new_tokens` new tokens: (B, T + n). For an encoder-decoder,
    input_ids is the source and the result is decoder_start_token_id followed by the new tokens, (B, 1 + n), or,
    with `decoder_input_ids` (B, P), that decoder prompt followed by the new tokens, (B, P + n); `encoder_outputs`
    (B, S, C), when the caller has encoded the source already, saves encoding it again.

    Options (keywords or a GenerationConfig): max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
    top_p, repetition_penalty, no_repeat_ngram_size, eos_token_id, pad_token_id, stop (strings; needs
    `tokenizer`), seed; beam search: num_beams, num_return_sequences (rows per prompt, (B * R, T + n)),
    length_penalty, early_stopping (see `beam_search`); and `logits_processors` (see `iter_generate`).
    Generation stops when every row has produced EOS or a stop string; finished rows are padded.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = attention_mask[None] if attention_mask is not None else None
    cfg = _options(generation_config, kwargs, model)
    if cfg.num_beams > 1:
        if streamer is not None:
            raise ValueError("a streamer needs tokens as they are chosen; beam search picks them only at the end")
        with torch.inference_mode():
            out = beam_generate(
                model, input_ids, attention_mask, cfg, use_cache, logits_processors, decoder_input_ids, encoder_outputs
            )
        return out.clone()  # an ordinary tensor, usable in training code
    tokens = []
    with torch.inference_mode():
        start = _start(
            model, input_ids, attention_mask, 1, cfg.max_new_tokens, use_cache, decoder_input_ids, encoder_outputs
        )
        for token in _next_tokens(start, cfg, tokenizer, generator, logits_processors):
            tokens.append(token)
            if streamer is not None:
                streamer(token)
    if not tokens:
        return start.prefix.clone()
    # concatenated outside inference mode: the result is an ordinary tensor, usable in training code
    return torch.cat([start.prefix, torch.stack(tokens, dim=1)], dim=1)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    For a byte-level BPE tokenizer (GPT-2's) that gives each id's bytes (lmforge's `Tokenizer.token_bytes`), the
    bytes go through an incremental UTF-8 decoder, which holds back an unfinished character: one table lookup per
    token (a server's step does this for every row; 14 us a row before, in the step of a 16-stream server). Otherwise
    it decodes a short window and emits the new suffix once it no longer ends in U+FFFD (an unfinished byte
    sequence): WordPiece's "##" pieces, SentencePiece's spaces, any tokenizer. Both give the text `decode` gives.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids before this were already emitted
        # lmforge's tokenizer hands out a decode with its lookups done once (two decodes per token add up)
        make = getattr(tokenizer, "decoder", None)
        self._decode_ids = make(skip_special_tokens) if callable(make) else None
        table = getattr(tokenizer, "token_bytes", None)
        self._bytes: list[bytes] | None = table(skip_special_tokens) if callable(table) else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _decode(self, ids: list[int]) -> str:
        if self._decode_ids is not None:
            return self._decode_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        table = self._bytes
        if table is not None and 0 <= token_id < len(table):
            self.ids.append(token_id)
            return self._utf8.decode(table[token_id])
        if table is not None:
            self._decode([token_id])  # raises the tokenizer's error, naming the id
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
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


class TextStream:
    """Push a row's new token ids one at a time, get its text in pieces: never a broken UTF-8 character, ending
    just before a stop string, and holding back a suffix that may still become one (what streaming and the
    server send)."""

    def __init__(self, tokenizer: Any, stop: str | list[str] | None = None, skip_special_tokens: bool = True) -> None:
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self.pending = ""  # decoded text not yet given out
        self.stopped = False  # a stop string was reached: nothing more comes

    def push(self, token_id: int) -> str:
        """The text that token_id makes safe to give out ("" while it is held back)."""
        return self._release(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        """The rest, once the row has ended (EOS or the length limit)."""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        if not self.stop:  # nothing to look for or hold back
            return piece
        self.pending += piece
        cut = min((self.pending.find(s) for s in self.stop if s in self.pending), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = 0 if final else _partial_stop_suffix(self.pending, self.stop)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out


def text_pieces(
    tokens: Iterator[Tensor],
    tokenizer: Any,
    eos_token_id: int | list[int] | None = None,
    stop: str | list[str] | None = None,
    skip_special_tokens: bool = True,
) -> Iterator[str]:
    """Text pieces of a one-row token stream (from `iter_generate`): never a broken UTF-8 character,
    ending at EOS or just before a stop string (a suffix that may become one is held back)."""
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    text = TextStream(tokenizer, stop, skip_special_tokens)
    while not text.stopped:
        # inference mode only while the model runs: the caller's loop body is not inside it
        with torch.inference_mode():
            token = next(tokens, None)
        finished = token is None or int(token[0]) in eos_ids
        piece = text.finish() if finished else text.push(int(token[0]))
        if piece:
            yield piece
        if finished:
            return


def _partial_stop_suffix(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
