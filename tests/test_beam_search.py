"""Tests for beam search (lmforge.generation.beam_search through model.generate(num_beams=...)): token for token
against transformers' generate on a tiny random GPT-2, for each option, one prompt and a left-padded batch of
prompts of different lengths; the n-gram rule by hand; and the errors for options that do not go together.

Exact token equality between two implementations can flip where two candidate scores are nearly equal (float sums
in another order, see helpers.GREEDY_MARGIN): every comparison first checks, with `BeamGaps`, that the scores each
step ranks are at least GREEDY_MARGIN apart (a property of the seeded model and prompts, the same on any machine)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GREEDY_MARGIN
from transformers import GPT2LMHeadModel  # test-only oracle

from lmforge.config import GPTConfig
from lmforge.generation import GenerationConfig, ban_repeated_ngrams, generate, iter_generate
from lmforge.models.gpt import GPTForCausalLM

V = 101
PAD = 1  # transformers pads finished beams with pad_token_id unless it is 0 (then with the first EOS): not 0 here
NEW = 12


@pytest.fixture(scope="module")
def model() -> GPTForCausalLM:
    torch.manual_seed(0)
    m = GPTForCausalLM(GPTConfig(vocab_size=V, n_positions=64, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():  # spread the logits out, so the beams' scores are clearly apart
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, model) -> GPT2LMHeadModel:
    d = tmp_path_factory.mktemp("beam_hf")
    model.save_pretrained(d)
    return GPT2LMHeadModel.from_pretrained(d).eval()


def prompts() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One prompt, and a left-padded batch of three prompts of 6, 2 and 4 tokens: (ids, attention_mask)."""
    single = torch.randint(2, V, (1, 6), generator=torch.Generator().manual_seed(1))
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids = torch.tensor([[PAD] * (6 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (6 - len(r)) + [1] * len(r) for r in rows])
    return [(single, torch.ones_like(single)), (ids, mask)]


class BeamGaps:
    """A logits processor that changes nothing: it records the smallest gap between the accumulated scores each
    step ranks (the kept candidates and the first one left out), for each prompt's beams."""

    def __init__(self, num_beams: int, n_eos: int) -> None:
        self.K, self.n_cand = num_beams, max(2, 1 + n_eos) * num_beams
        self.scores: dict[tuple[int, ...], float] = {}  # a beam's ids -> its accumulated log-prob
        self.gap = math.inf

    def __call__(self, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        rows = [tuple(r) for r in ids.tolist()]
        if self.scores:
            base = torch.tensor([self.scores[r] for r in rows])
        else:  # the first step: a prompt's K rows are one beam
            base = torch.tensor([0.0 if i % self.K == 0 else -math.inf for i in range(len(rows))])
        total = (base[:, None] + logp.double()).view(-1, self.K * logp.size(-1))  # (B, K * V)
        top, flat = total.topk(self.n_cand + 1, dim=-1)
        for b in range(total.size(0)):
            finite = top[b][top[b] > -1e8]
            if len(finite) > 1:
                self.gap = min(self.gap, float((finite[:-1] - finite[1:]).min()))
            for score, i in zip(top[b, : self.n_cand].tolist(), flat[b, : self.n_cand].tolist()):
                self.scores[rows[b * self.K + i // logp.size(-1)] + (i % logp.size(-1),)] = score
        return logp


def assert_same_as_transformers(model, hf_model, ids, mask, **options) -> torch.Tensor:
    options = {"max_new_tokens": NEW, "pad_token_id": PAD, **options}
    eos = options.get("eos_token_id")
    gaps = BeamGaps(options["num_beams"], len(eos) if isinstance(eos, list) else int(eos is not None))
    ours = model.generate(ids, attention_mask=mask, logits_processors=[gaps], **options)
    assert gaps.gap > GREEDY_MARGIN, f"a near tie ({gaps.gap:.2e}): the comparison could flip on another machine"
    theirs = hf_model.generate(ids, attention_mask=mask, do_sample=False, **options)
    assert torch.equal(ours, theirs), options
    return ours


def eos_ids(model) -> list[int]:
    """Two tokens the best beam of the first prompt writes early, as EOS: so that beams finish at different steps."""
    ids, mask = prompts()[0]
    out = generate(model, ids, attention_mask=mask, num_beams=4, max_new_tokens=NEW, pad_token_id=PAD)
    return [int(out[0, 8]), int(out[0, 11])]


OPTIONS = [
    {"num_beams": 2},
    {"num_beams": 4},
    {"num_beams": 4, "length_penalty": 0.5},
    {"num_beams": 4, "length_penalty": 2.0},
    {"num_beams": 4, "early_stopping": True},
    {"num_beams": 4, "early_stopping": False},
    {"num_beams": 4, "early_stopping": "never"},
    {"num_beams": 4, "early_stopping": "never", "length_penalty": 2.0},
    {"num_beams": 4, "no_repeat_ngram_size": 2},
    {"num_beams": 3, "repetition_penalty": 1.5},
    {"num_beams": 4, "num_return_sequences": 2},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_transformers_without_eos(model, hf_model, options):
    for ids, mask in prompts():
        out = assert_same_as_transformers(model, hf_model, ids, mask, **options)  # the model has no EOS
        assert out.shape == (ids.size(0) * options.get("num_return_sequences", 1), ids.size(1) + NEW)
        assert torch.equal(out[:: options.get("num_return_sequences", 1), :6], ids)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_transformers_with_eos(model, hf_model, options):
    eos = eos_ids(model)
    padded = 0
    for ids, mask in prompts():
        out = assert_same_as_transformers(model, hf_model, ids, mask, eos_token_id=eos, **options)
        padded += int((out[:, 6:] == PAD).sum())
    # some hypotheses finished early and were padded; except where "never" stopping and a length penalty > 1
    # let the search run on and prefer the long hypotheses
    assert padded or (options.get("early_stopping") == "never" and options.get("length_penalty", 1.0) > 1)


def test_early_stopping_rules_differ_and_match_transformers(model, hf_model):
    # all four final hypotheses returned: the stopping rule decides which finished ones are kept
    ids, mask = prompts()[1]
    outs = [
        assert_same_as_transformers(
            model, hf_model, ids, mask, num_beams=4, num_return_sequences=4, eos_token_id=eos_ids(model), **kw
        ).tolist()
        for kw in ({"early_stopping": True}, {"early_stopping": False}, {"early_stopping": "never"})
    ]
    assert outs[0] != outs[1] != outs[2] != outs[0]


def test_min_new_tokens_holds_back_eos(model, hf_model):
    eos = eos_ids(model)
    for ids, mask in prompts():
        short = generate(model, ids, attention_mask=mask, num_beams=4, max_new_tokens=NEW, eos_token_id=eos)
        out = assert_same_as_transformers(model, hf_model, ids, mask, num_beams=4, eos_token_id=eos, min_new_tokens=5)
        assert not torch.isin(out[:, 6:11], torch.tensor(eos)).any()
    assert short.size(1) < out.size(1) or not torch.equal(short, out)  # the rule changed the search


def test_cached_and_uncached_beam_search_agree(model):
    for ids, mask in prompts():
        kw = {"num_beams": 4, "max_new_tokens": NEW, "eos_token_id": eos_ids(model), "num_return_sequences": 3}
        assert torch.equal(generate(model, ids, mask, **kw), generate(model, ids, mask, use_cache=False, **kw))


def test_one_beam_per_prompt_is_greedy(model):
    ids, mask = prompts()[1]
    greedy = generate(model, ids, mask, max_new_tokens=NEW)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=NEW, num_beams=1), greedy)


def test_ban_repeated_ngrams_by_hand():
    logits = torch.zeros(2, 6)
    ids = torch.tensor([[1, 2, 3, 1, 2], [4, 5, 4, 5, 0]])
    out = ban_repeated_ngrams(logits, ids, 3)  # row 0 ends in (1, 2), once followed by 3; row 1 ends in (5, 0)
    assert out[0].isinf().tolist() == [False, False, False, True, False, False]
    assert not out[1].isinf().any()
    assert ban_repeated_ngrams(logits, ids[:, :1], 3) is logits  # too short for any n-gram


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_beams": 0}, "num_beams must be an integer >= 1"),
        ({"num_beams": 2, "do_sample": True}, "num_beams > 1 needs do_sample=False"),
        ({"num_beams": 2, "num_return_sequences": 3}, r"num_return_sequences must be an integer in \[1, num_beams=2\]"),
        ({"num_return_sequences": 2}, r"in \[1, num_beams=1\]"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping must be True, False or 'never'"),
        ({"num_beams": 2, "stop": ["x"]}, "stop strings are not supported with beam search"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
        ({"min_new_tokens": 1.5}, "min_new_tokens must be an integer >= 0"),
    ],
)
def test_bad_options(model, options, message):
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[5, 6]]), max_new_tokens=2, **options)
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**options).validate()


def test_beam_search_does_not_stream(model):
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="streamer"):
        generate(model, ids, num_beams=2, streamer=print)
    with pytest.raises(ValueError, match="use generate"):
        next(iter_generate(model, ids, num_beams=2))
