"""Auto classes and Hugging Face names: a transformers script runs with only its import line changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import GREEDY_MARGIN, greedy_margin

import lmforge
from lmforge import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    GPTConfig,
    GPTForCausalLM,
    Tokenizer,
)

TEXTS = ["To be, or not to be, that is the question.", "床前明月光，疑是地上霜。", "Hello world 😀"] * 20

SCRIPT = """
from {lib} import AutoTokenizer, AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained(path)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path)
model.eval()
inputs = tok(["To be, or not", "床前明月光"], return_tensors="pt", padding=True)
loss = model(**inputs, labels=inputs["input_ids"]).loss.item()
generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
texts = tok.batch_decode(generated, skip_special_tokens=True)
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer.train_bpe(iterator=TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = GPTForCausalLM(
        GPTConfig(
            vocab_size=len(tok),
            n_positions=64,
            n_layer=2,
            n_head=2,
            n_embd=32,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    with torch.no_grad():  # spread the logits so greedy choices are clear-cut
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path, tokenizer=tok)
    return path


def test_hugging_face_names_are_the_lmforge_classes() -> None:
    assert GPT2LMHeadModel is GPTForCausalLM and GPT2Config is GPTConfig and GPT2Tokenizer is Tokenizer
    assert {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "GPT2LMHeadModel"} <= set(lmforge.__all__)


def test_auto_classes_dispatch_on_model_type(model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    assert isinstance(config, GPTConfig) and config.n_layer == 2
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, GPTForCausalLM) and not model.training
    assert isinstance(AutoModelForCausalLM.from_config(config), GPTForCausalLM)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    assert tok.padding_side == "left" and len(tok) == 300


def test_a_transformers_script_runs_with_only_the_import_changed(model_dir: Path) -> None:
    results = {}
    for lib in ("transformers", "lmforge"):
        namespace = {"path": str(model_dir)}
        exec(SCRIPT.format(lib=lib), namespace)
        results[lib] = namespace
    hf, ours = results["transformers"], results["lmforge"]
    assert ours["loss"] == pytest.approx(hf["loss"], abs=1e-5)
    # other kernels, the same greedy tokens: no step is a near tie (see helpers.GREEDY_MARGIN)
    mask, T = ours["inputs"]["attention_mask"], ours["inputs"]["attention_mask"].size(1)
    rows, prompt_lengths = [], []
    for row, m in zip(ours["generated"].tolist(), mask):
        new = row[T:]
        eos = ours["tok"].eos_token_id
        rows.append(row[T - int(m.sum()) : T] + (new[: new.index(eos) + 1] if eos in new else new))
        prompt_lengths.append(int(m.sum()))
    assert greedy_margin(ours["model"], rows, prompt_lengths) > GREEDY_MARGIN
    assert torch.equal(ours["generated"], hf["generated"])
    assert ours["texts"] == hf["texts"]
    assert ours["texts"][1].startswith("床前明月光")


def test_unsupported_model_type_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}), encoding="utf-8")
    with pytest.raises(ValueError, match="model_type 't5' is not supported by AutoModelForCausalLM"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="has no model_type"):
        AutoConfig.from_pretrained(tmp_path)
