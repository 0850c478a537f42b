"""lmforge.interpret: attention maps against transformers' (test-only oracle), token labels from
offsets (Chinese included), the PNG plots (size, fonts, no glyph warnings, no pyplot), gradient x
input checked against a gradient taken by hand, errors, and the docs example."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import pytest
import torch
import transformers
from matplotlib.image import imread

from lmforge import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPTConfig,
    GPTForCausalLM,
    GPTForSequenceClassification,
    Tokenizer,
    interpret,
)
from lmforge.interpret import (
    attention_maps,
    cjk_font,
    plot_attention,
    plot_attributions,
    token_attributions,
    token_labels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POEM = "床前明月光"
ENGLISH = ["the cat sat on the mat", "a dog ran in the park", "the quick brown fox jumps over the lazy dog"] * 10
BERT_SIZES = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
GPT_SIZES = dict(n_positions=32, n_layer=2, n_head=2, n_embd=16)


def spread(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Weights far from the N(0, 0.02) init, so attention is far from uniform and gradients clear."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def glyph_warnings(records) -> list[str]:
    return [str(w.message) for w in records if re.search(r"Glyph \d+ .*missing from font", str(w.message))]


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) in pixels."""
    return imread(path).shape[:2]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """Byte-level BPE that never saw Chinese: a character becomes three byte pieces."""
    return Tokenizer.train_bpe(iterator=ENGLISH, vocab_size=300)


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return Tokenizer.train_wordpiece(
        iterator=ENGLISH + ["床前明月光，疑是地上霜。"] * 5, vocab_size=120, min_frequency=1
    )


@pytest.fixture(scope="module")
def gpt(bpe) -> GPTForCausalLM:
    torch.manual_seed(0)
    return spread(GPTForCausalLM(GPTConfig(vocab_size=len(bpe), **GPT_SIZES)))


@pytest.fixture(scope="module")
def bert(wordpiece) -> BertModel:
    torch.manual_seed(0)
    return spread(BertModel(BertConfig(vocab_size=len(wordpiece), **BERT_SIZES)))


@pytest.fixture(scope="module")
def bert_classifier(wordpiece) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(wordpiece), num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, **BERT_SIZES)
    return spread(BertForSequenceClassification(config), scale=0.1)


@pytest.fixture(scope="module")
def gpt_classifier(bpe) -> GPTForSequenceClassification:
    torch.manual_seed(0)
    return spread(GPTForSequenceClassification(GPTConfig(vocab_size=len(bpe), num_labels=2, **GPT_SIZES)), scale=0.1)


# ---------------------------------------------------------------------------------------------- token labels
def test_token_labels_english_bpe(bpe):
    text = "the cat sat\n on  the mat"
    labels = token_labels(bpe, text)
    assert len(labels) == len(bpe(text)["input_ids"])
    assert labels[:3] == ["the", "cat", "sat"]  # "Ġcat" reads "cat"
    assert "↵" in labels and "␣" in labels  # whitespace-only tokens stay visible
    assert "".join(labels).replace("↵", "").replace("␣", "") == text.replace(" ", "").replace("\n", "")


def test_token_labels_chinese_are_the_characters(bpe, wordpiece):
    # byte-level BPE: each character is three byte pieces, each labelled with the character
    ids = bpe(POEM)["input_ids"]
    labels = token_labels(bpe, POEM)
    assert len(labels) == len(ids) == 15
    assert labels == [ch for ch in POEM for _ in range(3)]
    # WordPiece: one token per character, special tokens as themselves
    assert token_labels(wordpiece, POEM) == ["[CLS]", *POEM, "[SEP]"]


def test_token_labels_unknown_and_pairs(wordpiece):
    labels = token_labels(wordpiece, "the 猫", text_pair="a dog")
    assert labels == ["[CLS]", "the", "[UNK]", "[SEP]", "a", "dog", "[SEP]"]  # pair offsets index text_pair


