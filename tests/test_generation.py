"""Tests for lmforge.generation: the sampling rules, the KV-cached decoding loop (against the
uncached loop and transformers' `generate`), EOS and stop strings, option checks and streaming.

Two kinds of model: a random tiny GPT (for parity checks) and a "scripted" GPT whose weights are
set so that it emits a chosen token sequence, whatever the prompt says: position p predicts
target[p + 1]. That makes EOS, stop-string and streaming tests exact."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from helpers import GREEDY_MARGIN, greedy_margin
from transformers import GPT2LMHeadModel  # test-only oracle

from lmforge.config import GPTConfig
from lmforge.generation import (
    GenerationConfig,
    IncrementalDecoder,
    apply_repetition_penalty,
    generate,
    iter_generate,
    sample_next_token,
    stream,
)
from lmforge.models.gpt import GPTForCausalLM
from lmforge.tokenizer import Tokenizer

V = 101
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello there",
    "Once upon a time",
    "stop here please",
    "中文 世界 😀",
] * 10
STORY = "Once upon a time: END of it"
CJK = "中文😀 hello 世界"


# ---------------------------------------------------------------------------------- models
def random_model(seed: int = 0, ctx: int = 128) -> GPTForCausalLM:
    torch.manual_seed(seed)
    m = GPTForCausalLM(GPTConfig(vocab_size=V, n_positions=ctx, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():  # spread the logits out, so greedy choices are clear-cut
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def scripted_model(target: list[int], vocab: int, ctx: int = 64, d: int = 128) -> GPTForCausalLM:
    """A GPT whose greedy continuation at position p is target[p + 1], for any input tokens.

    Token embeddings are zero and every block is the identity (zero output projections), so the
    final hidden state at p is LayerNorm(wpe[p]). The position vectors are orthogonal and have
    zero mean, so LayerNorm only rescales them; the output row of token v is the sum of the
    position vectors that should predict v."""
    torch.manual_seed(0)
    m = GPTForCausalLM(
        GPTConfig(vocab_size=vocab, n_positions=ctx, n_layer=1, n_head=2, n_embd=d, tie_word_embeddings=False)
    ).eval()
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, ctx)], dim=1))  # (d, ctx + 1)
    with torch.no_grad():
        m.transformer.wte.weight.zero_()
        for block in m.transformer.h:
            for lin in (block.attn.proj, block.mlp.proj):
                lin.weight.zero_()
                lin.bias.zero_()
        m.transformer.wpe.weight.copy_(basis[:, 1:].T * 3.0)  # orthogonal to the all-ones vector
        h = m.transformer.ln_f(m.transformer.wpe.weight)  # (ctx, d)
        head = torch.zeros(vocab, d)
        for p in range(len(target) - 1):
            head[target[p + 1]] += h[p]
        m.lm_head.weight.copy_(head)
    return m


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(iterator=CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def model() -> GPTForCausalLM:
    return random_model()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, model) -> GPT2LMHeadModel:
    d = tmp_path_factory.mktemp("gen_hf")
    model.save_pretrained(d)
    return GPT2LMHeadModel.from_pretrained(d).eval()


def prompt(B: int = 1, T: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def unpadded(out: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The rows of a left-padded generation (B, T + new) without their padding: prompt + new tokens."""
    T = mask.size(1)
    return [row[T - int(m.sum()) :].tolist() for row, m in zip(out, mask)]


# ---------------------------------------------------------------------------------- sampling rules
def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"top_k": 3}, {"top_p": 0.5}):
        assert torch.equal(sample_next_token(logits, temperature=0, **kw), logits.argmax(-1))
    assert sample_next_token(logits, temperature=0).shape == (5,)


