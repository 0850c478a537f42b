"""Tests for lmforge.hub: the checkpoint layout on disk, loading Hugging Face files (safetensors and
legacy pytorch_model.bin) and clear errors for every kind of bad input — including a pickle that
would run code, which must be refused without running it."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from helpers import hf_gpt2
from safetensors import safe_open
from transformers import GPT2LMHeadModel  # test-only oracle

from lmforge.config import GPTConfig
from lmforge.hub import load_hf_state_dict, read_weights, to_hf_state_dict
from lmforge.models.gpt import GPTForCausalLM
from lmforge.tokenizer import Tokenizer

V = 97


def tiny_model(**overrides) -> GPTForCausalLM:
    torch.manual_seed(0)
    kw = dict(vocab_size=V, n_positions=16, n_layer=2, n_head=2, n_embd=16)
    kw.update(overrides)
    m = GPTForCausalLM(GPTConfig(**kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture()
def saved(tmp_path) -> tuple[GPTForCausalLM, Path]:
    m = tiny_model()
    d = tmp_path / "model"
    m.save_pretrained(d)
    return m, d


def hf_model(seed: int = 0) -> GPT2LMHeadModel:
    return hf_gpt2(V, seed)


IDS = torch.tensor([[1, 5, 9, 33, 2, 96, 0, 7]])


# ---------------------------------------------------------------------------------- the files on disk
def test_save_pretrained_writes_hugging_face_names_and_layout(saved):
    m, d = saved
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        c_attn = f.get_tensor("transformer.h.0.attn.c_attn.weight")
        c_fc = f.get_tensor("transformer.h.1.mlp.c_fc.weight")
    assert "lm_head.weight" not in keys  # tied to wte, left out as Hugging Face does
    assert len(keys) == 4 + 12 * 2  # wte, wpe, ln_f (2) + 12 tensors per block
    # GPT-2's Conv1D layout is (in, out): the transpose of nn.Linear
    assert c_attn.shape == (16, 48) and torch.equal(c_attn, m.transformer.h[0].attn.qkv.weight.T)
    assert c_fc.shape == (16, 64) and torch.equal(c_fc, m.transformer.h[1].mlp.fc.weight.T)
    assert not list(d.glob(".*"))  # no temporary files left behind


def test_save_pretrained_with_tokenizer(tmp_path):
    tok = Tokenizer.train_bpe(iterator=["hello world"] * 5, vocab_size=260)
    tiny_model().save_pretrained(tmp_path, tokenizer=tok)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert Tokenizer.from_pretrained(tmp_path).encode("hello world") == tok.encode("hello world")


def test_state_dict_conversion_round_trips():
    m = tiny_model(tie_word_embeddings=False)
    hf_state = to_hf_state_dict(m)
    assert "lm_head.weight" in hf_state  # untied: the output layer is its own tensor
    other = tiny_model(tie_word_embeddings=False)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_hf_state_dict(other, hf_state)
    for (name, a), (_, b) in zip(m.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------- loading other files
def test_legacy_pytorch_model_bin_loads(tmp_path):
    hf = hf_model()
    hf.config.save_pretrained(tmp_path)
    state = dict(hf.state_dict())
    assert "lm_head.weight" in state  # HF's state_dict lists the tied head too
    # old GPT-2 files also carry the causal-mask buffers; they are not parameters
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = GPTForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = hf(IDS).logits
    assert (ours(IDS).logits - expected).abs().max().item() <= 1e-5


def test_base_model_weights_without_prefix_load(tmp_path):
    hf = hf_model(seed=1)
    hf.config.save_pretrained(tmp_path)
    base_state = hf.transformer.state_dict()  # GPT2Model names: "wte.weight", "h.0...."
    assert not any(k.startswith("transformer.") for k in base_state)
    torch.save(base_state, tmp_path / "pytorch_model.bin")
    ours = GPTForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = hf(IDS).logits
    assert (ours(IDS).logits - expected).abs().max().item() <= 1e-5


def test_safetensors_preferred_over_bin(saved):
    m, d = saved
    torch.save({"garbage": torch.zeros(1)}, d / "pytorch_model.bin")
    state, source = read_weights(d)
    assert source.name == "model.safetensors"
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained(d)(IDS).logits, m(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ


def test_from_pretrained_dtype_and_overrides(saved):
    m, d = saved
    m64 = GPTForCausalLM.from_pretrained(d, dtype=torch.float64)
    assert m64.dtype == torch.float64
    torch.testing.assert_close(m64(IDS).logits.float(), m(IDS).logits, rtol=0, atol=1e-5)
    dropped = GPTForCausalLM.from_pretrained(d, dropout=0.1)
    assert dropped.config.dropout == 0.1 and not dropped.training
    with pytest.raises(TypeError, match="got an unknown option 'n_experts'"):
        GPTForCausalLM.from_pretrained(d, n_experts=4)


# ---------------------------------------------------------------------------------- bad input
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope does not exist"):
        GPTForCausalLM.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path, saved):
    _, d = saved
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json; it is not a model directory"):
        GPTForCausalLM.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPTForCausalLM.from_pretrained(tmp_path)  # an empty directory


def test_missing_weights(saved):
    _, d = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors \(or pytorch_model.bin\) in"):
        GPTForCausalLM.from_pretrained(d)


def test_truncated_safetensors(saved):
    _, d = saved
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated or not a safetensors file"):
        GPTForCausalLM.from_pretrained(d)
    path.write_bytes(data[:5])  # not even a complete header length
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        GPTForCausalLM.from_pretrained(d)


class _RunsCode:
    """Unpickling this calls builtins.exec, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_malicious_pickle_is_refused_without_running(tmp_path, saved):
    _, d = saved
    (d / "model.safetensors").unlink()
    # prove the payload is live: an unrestricted unpickle of the same kind of file runs it
    probe = tmp_path / "probe.bin"
    probe_marker = tmp_path / "probe_ran"
    torch.save({"w": torch.zeros(2), "x": _RunsCode(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(V, 16), "x": _RunsCode(marker)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refused to load .*pytorch_model.bin: it is not a plain tensor file"):
        GPTForCausalLM.from_pretrained(d)
    assert not marker.exists()


def test_config_disagreeing_with_weights(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(
        ValueError,
        match=r"has shape \(.*\), the config expects \(.*\); config.json and the "
        r"weights disagree",
    ):
        GPTForCausalLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"does not match the model: missing \['transformer.h.2"):
        GPTForCausalLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match=r"unexpected \['transformer.h.1"):
        GPTForCausalLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": V + 3}))
    with pytest.raises(ValueError, match="transformer.wte.weight has shape"):
        GPTForCausalLM.from_pretrained(d)


def test_invalid_json_config(saved):
    _, d = saved
    (d / "config.json").write_text('{"n_embd": 16, "n_layer": ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON .*re-save the model"):
        GPTForCausalLM.from_pretrained(d)


def test_wrong_model_type(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPTForCausalLM.from_pretrained(d)
