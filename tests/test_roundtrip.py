"""Hugging Face -> lmforge -> Hugging Face: every tensor comes back identical, for GPT-2 and BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig as HFBertConfig
from transformers import BertForPreTraining as HFBertForPreTraining
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel as HFGPT2

from lmforge import BertForPreTraining, GPTForCausalLM


def hf_models() -> list[tuple[str, torch.nn.Module, type]]:
    torch.manual_seed(0)
    gpt2 = HFGPT2(HFGPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    bert = HFBertForPreTraining(
        HFBertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    )
    return [("gpt2", gpt2, GPTForCausalLM), ("bert", bert, BertForPreTraining)]


@pytest.mark.parametrize("name, hf, ours", hf_models(), ids=["gpt2", "bert"])
def test_hf_lmforge_hf_round_trip_is_identical(name: str, hf: torch.nn.Module, ours: type, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path / "hf")
    model = ours.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "lmforge")
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    again = load_file(str(tmp_path / "lmforge" / "model.safetensors"))
    assert set(again) == set(original)
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key
    reloaded = type(hf).from_pretrained(tmp_path / "lmforge")
    for (key, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), key
    if name == "gpt2":  # tied output layer stays tied through the trip
        assert model.lm_head.weight is model.transformer.wte.weight
        assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