# ---------------------------------------------------------------------------------------------- attention maps
def test_gpt_attention_matches_transformers(tmp_path, gpt, bpe):
    text = "the quick brown fox jumps over the lazy dog"
    tokens, maps = attention_maps(gpt, bpe, text)
    ids = bpe(text, return_tensors="pt")["input_ids"]
    T = ids.size(1)
    assert tokens == token_labels(bpe, text) and len(tokens) == T
    assert maps.shape == (2, 2, T, T) and maps.dtype == torch.float32
    gpt.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch.stack([a[0] for a in hf(ids, output_attentions=True).attentions])  # (L, H, T, T)
    assert (maps - expected).abs().max() <= 1e-5
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, T))
    assert torch.all(maps.triu(1) == 0)  # causal: no query sees a later key
    assert maps.std() > 0.05  # the spread weights make the maps far from uniform: a real comparison


def test_bert_attention_matches_transformers(tmp_path, bert, wordpiece):
    text = "the lazy dog sat on the mat"
    tokens, maps = attention_maps(bert, wordpiece, text)
    enc = wordpiece(text, return_tensors="pt")
    T = enc["input_ids"].size(1)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and maps.shape == (2, 2, T, T)
    bert.save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch.stack([a[0] for a in hf(**enc, output_attentions=True).attentions])
    assert (maps - expected).abs().max() <= 1e-5
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, T))
    assert maps.triu(1).sum() > 0.1  # bidirectional: later keys get weight


def test_layer_and_head_selection(gpt, bpe):
    _, full = attention_maps(gpt, bpe, "the cat sat")
    _, chosen = attention_maps(gpt, bpe, "the cat sat", layers=[1, 0], heads=1)
    torch.testing.assert_close(chosen, full[[1, 0]][:, [1]])
    _, last = attention_maps(gpt, bpe, "the cat sat", layers=-1, heads=[-2])
    torch.testing.assert_close(last, full[[1]][:, [0]])