def test_top_k_keeps_only_the_k_best():
    logits = torch.randn(20, generator=torch.Generator().manual_seed(1))
    best = set(torch.topk(logits, 3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(4000, 20), top_k=3, generator=gen)
    assert set(draws.tolist()) == best  # all three show up, nothing else does
    draws = sample_next_token(logits.expand(4000, 20), top_k=1, generator=gen)
    assert set(draws.tolist()) == {int(logits.argmax())}
    # 0 / None mean "off": every token can be drawn
    flat = torch.zeros(6)
    for k in (0, None):
        assert set(sample_next_token(flat.expand(3000, 6), top_k=k, generator=gen).tolist()) == set(range(6))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    cases = {0.45: {1}, 0.75: {1, 3}, 0.9: {1, 3, 2}, 0.97: {0, 1, 2, 3}, 1.0: {0, 1, 2, 3}}
    for top_p, support in cases.items():
        draws = sample_next_token(logits.expand(4000, 4), top_p=top_p, generator=gen)
        assert set(draws.tolist()) == support, top_p
    # the kept tokens are renormalised: 0.5 / 0.8 and 0.3 / 0.8
    draws = sample_next_token(logits.expand(8000, 4), top_p=0.75, generator=gen)
    counts = Counter(draws.tolist())
    assert counts[1] / 8000 == pytest.approx(0.625, abs=0.03)
    assert counts[3] / 8000 == pytest.approx(0.375, abs=0.03)
    # rows are filtered independently
    two = torch.stack([logits, logits.flip(0)])
    draws = sample_next_token(two.repeat(2000, 1), top_p=0.45, generator=gen).view(2000, 2)
    assert set(draws[:, 0].tolist()) == {1} and set(draws[:, 1].tolist()) == {2}


def test_temperature_scales_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(probs.log().expand(20000, 3), temperature=2.0, generator=gen)
    expected = probs.sqrt() / probs.sqrt().sum()  # p^(1/T), renormalised
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.02)


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(500, 50)

    def draw(seed: int) -> torch.Tensor:
        return sample_next_token(logits, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(123), draw(123))
    assert not torch.equal(draw(123), draw(124))


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0]])
    seen = torch.tensor([[0, 1, 1, 4]])  # token 1 twice: penalised once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -8.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, -4.0]]  # not modified in place


# ---------------------------------------------------------------------------------- the decoding loop
def test_cached_and_uncached_greedy_are_identical(model):
    # the cached step multiplies other shapes than the full forward (float sums in another order): the tokens
    # agree exactly because no step is a near tie (checked first, see helpers.GREEDY_MARGIN)
    ids = prompt(1, 5)
    cached = generate(model, ids, max_new_tokens=45)
    uncached = generate(model, ids, max_new_tokens=45, use_cache=False)
    assert cached.shape == (1, 50)
    assert greedy_margin(model, cached.tolist(), [5]) > GREEDY_MARGIN
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], ids)
    rows, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]])
    cached = generate(model, rows, attention_mask=mask, max_new_tokens=40)
    assert greedy_margin(model, unpadded(cached, mask), [6, 2, 4]) > GREEDY_MARGIN
    assert torch.equal(cached, generate(model, rows, attention_mask=mask, max_new_tokens=40, use_cache=False))


def test_greedy_matches_transformers(model, hf_model):
    ids = prompt(1, 7, seed=2)
    ours = model.generate(ids, max_new_tokens=50)
    theirs = hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ours.shape == theirs.shape == (1, 57)
    assert greedy_margin(model, ours.tolist(), [7]) > GREEDY_MARGIN  # other kernels, the same tokens: no near tie
    assert torch.equal(ours, theirs)


def test_greedy_left_padded_batch_matches_transformers_and_single_rows(model, hf_model):
    rows = [[3, 44, 17, 90, 5, 61, 2, 8], [71, 33, 20], [9, 9, 10, 40, 55]]
    ids, mask = left_pad(rows)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=50)
    theirs = hf_model.generate(
        ids, attention_mask=mask, max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert greedy_margin(model, unpadded(ours, mask), list(map(len, rows))) > GREEDY_MARGIN  # no near tie
    assert torch.equal(ours, theirs)
    for b, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), max_new_tokens=50)
        assert torch.equal(ours[b, ids.size(1) :], alone[0, len(row) :]), b


