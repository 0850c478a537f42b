"""text-generation: continue prompts with a causal LM, in batches, or stream one as text pieces.

    "Once upon a time"  -> [{"generated_text": "Once upon a time there was ..."}]   (num_return_sequences dicts)
    a list of prompts   -> a list of those
    pipe.stream(prompt) -> an iterator of text pieces (never a split UTF-8 character)

Every option of `lmforge.generation` works (max_new_tokens, do_sample, temperature, top_k, top_p,
repetition_penalty, seed / generator, stop strings, eos_token_id). The model's context is a hard limit:
`max_new_tokens` is lowered (with a warning) so that prompt + new tokens fit, and a prompt that fills the
context alone keeps only its last tokens (with a warning; `truncation=False` makes it a ValueError).

Two hooks shape what comes out:
- `bad_words=[...]` (strings or token-id lists): those token sequences are never generated. A logits
  processor (`lmforge.generation`'s `logits_processors=` hook) sets the score of a phrase's last token to
  -inf whenever the tokens before it were just generated (a one-token phrase is always blocked). It
  blocks token sequences, not meanings: the same word spelled with other tokens (another case, split
  differently) still gets through.
- `output_filters=[f, ...]` (each `f(text) -> text`): applied in order to every final text (before
  `return_full_text` adds the prompt). This is the place to filter or adjust biased or unwanted output:
  redact, rewrite, or replace a text by a refusal. `stream()` with filters yields the filtered text once,
  at the end, since a filter needs the whole text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lmforge.constants import context_length
from lmforge.data.batching import fit_to_context
from lmforge.generation import GenerationConfig, iter_generate, text_pieces
from lmforge.pipelines.base import Feature, Pipeline, check_model_kind, index_list, warn

TextFilter = Callable[[str], str]


class BadWordsLogitsProcessor:
    """Block token sequences: a logits processor `(input_ids (B, T), logits (B, V)) -> logits (B, V)`.

    For a phrase [a, b, c] the score of c becomes -inf in the rows whose last tokens are [a, b]; a
    one-token phrase [a] is blocked everywhere. So none of the phrases can ever be completed.
    """

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        sequences = [list(map(int, s)) for s in sequences if len(s)]
        self.always = sorted({s[0] for s in sequences if len(s) == 1})
        self.phrases = [(torch.tensor(s[:-1]), s[-1]) for s in sequences if len(s) > 1]

    def __call__(self, input_ids: Tensor, logits: Tensor) -> Tensor:
        logits = logits.clone()
        if self.always:
            logits[:, self.always] = float("-inf")
        T = input_ids.size(1)
        for prefix, last in self.phrases:
            n = prefix.numel()
            if n <= T:
                hit = (input_ids[:, T - n :] == prefix.to(input_ids.device)).all(-1)  # (B,)
                logits[hit, last] = float("-inf")
        return logits


class TextGenerationPipeline(Pipeline):
    """Generate text with a causal LM (GPTForCausalLM).

    Options: the generation options (`max_new_tokens` (64), `do_sample`, `temperature`, `top_k`, `top_p`,
    `repetition_penalty`, `seed`, `generator`, `stop` (alias `stop_sequence`), `eos_token_id`,
    `generation_config`), `return_full_text` (True: prompt + continuation), `num_return_sequences` (1),
    `bad_words`, `output_filters`, `truncation` (True: an over-long prompt keeps its last tokens),
    `skip_special_tokens` (True), `return_tensors` (True: `{"generated_token_ids": prompt + new ids}`
    instead of text; stop strings and filters do not apply to ids).

    Prompts are batched by length and left-padded; each row decodes as it would alone, and a batch
    only holds prompts whose longest one still leaves room for every row's new tokens.
    """

    task = "text-generation"

    def _check_model(self, model: Any) -> None:
        check_model_kind(
            self.task,
            model,
            ["a causal language model (GPTForCausalLM)"],
            lambda m: hasattr(m, "allocate_cache") and context_length(getattr(m, "config", None)),
            "load it with AutoModelForCausalLM.from_pretrained(path)",
        )

    def _options(
        self,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        stop: str | list[str] | None = None,
        stop_sequence: str | list[str] | None = None,
        eos_token_id: int | list[int] | None = None,
        generation_config: Any = None,
        return_full_text: bool = True,
        num_return_sequences: int = 1,
        bad_words: Sequence[str | Sequence[int]] | None = None,
        output_filters: Sequence[TextFilter] | None = None,
        truncation: bool = True,
        skip_special_tokens: bool = True,
        return_tensors: bool = False,
    ) -> dict[str, Any]:
        cfg = (generation_config or GenerationConfig()).updated(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            eos_token_id=eos_token_id,
        )
        stops = [
            s
            for group in (stop, stop_sequence, cfg.stop)
            for s in ([group] if isinstance(group, str) else (group or []))
        ]
        cfg.stop = list(dict.fromkeys(stops))
        if cfg.eos_token_id is None:  # the model's own end token, as generate() uses it
            cfg.eos_token_id = getattr(self.model.config, "eos_token_id", None)
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self._pad_id()
        cfg.validate()
        if (
            isinstance(num_return_sequences, bool)
            or not isinstance(num_return_sequences, int)
            or num_return_sequences < 1
        ):
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
        if num_return_sequences > 1 and cfg.greedy:
            raise ValueError(
                f"num_return_sequences={num_return_sequences} with greedy decoding would give "
                f"{num_return_sequences} identical texts; pass do_sample=True (with a temperature > 0)"
            )
        filters = list(output_filters or [])
        for f in filters:
            if not callable(f):
                raise TypeError(f"output_filters must be callables text -> text, got {f!r}")
        if generator is None and cfg.seed is not None and not cfg.greedy:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        cfg.seed = None  # one generator for the whole call, so batches draw different numbers
        processors = [BadWordsLogitsProcessor(self._bad_word_ids(bad_words))] if bad_words else []
        return {
            "config": cfg,
            "generator": generator,
            "return_full_text": bool(return_full_text),
            "num_return_sequences": num_return_sequences,
            "processors": processors,
            "output_filters": filters,
            "truncation": bool(truncation),
            "skip_special_tokens": bool(skip_special_tokens),
            "return_tensors": bool(return_tensors),
        }

    def _bad_word_ids(self, bad_words: Any) -> list[list[int]]:
        """Token sequences to block: an id list as given; a string as encoded, alone and after a space
        (byte-level BPE spells " word" with other tokens than "word")."""
        if isinstance(bad_words, str):
            raise TypeError("bad_words must be a list of strings or token-id lists, got one str; wrap it in a list")
        sequences: list[list[int]] = []
        for word in bad_words:
            if isinstance(word, str):
                if not word:
                    raise ValueError("bad_words holds an empty string; remove it")
                variants = [word] if word.startswith(" ") else [word, " " + word]
                sequences += [self.tokenizer.encode(v) for v in variants]
            elif isinstance(word, (list, tuple)) and word and all(isinstance(i, int) for i in word):
                sequences.append(list(word))
            else:
                raise TypeError(f"bad_words entries must be strings or non-empty lists of token ids, got {word!r}")
        unique = {tuple(s) for s in sequences if s}
        return [list(s) for s in sorted(unique)]

    # ------------------------------------------------------------------ preprocess: fit the context
    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        ctx = context_length(self.model.config)
        wanted = opts["config"].max_new_tokens
        prompts = [self._check_text(item, start + k, what="prompt", allow_blank=True) for k, item in enumerate(items)]
        encoded = self.tokenizer.encode_batch_fast(prompts)
        clamped, truncated, features = [], [], []
        for k, (prompt, ids) in enumerate(zip(prompts, encoded)):
            index, new = start + k, wanted
            if not ids:
                raise ValueError(f"{self.task}: prompt {index} ({prompt!r}) gives no tokens; give it some text")
            if len(ids) >= ctx and wanted > 0:  # no room for a single new token
                if not opts["truncation"]:
                    raise ValueError(
                        f"{self.task}: prompt {index} has {len(ids)} tokens and the model's context is "
                        f"{ctx}, leaving no room to generate; shorten it, or pass truncation=True to "
                        "keep its last tokens"
                    )
                room = min(wanted, ctx // 2)  # at most half the context goes to new tokens
                ids = ids[len(ids) - (ctx - room) :]
                truncated.append(index)
            if len(ids) + new > ctx:
                new = ctx - len(ids)
                clamped.append(index)
            features.append(Feature([{"input_ids": ids, "max_new_tokens": new}], {"prompt": prompt}))
        if truncated:
            warn(
                f"{self.task}: prompt {index_list(truncated)} is too long for the model's context of {ctx} "
                f"tokens and was truncated from the left to its last {ctx - min(wanted, ctx // 2)} tokens; "
                "pass truncation=False to get an error instead"
            )
        if clamped:
            warn(
                f"{self.task}: max_new_tokens={wanted} would run past the model's context of {ctx} tokens "
                f"for prompt {index_list(clamped)}; generating only as many tokens as fit"
            )
        return features

    def _batches(self, rows: list[dict[str, Any]], batch_size: int, opts: dict[str, Any]) -> list[list[int]]:
        """Length-sorted batches, split so that the longest prompt + the most new tokens fit the context
        (rows are left-padded to the longest prompt)."""
        return fit_to_context(
            super()._batches(rows, batch_size, opts),
            [len(r["input_ids"]) for r in rows],
            [r["max_new_tokens"] for r in rows],
            context_length(self.model.config),
        )

    # ------------------------------------------------------------------ generation
    def _token_stream(
        self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, opts: dict[str, Any]
    ) -> Iterator[Tensor]:
        """`lmforge.generation.iter_generate` with this call's options: the next token of every row, (B,)."""
        cfg = dataclasses.replace(opts["config"], max_new_tokens=max_new_tokens)
        return iter_generate(
            self.model,
            input_ids,
            attention_mask=attention_mask,
            generation_config=cfg,
            tokenizer=self.tokenizer,
            generator=opts["generator"],
            logits_processors=opts["processors"],
        )

    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[list[list[int]]]:
        n = opts["num_return_sequences"]
        repeated = [row for row in rows for _ in range(n)]  # each prompt n times, side by side
        batch = self._collate(repeated, pad_id=opts["config"].pad_token_id, side="left")  # (B * n, T)
        mask = batch["attention_mask"]
        most_new = max(row["max_new_tokens"] for row in rows)
        steps = (
            list(self._token_stream(batch["input_ids"], None if bool(mask.all()) else mask, most_new, opts))
            if most_new > 0
            else []
        )
        new = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in repeated]  # (B * n, steps)
        eos = opts["config"].eos_token_id
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        out = []
        for r, row in enumerate(rows):
            sequences = []
            for tokens in new[r * n : (r + 1) * n]:
                tokens = tokens[: row["max_new_tokens"]]
                cut = next((t for t, token in enumerate(tokens) if token in eos_ids), len(tokens))
                sequences.append(tokens[:cut])
            out.append(sequences)
        return out

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> list[dict[str, str]]:
        prompt = feature.meta["prompt"]
        if opts["return_tensors"]:  # the ids instead of text: prompt (as fed to the model) + new tokens
            return [{"generated_token_ids": feature.rows[0]["input_ids"] + tokens} for tokens in outputs[0]]
        results = []
        for tokens in outputs[0]:
            text = self.tokenizer.decode(tokens, skip_special_tokens=opts["skip_special_tokens"])
            text = self._finish(text, opts)
            results.append({"generated_text": prompt + text if opts["return_full_text"] else text})
        return results

    @staticmethod
    def _cut_at_stop(text: str, stop: list[str]) -> str:
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def _finish(self, text: str, opts: dict[str, Any]) -> str:
        """A generated text ends before its first stop string; then the output filters run, in order."""
        text = self._cut_at_stop(text, opts["config"].stop)
        for f in opts["output_filters"]:
            text = f(text)
            if not isinstance(text, str):
                raise TypeError(f"output filter {f!r} returned {type(text).__name__}; a filter must return the text")
        return text

    # ------------------------------------------------------------------ streaming
    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """Generate from one prompt, yielding the new text in pieces as it is decoded.

        A piece never ends inside a UTF-8 character; the stream stops before a stop string (text that
        could still become one is held back until it is clear). With `output_filters` the filtered text
        comes as one piece at the end. Takes the same options as a call (`num_return_sequences` must be 1;
        `return_full_text` does not apply: only new text is streamed).
        """
        opts = self._parse({**self.options, **kwargs})
        if opts["num_return_sequences"] != 1:
            raise ValueError("stream() makes one sequence; num_return_sequences must be 1")
        if not isinstance(prompt, str):
            raise TypeError(f"stream() takes one prompt str, got {type(prompt).__name__}")
        row = self.preprocess([prompt], 0, opts)[0].rows[0]  # checked and fitted to the context now, not lazily
        pieces = self._stream_pieces(row, opts)
        if opts["output_filters"]:
            return self._filtered(pieces, opts)
        return pieces

    def _filtered(self, pieces: Iterator[str], opts: dict[str, Any]) -> Iterator[str]:
        yield self._finish("".join(pieces), opts)

    def _stream_pieces(self, row: dict[str, Any], opts: dict[str, Any]) -> Iterator[str]:
        if row["max_new_tokens"] == 0:
            return iter(())
        input_ids = torch.tensor([row["input_ids"]], device=self.device)  # (1, T)
        tokens = self._token_stream(input_ids, None, row["max_new_tokens"], opts)
        return text_pieces(
            tokens, self.tokenizer, opts["config"].eos_token_id, opts["config"].stop, opts["skip_special_tokens"]
        )
