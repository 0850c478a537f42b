"""pipeline("translation" | "summarization" | "text2text-generation") and `lmforge translate` / `summarize`
(issue 12, items 5 and 6) on a tiny random MarianMTModel saved by transformers with a real Marian tokenizer
(SentencePiece models trained in the test): the texts equal transformers' generate + decode, greedy and beam 4;
batched equals alone; bad input gets clear errors.

transformers 5.24 ships no translation / summarization pipeline, so the reference is what its v4 pipeline did:
tokenizer(source) -> model.generate -> tokenizer.decode(skip_special_tokens=True). Exact token equality is only
asserted after checking that every ranked choice is clear by helpers.GREEDY_MARGIN (see test_seq2seq_generate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import GREEDY_MARGIN
from test_beam_search import BeamGaps
from test_tokenizer_marian import marian_dir  # noqa: F401 - the fixture

from lmforge import AutoModelForSeq2SeqLM, pipeline
from lmforge.data import load_translation_pairs
from lmforge.models.gpt import GPTConfig, GPTForCausalLM
from lmforge.pipelines import SummarizationPipeline, Text2TextGenerationPipeline, TranslationPipeline
from lmforge.tokenizer import Tokenizer

NEW = 12
SOURCES = [
    "In the beginning God created the heaven and the earth.",
    "And God said",
    "Then the king sent and called for the prophet, and he came unto him with all his servants.",
    "Amen.",
]


@pytest.fixture(scope="module")
def model_dir(marian_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The Marian tokenizer files + a tiny random MarianMTModel saved by transformers, weights spread out."""
    vocab = json.loads((marian_dir / "vocab.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        activation_function="swish", scale_embedding=True, pad_token_id=vocab["<pad>"],
        decoder_start_token_id=vocab["<pad>"], eos_token_id=0, forced_eos_token_id=0,
    )  # fmt: skip
    hf = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
        hf.model.shared.weight.mul_(2.0)  # larger logits: choices clearly apart
    directory = tmp_path_factory.mktemp("marian_model")
    for f in marian_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple:
    return transformers.MarianTokenizer.from_pretrained(str(model_dir)), transformers.MarianMTModel.from_pretrained(
        str(model_dir)
    ).eval()


def hf_texts(reference: tuple, sources: list[str], num_beams: int) -> list[str]:
    """transformers' generate + decode, one source at a time."""
    tok, hf = reference
    out = []
    for text in sources:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**enc, max_new_tokens=NEW, num_beams=num_beams, do_sample=False)
        out.append(tok.decode(ids[0], skip_special_tokens=True).strip())
    return out