def test_repetition_penalty_matches_transformers(model, hf_model):
    ids = prompt(1, 6, seed=3)
    ours = generate(model, ids, max_new_tokens=30, repetition_penalty=1.8)
    theirs = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=30,
        do_sample=False,
        repetition_penalty=1.8,
        eos_token_id=None,
        pad_token_id=0,
    )

    def penalty(seen: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return apply_repetition_penalty(logits, seen, 1.8)

    assert greedy_margin(model, ours.tolist(), [6], penalty) > GREEDY_MARGIN  # other kernels, same tokens: no near tie
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, generate(model, ids, max_new_tokens=30))  # the penalty changed something


def test_sampling_in_generate_is_seeded(model):
    ids = prompt(2, 4, seed=4)
    a = generate(model, ids, max_new_tokens=20, do_sample=True, seed=7)
    b = generate(model, ids, max_new_tokens=20, do_sample=True, seed=7)
    c = generate(model, ids, max_new_tokens=20, do_sample=True, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        generate(model, ids, max_new_tokens=20, do_sample=True, generator=g1),
        generate(model, ids, max_new_tokens=20, do_sample=True, generator=g2),
    )
    # top_k=1 sampling and temperature 0 are greedy
    greedy = generate(model, ids, max_new_tokens=20)
    assert torch.equal(generate(model, ids, max_new_tokens=20, do_sample=True, top_k=1, seed=1), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=20, do_sample=True, temperature=0.0), greedy)
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, seed=7)
    assert torch.equal(generate(model, ids, generation_config=cfg), a)


def test_max_new_tokens_zero_and_streamer(model):
    ids = prompt(1, 4)
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)
    seen: list[torch.Tensor] = []
    out = generate(model, ids, max_new_tokens=6, streamer=seen.append)
    assert len(seen) == 6 and torch.equal(torch.stack(seen, 1), out[:, 4:])
    assert [t.tolist() for t in iter_generate(model, ids, max_new_tokens=6)] == [t.tolist() for t in seen]
    one_d = generate(model, ids[0], max_new_tokens=6)  # a 1-D prompt is one row
    assert torch.equal(one_d, out)


# ---------------------------------------------------------------------------------- EOS and stop strings
def test_eos_stops_a_row_and_pads_it(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    story = tok.encode(STORY)
    target = story[:12] + [eos] + story[12:]
    m = scripted_model(target, tok.vocab_size)
    # the script works: without EOS handling the model writes the target
    free = generate(m, torch.tensor([target[:1]]), max_new_tokens=len(target) - 1, eos_token_id=None)
    assert free[0].tolist() == target

    ids, mask = left_pad([target[:5], target[:3]], pad=pad)  # prompt content is irrelevant to the script
    out = generate(m, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=pad)
    # row 0 reaches EOS (target[12]) after 8 new tokens, row 1 after 10; then everything stops
    assert out.shape == (2, 5 + 10)
    assert out[0, 5:].tolist() == target[5:13] + [pad, pad]
    assert out[1, 5:].tolist() == target[3:13]
    # without a pad id, finished rows are padded with EOS
    out = generate(m, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos)
    assert out[0, 5:].tolist() == target[5:13] + [eos, eos]
    # several EOS ids: the first one met stops the row
    out = generate(m, torch.tensor([target[:1]]), max_new_tokens=30, eos_token_id=[target[4], eos])
    assert out[0].tolist() == target[:5]
    # the model config's EOS is the default
    m.config.eos_token_id = eos
    assert generate(m, torch.tensor([target[:1]]), max_new_tokens=30)[0].tolist() == target[:13]


def first_stop(tok: Tokenizer, new_ids: list[int], stop: list[str]) -> int:
    """How many new tokens it takes until the decoded new text first contains a stop string."""
    return next(j for j in range(1, len(new_ids) + 1) if any(s in tok.decode(new_ids[:j]) for s in stop))


def test_stop_strings_stop_generation(tok):
    story = tok.encode(STORY)
    m = scripted_model(story, tok.vocab_size)
    n = first_stop(tok, story[1:], ["END"])
    assert "END" not in tok.decode(story[1:n]) and "END" not in tok.decode(story[n : n + 1])  # spans tokens
    out = generate(m, torch.tensor([story[:1]]), max_new_tokens=40, stop=["END"], tokenizer=tok)
    assert out[0].tolist() == story[: n + 1]
    assert tok.decode(out[0, 1:]).endswith("END")
    # the earliest of several stop strings wins, and a plain string works too
    for stop in (["of", "ime"], "upon"):
        stops = [stop] if isinstance(stop, str) else stop
        out = generate(m, torch.tensor([story[:1]]), max_new_tokens=40, stop=stop, tokenizer=tok)
        assert out[0].tolist() == story[: first_stop(tok, story[1:], stops) + 1], stop
    assert tok.decode(out[0]) == "Once upon"
    with pytest.raises(ValueError, match="stop strings need the tokenizer"):
        generate(m, torch.tensor([story[:1]]), max_new_tokens=5, stop=["END"])


def test_stop_strings_in_a_batch(tok):
    story = tok.encode(STORY)
    m = scripted_model(story, tok.vocab_size)
    # row 1 starts past "upon", so only row 0 meets it; row 0 is then padded with pad_token_id
    ids, mask = left_pad([story[:2], story[:7]], pad=1)
    out = generate(m, ids, attention_mask=mask, max_new_tokens=12, stop=["upon"], tokenizer=tok, pad_token_id=1)
    n = first_stop(tok, story[2:], ["upon"])
    assert out[0, 7:].tolist() == story[2 : 2 + n] + [1] * (12 - n)
    assert out[1, 7:].tolist() == story[7:19]


# ---------------------------------------------------------------------------------- options and limits
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_k": -1}, r"top_k must be >= 0 \(0 or None = off\), got -1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
        ({"temperature": -0.5}, r"temperature must be >= 0 \(0 = greedy\), got -0.5"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
    ],
)
def test_invalid_options(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompt(1, 3), do_sample=True, **kwargs)


