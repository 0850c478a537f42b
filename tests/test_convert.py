"""`lmforge convert`: Hugging Face checkpoints in, clean lmforge/HF directories out, in another dtype."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel

from lmforge import GPTForCausalLM
from lmforge.cli import main


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(HFConfig(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path


def test_convert_maps_names_and_writes_bf16_that_both_libraries_load(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    code, stdout, stderr = run(["convert", str(hf_dir), str(out), "--dtype", "bf16"])
    assert code == 0, stderr
    assert "attn.c_attn.weight" in stdout and "-> transformer.h.{i}.attn.qkv.weight (transposed" in stdout
    assert "x2" in stdout and "no tokenizer files" in stdout
    ids = torch.randint(0, 120, (2, 16))
    reference = GPT2LMHeadModel.from_pretrained(hf_dir).eval()(ids).logits
    ours = GPTForCausalLM.from_pretrained(out)
    assert ours.dtype == torch.bfloat16
    theirs = GPT2LMHeadModel.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    assert (a - reference).abs().max() < 0.05  # bf16 rounding of a tiny model
    assert (a - b).abs().max() < 0.05


def test_convert_back_to_float32_is_exact(hf_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = run(["convert", str(hf_dir), str(tmp_path / "fp32")])
    assert code == 0, stderr
    ids = torch.randint(0, 120, (1, 20))
    with torch.no_grad():
        reference = GPT2LMHeadModel.from_pretrained(hf_dir).eval()(ids).logits
        again = GPT2LMHeadModel.from_pretrained(tmp_path / "fp32").eval()(ids).logits
    assert torch.equal(reference, again)


def test_convert_errors_are_one_line(tmp_path: Path) -> None:
    code, _, stderr = run(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert code == 2 and stderr.count("\n") == 1 and "does not exist" in stderr


def test_convert_a_bert_checkpoint(tmp_path: Path) -> None:
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForSequenceClassification as HFBert

    from lmforge import BertForSequenceClassification

    torch.manual_seed(0)
    hf = HFBert(
        HFBertConfig(
            vocab_size=90,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
            num_labels=3,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    code, stdout, stderr = run(["convert", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert code == 0, stderr
    assert "-> BertForSequenceClassification" in stdout and "(joined: query, key, value)" in stdout
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        assert torch.allclose(
            BertForSequenceClassification.from_pretrained(tmp_path / "out")(ids).logits, hf(ids).logits, atol=1e-5
        )
