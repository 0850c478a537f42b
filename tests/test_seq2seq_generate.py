"""Generation for encoder-decoders (model.generate of lmforge/models/seq2seq.py, through lmforge.generation): token
for token against transformers' generate on tiny random MarianMTModel and BartForConditionalGeneration saved by
transformers and loaded by lmforge, greedy and beam search with each option, one source and a batch of sources of
different lengths; cached and uncached decoding agree; seeded sampling repeats; bad options get clear errors.

Exact token equality can flip where two candidates are nearly tied (see helpers.GREEDY_MARGIN): each comparison
first checks that every ranked choice is clear by that margin (a property of the seeded model and sources)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import GREEDY_MARGIN
from test_beam_search import BeamGaps
from test_seq2seq_model import hf_bart, hf_marian

from lmforge import AutoModelForSeq2SeqLM
from lmforge.generation import iter_generate

NEW = 10
FAMILIES = {"marian": hf_marian, "bart": hf_bart}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request, tmp_path_factory) -> tuple:
    """(lmforge's model, transformers' model) with the same weights, spread out so scores are clearly apart."""
    return model_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def bart_models(tmp_path_factory) -> tuple:
    """The BART pair alone: the tiny random Marian repeats its first token, so any EOS would end every row at
    the same step and the early-finish paths would not be exercised with it."""
    return model_pair("bart", tmp_path_factory)


def model_pair(family: str, tmp_path_factory) -> tuple:
    hf = FAMILIES[family]()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:  # not Marian's fixed sinusoid table (recomputed, not saved)
                p.add_(0.5 * torch.randn_like(p))
        hf.model.shared.weight.mul_(2.0)  # larger logits (the head is tied): fewer near ties among the beams
    d: Path = tmp_path_factory.mktemp(f"gen_{family}")
    hf.save_pretrained(d)
    return AutoModelForSeq2SeqLM.from_pretrained(d).eval(), hf


def sources(pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One source, and a right-padded batch of three sources of 7, 3 and 5 tokens: (ids, attention_mask)."""
    single = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    ids = torch.tensor([r + [pad] * (7 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (7 - len(r)) for r in rows])
    return [(single, torch.ones_like(single)), (ids, mask)]


class GreedyGap:
    """A logits processor that changes nothing: it records the smallest gap between the best two logits of a row."""

    def __init__(self) -> None:
        self.gap = math.inf

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        top2 = logits.double().topk(2, dim=-1).values
        finite = top2[:, 1] > -1e8  # a row with one allowed token (forced EOS) has no tie
        if finite.any():
            self.gap = min(self.gap, float((top2[finite, 0] - top2[finite, 1]).min()))
        return logits


class SourceBeamGaps(BeamGaps):
    """BeamGaps for beams that all start from the decoder start token: each beam is told apart by its source."""

    def __call__(self, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        source = (torch.arange(ids.size(0)) // self.K)[:, None]  # (N, 1)
        return super().__call__(torch.cat([source, ids], dim=1), logp)


def frequent_eos(model, hf) -> list[int]:
    """Two tokens the first source's best beam writes early, as EOS: so that hypotheses end at different steps."""
    ids, mask = sources(hf.config.pad_token_id)[0]
    out = model.generate(ids, attention_mask=mask, num_beams=4, max_new_tokens=NEW)
    return [int(out[0, 3]), int(out[0, 6])]


def assert_same_as_transformers(model, hf, ids, mask, **options) -> torch.Tensor:
    options = {"max_new_tokens": NEW, **options}
    K = options.get("num_beams", 1)
    eos = options.get("eos_token_id", hf.config.eos_token_id)
    gaps = GreedyGap() if K == 1 else SourceBeamGaps(K, len(eos) if isinstance(eos, list) else 1)
    ours = model.generate(ids, attention_mask=mask, logits_processors=[gaps], **options)
    assert gaps.gap > GREEDY_MARGIN, f"a near tie ({gaps.gap:.2e}): the comparison could flip on another machine"
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, **options)
    assert torch.equal(ours, theirs), (options, ours, theirs)
    return ours


OPTIONS = [
    {},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 4},
    {"repetition_penalty": 1.5},
    {"num_beams": 2},
    {"num_beams": 4},
    {"num_beams": 4, "length_penalty": 0.5},
    {"num_beams": 4, "length_penalty": 2.0},
    {"num_beams": 4, "early_stopping": True},
    {"num_beams": 4, "early_stopping": False},
    {"num_beams": 4, "early_stopping": "never"},
    {"num_beams": 4, "early_stopping": "never", "length_penalty": 2.0},
    {"num_beams": 4, "no_repeat_ngram_size": 2},
    {"num_beams": 4, "min_new_tokens": 4},
    {"num_beams": 4, "num_return_sequences": 2},
]


def _id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "greedy"


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_matches_transformers(models, options):
    model, hf = models
    R = options.get("num_return_sequences", 1)
    for ids, mask in sources(hf.config.pad_token_id):
        out = assert_same_as_transformers(model, hf, ids, mask, **options)
        assert out.size(0) == ids.size(0) * R and out.size(1) <= 1 + NEW
        assert (out[:, 0] == hf.config.decoder_start_token_id).all()


@pytest.mark.parametrize("options", OPTIONS, ids=_id)
def test_matches_transformers_with_frequent_eos(bart_models, options):
    model, hf = bart_models
    eos = frequent_eos(model, hf)
    padded = 0
    for ids, mask in sources(hf.config.pad_token_id):
        out = assert_same_as_transformers(model, hf, ids, mask, eos_token_id=eos, **options)
        padded += int((out[:, 1:] == hf.config.pad_token_id).sum())
    # some rows finished early and were padded (unless length_penalty > 1 prefers long hypotheses)
    assert padded or options.get("length_penalty", 1.0) > 1


def test_forced_eos_at_the_limit(models):
    model, hf = models
    assert model.config.forced_eos_token_id == hf.config.forced_eos_token_id == hf.config.eos_token_id
    for ids, mask in sources(hf.config.pad_token_id):
        for num_beams in (1, 4):
            out = assert_same_as_transformers(model, hf, ids, mask, num_beams=num_beams, max_new_tokens=4)
            assert out.size(1) == 5 and (out[:, -1] == hf.config.eos_token_id).any()


@pytest.mark.parametrize("options", [{}, {"num_beams": 4, "num_return_sequences": 3}], ids=_id)
def test_cached_and_uncached_agree(models, options):
    model, hf = models
    eos = frequent_eos(model, hf)
    for ids, mask in sources(hf.config.pad_token_id):
        kw = {"max_new_tokens": NEW, "eos_token_id": eos, **options}
        assert torch.equal(model.generate(ids, mask, **kw), model.generate(ids, mask, use_cache=False, **kw))


def test_encoder_runs_once_and_cross_attention_is_projected_once(models):
    model, hf = models
    ids, mask = sources(hf.config.pad_token_id)[1]
    calls = {"encoder": 0, "kv": 0}
    hook = model.model.decoder.layers[0].cross_attn.kv.register_forward_hook(
        lambda *_: calls.__setitem__("kv", calls["kv"] + 1)
    )
    encode = model.encode

    def counting_encode(*args, **kwargs):
        calls["encoder"] += 1
        return encode(*args, **kwargs)

    model.encode = counting_encode
    try:
        for options in ({}, {"num_beams": 4}):
            calls.update(encoder=0, kv=0)
            model.generate(ids, mask, max_new_tokens=NEW, **options)
            assert calls == {"encoder": 1, "kv": 1}, options
    finally:
        del model.encode
        hook.remove()


def test_seeded_sampling_repeats_and_streams(models):
    model, hf = models
    ids, mask = sources(hf.config.pad_token_id)[1]
    kw = {"max_new_tokens": NEW, "do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 1.3}
    first = model.generate(ids, mask, seed=3, **kw)
    assert torch.equal(first, model.generate(ids, mask, seed=3, **kw))
    assert not torch.equal(first, model.generate(ids, mask, seed=4, **kw))
    with torch.no_grad():
        streamed = torch.stack(list(iter_generate(model, ids, mask, seed=3, **kw)), dim=1)
    assert torch.equal(first[:, 1 : 1 + streamed.size(1)], streamed)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_beams": 2, "do_sample": True}, "num_beams > 1 needs do_sample=False"),
        ({"num_beams": 2, "num_return_sequences": 3}, r"num_return_sequences must be an integer in \[1, num_beams=2\]"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping must be True, False or 'never'"),
    ],
)
def test_bad_options(models, options, message):
    model, _ = models
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[5, 6]]), **options)


def test_bad_sources(models):
    model, _ = models
    with pytest.raises(ValueError, match="the source is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the model's 32 positions"):
        model.generate(torch.full((1, 40), 5))