def greedy_gap(model, tokenizer, text: str) -> float:
    """The smallest best-vs-runner-up logit gap over the greedy steps that translate `text` alone."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW)  # (1, 1 + n)
        logits = model(input_ids=ids, decoder_input_ids=out[:, :-1]).logits[0]  # (n, V)
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def test_greedy_texts_equal_transformers(model_dir: Path, reference: tuple) -> None:
    pipe = pipeline("translation", model=model_dir, batch_size=3)
    for text in SOURCES:
        assert greedy_gap(pipe.model, pipe.tokenizer, text) > GREEDY_MARGIN
    ours = pipe(SOURCES, max_new_tokens=NEW)
    assert [o[0]["translation_text"] for o in ours] == hf_texts(reference, SOURCES, num_beams=1)
    assert isinstance(pipe, TranslationPipeline) and pipe.task == "translation"
    alone = [pipe(text, max_new_tokens=NEW)[0]["translation_text"] for text in SOURCES]
    assert alone == [o[0]["translation_text"] for o in ours]  # batched (sorted, padded) = alone
    assert any(o[0]["translation_text"] for o in ours)  # not all empty: the comparison means something


def test_beam_search_texts_equal_transformers(model_dir: Path, reference: tuple) -> None:
    pipe = pipeline("text2text-generation", model=model_dir, batch_size=1)
    for text in SOURCES:
        gaps = BeamGaps(4, 1)
        pipe.model.generate(torch.tensor([pipe.tokenizer(text)["input_ids"]]), max_new_tokens=NEW, num_beams=4,
                            logits_processors=[gaps])  # fmt: skip
        assert gaps.gap > GREEDY_MARGIN
    ours = pipe(SOURCES, max_new_tokens=NEW, num_beams=4)
    assert [o[0]["generated_text"] for o in ours] == hf_texts(reference, SOURCES, num_beams=4)
    two = pipe(SOURCES[0], max_new_tokens=NEW, num_beams=4, num_return_sequences=2)
    assert len(two) == 2 and two[0] == ours[0][0]


def test_result_keys_and_token_ids(model_dir: Path) -> None:
    summarize = pipeline("summarization", model=model_dir)
    assert isinstance(summarize, SummarizationPipeline)
    (result,) = summarize("A long description of a package.", max_new_tokens=4)
    assert set(result) == {"summary_text"}
    (ids,) = summarize("A long description of a package.", max_new_tokens=4, return_tensors=True)
    direct = summarize.model.generate(torch.tensor([summarize.tokenizer("A long description of a package.")
                                                    ["input_ids"]]), max_new_tokens=4)[0, 1:].tolist()  # fmt: skip
    assert ids["summary_token_ids"] == (direct[: direct.index(0)] if 0 in direct else direct)  # up to </s> = 0
    assert isinstance(pipeline("text2text-generation", model=model_dir), Text2TextGenerationPipeline)


def test_bad_input_gets_clear_errors(model_dir: Path) -> None:
    pipe = pipeline("translation", model=model_dir)
    with pytest.raises(ValueError, match="source 1 is empty"):
        pipe(["Hello", ""])
    with pytest.raises(TypeError, match="source 0 is a int"):
        pipe([3])
    too_long = " ".join(["word"] * 200)
    with pytest.raises(ValueError, match=r"input 0 is longer than 64 tokens .*truncation=True"):
        pipe(too_long)
    with pytest.warns(UserWarning, match="truncated to 64"):
        assert pipe(too_long, truncation=True, max_new_tokens=3)[0]["translation_text"] is not None
    with pytest.raises(ValueError, match="num_return_sequences must be an integer in \\[1, num_beams=1\\]"):
        pipe("Hello", num_return_sequences=2)
    with pytest.raises(
        ValueError, match="'translation_en_es': a translation task is 'translation' or 'translation_XX_to_YY'"
    ):
        pipeline("translation_en_es", model=model_dir)
    gpt = GPTForCausalLM(GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, n_positions=32))
    with pytest.raises(TypeError, match="needs an encoder-decoder model .* got GPTForCausalLM"):
        pipeline("translation", model=gpt, tokenizer=pipe.tokenizer)


def test_language_pair_is_checked(tmp_path: Path) -> None:
    """A model whose config records en -> es accepts translation_en_to_es and refuses another pair."""
    train, _ = load_translation_pairs("en", "es")
    tokenizer = Tokenizer.train_translation_bpe(train[:200], vocab_size=300)
    from lmforge.models.seq2seq import Seq2SeqConfig, Seq2SeqForConditionalGeneration

    config = Seq2SeqConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_position_embeddings=32,
                           extra={"source_lang": "en", "target_lang": "es"})  # fmt: skip
    model = Seq2SeqForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path).config.extra["source_lang"] == "en"
    assert pipeline("translation_en_to_es", model=tmp_path).task == "translation_en_to_es"
    with pytest.raises(ValueError, match="asks for en -> fr, but this model translates en -> es"):
        pipeline("translation_en_to_fr", model=tmp_path)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)  # fmt: skip


def test_cli_translate_and_summarize(model_dir: Path, tmp_path: Path) -> None:
    pipe = pipeline("translation", model=model_dir)
    expected = [pipe(t, max_new_tokens=NEW, num_beams=2)[0]["translation_text"] for t in SOURCES[:2]]
    done = run_cli("translate", str(model_dir), *SOURCES[:2], "--json", "--max-new-tokens", str(NEW),
                   "--num-beams", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [x["input"] for x in lines] == SOURCES[:2] and [x["output"] for x in lines] == expected
    done = run_cli("translate", str(model_dir), "--max-new-tokens", str(NEW), "--num-beams", "2",
                   stdin="\n".join(SOURCES[:2]) + "\n")  # fmt: skip
    assert done.returncode == 0 and done.stdout.splitlines() == expected
    doc = tmp_path / "doc.txt"
    doc.write_text("First paragraph of the document.\nSecond paragraph, same document.\n", encoding="utf-8")
    done = run_cli("summarize", str(model_dir), "--file", str(doc), "--max-new-tokens", "6")
    summary = pipeline("summarization", model=model_dir)(doc.read_text(encoding="utf-8").strip(), max_new_tokens=6)
    assert done.returncode == 0 and done.stdout.splitlines() == [summary[0]["summary_text"]]
    for args, message in (
        (("translate", str(model_dir), ""), "source 0 is empty"),
        (("summarize", str(model_dir), "--file", str(tmp_path / "missing.txt")), "missing.txt"),
        (("translate", str(model_dir), " ".join(["word"] * 200)), "longer than 64 tokens"),
    ):
        done = run_cli(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_cli_attention_draws_cross_attention(model_dir: Path, tmp_path: Path) -> None:
    """`lmforge attention` on an encoder-decoder: the source x output map, of a given target or the greedy output."""
    for extra, name in ((["--target", "Y dijo Dios"], "given.png"), ([], "greedy.png")):
        done = run_cli("attention", str(model_dir), SOURCES[0], "--out", str(tmp_path / name), "--average-heads",
                       "--max-new-tokens", "6", *extra)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