def test_unknown_option(model):
    with pytest.raises(TypeError, match="generate\\(\\) got an unknown option 'top_a'"):
        generate(model, prompt(1, 3), top_a=0.1)


def test_prompt_limits():
    m = random_model(ctx=16)
    with pytest.raises(ValueError, match="the prompt has 17 tokens but the model's context is 16"):
        generate(m, prompt(1, 17), max_new_tokens=1)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1)
    with pytest.warns(
        UserWarning, match="max_new_tokens=20 would run past the model's context of 16 tokens; generating 6 tokens"
    ):
        out = generate(m, prompt(1, 10), max_new_tokens=20)
    assert out.shape == (1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly filling the context is fine
        assert generate(m, prompt(1, 10), max_new_tokens=6).shape == (1, 16)
    with pytest.warns(UserWarning, match="generating 0 tokens"):
        assert torch.equal(generate(m, prompt(1, 16), max_new_tokens=3), prompt(1, 16))


# ---------------------------------------------------------------------------------- streaming
def test_incremental_decoder_never_splits_a_character(tok):
    ids = tok.encode(CJK)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial UTF-8 characters
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == CJK
    assert sum(1 for p in pieces if p) > 3  # text arrives as it is complete, not all at the end


def test_incremental_decoder_gives_decodes_text_by_bytes_and_by_window(tok):
    """Random ids (characters broken everywhere, special tokens among them): the pieces and the flush join into
    `decode`'s text, through the byte table (byte-level BPE) and through the decoding window (other tokenizers,
    here WordPiece), special tokens skipped or kept."""
    import random

    rng = random.Random(1)
    wordpiece = Tokenizer.train_wordpiece(iterator=["中文 words", "more 世界 words"] * 3, vocab_size=60)
    for tokenizer, by_bytes in ((tok, True), (wordpiece, False)):
        for skip in (True, False):
            for _ in range(200):
                ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 16))]
                decoder = IncrementalDecoder(tokenizer, skip)
                assert (decoder._bytes is not None) == by_bytes
                text = "".join(decoder.push(i) for i in ids) + decoder.flush()
                assert text == tokenizer.decode(ids, skip_special_tokens=skip), ids
    decoder = IncrementalDecoder(tok)
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is out of range"):
        decoder.push(tok.vocab_size)