def test_attention_restores_training_mode_and_takes_no_grad(bpe):
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=len(bpe), dropout=0.5, **GPT_SIZES)).train()
    _, a = attention_maps(model, bpe, "the cat sat")
    _, b = attention_maps(model, bpe, "the cat sat")
    torch.testing.assert_close(a, b)  # eval mode inside: no dropout
    assert model.training and not a.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[2]), r"layer 2 is out of range.*2 layers.*0\.\.1"),
        (dict(layers=-3), r"layer -3 is out of range.*0\.\.1"),
        (dict(heads=[0, 5]), r"head 5 is out of range.*2 heads.*0\.\.1"),
        (dict(layers=[]), r"layers is empty"),
    ],
)
def test_index_errors(gpt, bpe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_maps(gpt, bpe, "the cat", **kwargs)


def test_text_errors(gpt, bpe):
    for text in ("", "   \n"):
        with pytest.raises(ValueError, match="text is empty"):
            attention_maps(gpt, bpe, text)
    with pytest.raises(TypeError, match="text must be a str"):
        attention_maps(gpt, bpe, ["the cat"])
    with pytest.raises(ValueError, match="at most 32"):
        attention_maps(gpt, bpe, "the cat " * 40)


def test_model_without_attentions(bpe):
    class NoAttentions(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(len(bpe), 4)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    class NoneAttentions(NoAttentions):
        def forward(self, input_ids, attention_mask=None, output_attentions=False):
            return GPTForCausalLM  # anything without .attentions

    with pytest.raises(TypeError, match="does not take output_attentions"):
        attention_maps(NoAttentions(), bpe, "the cat")
    with pytest.raises(TypeError, match="returned no attention weights"):
        attention_maps(NoneAttentions(), bpe, "the cat")


# ---------------------------------------------------------------------------------------------- plots
def test_plot_attention_png_grows_with_layers(tmp_path, gpt, bpe):
    one = plot_attention(gpt, bpe, "the cat sat on the mat", tmp_path / "one.png", layers=[0])
    two = plot_attention(gpt, bpe, "the cat sat on the mat", str(tmp_path / "two.png"))
    avg = plot_attention(gpt, bpe, "the cat sat on the mat", tmp_path / "sub" / "avg.png", average_heads=True)
    assert one == tmp_path / "one.png" and isinstance(two, Path) and avg.is_file()
    for p in (one, two, avg):
        assert p.read_bytes()[:8] == PNG_MAGIC
    (h1, w1), (h2, w2), (ha, wa) = png_size(one), png_size(two), png_size(avg)
    assert h2 > 1.6 * h1 and w2 == w1  # a row per layer, a column per head
    assert ha == h2 and wa < w2  # averaged: one column
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
    before = one.read_bytes()
    plot_attention(gpt, bpe, "the cat", one, layers=[0])  # replaces the file
    assert one.read_bytes() != before


def test_plot_attention_chinese_with_cjk_font(tmp_path, gpt, bpe, wordpiece, bert):
    # not imported here (importing zhplot changes rcParams); a declared test dependency, so missing it fails
    assert importlib.util.find_spec("zhplot") is not None, "the test extra installs zhplot for its CJK font"
    assert cjk_font() is not None and cjk_font().is_file()
    family = list(matplotlib.rcParams["font.family"])
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        gpt_png = plot_attention(gpt, bpe, POEM, tmp_path / "gpt.png")
        bert_png = plot_attention(bert, wordpiece, POEM, tmp_path / "bert.png", heads=0)
    assert glyph_warnings(records) == [] and not [w for w in records if "zhplot" in str(w.message)]
    assert gpt_png.read_bytes()[:8] == PNG_MAGIC and bert_png.read_bytes()[:8] == PNG_MAGIC
    assert list(matplotlib.rcParams["font.family"]) == family  # the user's settings are left alone
    assert "zhplot" not in sys.modules  # its font file is read, the package (which sets rcParams) is not imported


def test_plot_without_cjk_font_warns_once(tmp_path, gpt, bpe, monkeypatch):
    monkeypatch.setattr(interpret, "cjk_font", lambda: None)
    monkeypatch.setattr(interpret, "_warned_no_cjk_font", False)
    with pytest.warns(UserWarning, match=r"pip install zhplot.*Noto Sans CJK") as records:
        plot_attention(gpt, bpe, POEM, tmp_path / "a.png", layers=0)
    assert glyph_warnings(records) == []  # one explanation instead of one warning per glyph
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        plot_attention(gpt, bpe, POEM, tmp_path / "b.png", layers=0)
    assert again == []
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC and (tmp_path / "b.png").is_file()


def test_plot_english_needs_no_cjk_font(tmp_path, gpt, bpe, monkeypatch):
    monkeypatch.setattr(interpret, "cjk_font", lambda: pytest.fail("looked for a CJK font for English text"))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        plot_attention(gpt, bpe, "the cat sat", tmp_path / "en.png")
    assert records == []


def test_plot_path_errors(tmp_path, gpt, bpe):
    with pytest.raises(ValueError, match=r"\.png"):
        plot_attention(gpt, bpe, "the cat", tmp_path / "map.jpg")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_attributions(gpt, bpe, "the cat", tmp_path / "map")


def test_import_is_light_and_plots_never_load_pyplot(tmp_path):
    script = f"""
import sys
import lmforge.interpret
assert "matplotlib" not in sys.modules, "matplotlib imported at import time"
import torch
from lmforge import GPTConfig, GPTForCausalLM, Tokenizer
from lmforge.interpret import plot_attention
tok = Tokenizer.train_bpe(iterator=["the cat sat"] * 5, vocab_size=270)
model = GPTForCausalLM(GPTConfig(vocab_size=len(tok), n_positions=16, n_layer=1, n_head=1, n_embd=8))
plot_attention(model, tok, "the cat", {str(tmp_path / "x.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------- attributions
def hand_gradient_x_input(model, tokenizer, text: str, target: int) -> torch.Tensor:
    """(T,) scores from the gradient of the logit with respect to the embedding *matrix*: with every
    token id distinct, row ids[t] of that gradient is exactly the gradient at position t."""
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"][0]
    assert len(set(ids.tolist())) == len(ids), "the check needs distinct token ids"
    weight = model.get_input_embeddings().weight
    logit = model(**enc).logits[0, target]
    (grad,) = torch.autograd.grad(logit, weight)  # (V, C)
    return (grad[ids] * weight[ids]).sum(-1).detach()  # (T,)


@pytest.mark.parametrize("which", ["bert", "gpt"])
def test_token_attributions_match_hand_computation(which, bert_classifier, gpt_classifier, wordpiece, bpe):
    model, tok = (bert_classifier, wordpiece) if which == "bert" else (gpt_classifier, bpe)
    text = "the quick brown fox jumps"
    with torch.no_grad():
        predicted = int(model(**tok(text, return_tensors="pt")).logits.argmax())
    scores = token_attributions(model, tok, text)  # default target: the predicted class
    assert [t for t, _ in scores] == token_labels(tok, text)
    assert len(scores) == len(tok(text)["input_ids"])
    got = torch.tensor([s for _, s in scores])
    expected = hand_gradient_x_input(model, tok, text, predicted)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert abs(got.sum() - expected.sum()) <= 1e-4 * max(1.0, float(expected.abs().sum()))
    assert got.abs().max() > 1e-3  # not a vacuous comparison
    other = (predicted + 1) % model.num_labels
    torch.testing.assert_close(
        torch.tensor([s for _, s in token_attributions(model, tok, text, target=other)]),
        hand_gradient_x_input(model, tok, text, other),
        rtol=1e-4,
        atol=1e-6,
    )
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched


def test_token_attributions_target_names_mode_and_errors(bert_classifier, wordpiece, gpt, bpe, bert):
    by_name = token_attributions(bert_classifier, wordpiece, "the cat", target="pos")
    assert by_name == token_attributions(bert_classifier, wordpiece, "the cat", target=2)
    bert_classifier.train()
    try:
        again = token_attributions(bert_classifier, wordpiece, "the cat", target=2)
        assert bert_classifier.training  # put back in the mode it was in
    finally:
        bert_classifier.eval()
    assert again == by_name
    with pytest.raises(ValueError, match=r"target 3 is out of range.*0\.\.2"):
        token_attributions(bert_classifier, wordpiece, "the cat", target=3)
    with pytest.raises(ValueError, match="'happy' is not a label.*'neg', 'neu', 'pos'"):
        token_attributions(bert_classifier, wordpiece, "the cat", target="happy")
    with pytest.raises(TypeError, match="not a sequence classifier.*logits of shape"):
        token_attributions(gpt, bpe, "the cat")  # a causal LM
    with pytest.raises(TypeError, match="not a sequence classifier.*no logits"):
        token_attributions(bert, wordpiece, "the cat")  # a bare encoder
    with pytest.raises(ValueError, match="text is empty"):
        token_attributions(bert_classifier, wordpiece, " ")


def test_token_attributions_frozen_parameters(bert_classifier, wordpiece):
    expected = token_attributions(bert_classifier, wordpiece, "the dog ran", target=0)
    for p in bert_classifier.parameters():
        p.requires_grad_(False)
    try:
        assert token_attributions(bert_classifier, wordpiece, "the dog ran", target=0) == expected
    finally:
        for p in bert_classifier.parameters():
            p.requires_grad_(True)


def test_plot_attributions(tmp_path, bert_classifier, wordpiece):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        short = plot_attributions(bert_classifier, wordpiece, POEM, tmp_path / "short.png")
        long = plot_attributions(
            bert_classifier, wordpiece, "the cat sat on the mat " * 3 + POEM, tmp_path / "long.png", target="neg"
        )
    if interpret.cjk_font() is not None:
        assert glyph_warnings(records) == []
    assert short.read_bytes()[:8] == PNG_MAGIC
    assert png_size(long)[0] > png_size(short)[0]  # a bar per token


# ---------------------------------------------------------------------------------------------- docs
def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "interpretability.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 2  # self-attention and attributions; cross-attention (tests/test_cross_attention.py)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/interpretability.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([2, 2, 9, 9])" in out and "['[CLS]', '床', '前', '明', '月', '光', '[SEP]']" in out
    assert "['the', 'moon', 'is', 'bright', '</s>']" in out
    for name in ("gpt_attention.png", "bert_attributions.png", "bert_attention.png", "cross_attention.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert "lmforge attention MODEL" in doc


def test_attributions_for_a_regression_head(tmp_path, wordpiece):
    torch.manual_seed(0)
    model = spread(BertForSequenceClassification(BertConfig(vocab_size=len(wordpiece), num_labels=1, **BERT_SIZES)))
    scores = token_attributions(model, wordpiece, "the cat sat")  # the one output is the target
    assert [t for t, _ in scores] == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    assert plot_attributions(model, wordpiece, "the cat sat", tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