def test_incremental_decoder_skips_special_tokens_and_flushes(tok):
    eos = tok.eos_token_id
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode("hello") + [eos] + tok.encode(" world")]
    assert "".join(pieces) + decoder.flush() == "hello world"
    decoder = IncrementalDecoder(tok)
    partial = tok.encode("😀")[:-1]  # an unfinished character is held back...
    assert "".join(decoder.push(i) for i in partial) == ""
    assert decoder.flush() == "\ufffd"  # ...and only shows up as U+FFFD on flush


def test_stream_pieces_equal_the_decoded_generation(tok):
    target = tok.encode("Q") + tok.encode(CJK) + [tok.eos_token_id]
    m = scripted_model(target, tok.vocab_size)
    pieces = list(stream(m, tok, "Q", max_new_tokens=40, eos_token_id=tok.eos_token_id))
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == CJK
    ids = generate(m, torch.tensor([tok.encode("Q")]), max_new_tokens=40, eos_token_id=tok.eos_token_id)
    assert "".join(pieces) == tok.decode(ids[0, 1:], skip_special_tokens=True)
    assert len(pieces) > 3


def test_stream_stops_before_the_stop_string(tok):
    story = tok.encode(STORY)
    m = scripted_model(story, tok.vocab_size)
    prompt_text = tok.decode(story[:1])
    assert tok.encode(prompt_text) == story[:1]
    new_text = STORY[len(prompt_text) :]  # what the script writes after the prompt
    pieces = list(stream(m, tok, prompt_text, max_new_tokens=len(story) - 1))
    assert "".join(pieces) == new_text and len(pieces) > 3
    for stop, cut in (["END"], "END"), (["time"], "time"), (["of", ": E"], ": E"):
        pieces = list(stream(m, tok, prompt_text, max_new_tokens=len(story) - 1, stop=stop))
        assert "".join(pieces) == new_text[: new_text.index(cut)], stop
    with pytest.raises(ValueError, match="the prompt is empty"):
        list(stream(m, tok, "", max_new_tokens=3))


def test_one_dimensional_prompt_and_mask(model):
    ids = torch.tensor([0, 0, 5, 6, 7])
    mask = torch.tensor([0, 0, 1, 1, 1])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=3)
    alone = generate(model, ids[2:], max_new_tokens=3)
    assert out.shape == (1, 8)
    assert greedy_margin(model, alone.tolist(), [3]) > GREEDY_MARGIN  # padded or not, the same tokens: no near tie
    assert torch.equal(out[0, 2:], alone[0])


def test_generated_ids_are_ordinary_tensors(model):
    out = model.generate(prompt(), max_new_tokens=4)
    out[0, 0] = 1  # editable in place (no inference-mode tensor)
    loss = model(out, labels=out).loss
    loss.backward()  # usable for training on generated text
    assert torch.isfinite(loss)
    model.zero_grad(set_to_none=True)


def test_stream_does_not_leak_inference_mode_to_the_caller(tok):
    model = GPTForCausalLM(GPTConfig(vocab_size=len(tok), n_positions=32, n_layer=1, n_head=2, n_embd=16)).eval()
    for _ in stream(model, tok, "hello", max_new_tokens=3):
        assert not torch.is_inference_mode_enabled()
        assert torch.is_grad_enabled()


def test_logits_processors_see_the_ids_so_far_and_steer_the_choice(model):
    prompt = torch.tensor([[5, 6, 7]])
    free = model.generate(prompt, max_new_tokens=6)
    banned = int(free[0, 3])  # the first greedy token
    seen: list[int] = []

    def ban(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen.append(ids.shape[1])
        return logits.index_fill(-1, torch.tensor([banned]), float("-inf"))

    out = model.generate(prompt, max_new_tokens=6, logits_processors=[ban])
    assert banned not in out[0, 3:].tolist()
    assert seen == [3, 4, 5, 6, 7, 8]  # called once per step with the ids so far
    assert torch.equal(out[0, :3], prompt[0])
