"""Tests for lmforge.nn.lora: LoRA adapters on GPT and BERT (a fresh adapter changes nothing, training
touches only adapters, merging, plain checkpoints after unloading, adapter files, errors), with peft on
transformers' GPT-2 and BERT as the oracle for the adapted outputs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model  # test-only oracle

from lmforge.config import BertConfig, GPTConfig
from lmforge.models.bert import BertForSequenceClassification
from lmforge.models.gpt import GPTForCausalLM, GPTForSequenceClassification
from lmforge.nn.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    has_lora,
    load_adapters,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapters,
    trainable_parameters,
    unmerge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 50, 8
BERT_SIZES = dict(
    vocab_size=V,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=3,
)


def gpt(seed: int = 0, **overrides) -> GPTForCausalLM:
    """A tiny GPT with weights spread away from the init, so that mistakes show in the numbers."""
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2), **overrides})
    return spread(GPTForCausalLM(config), seed)


def bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return spread(BertForSequenceClassification(BertConfig(**{**BERT_SIZES, **overrides})), seed)


def spread(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def randomise_adapters(model: torch.nn.Module, seed: int = 7) -> None:
    """Give B (zero at the start) values, as training would, so the adapters change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def ids(B: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- wrapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [gpt, bert], ids=["gpt", "bert"])
def test_fresh_adapter_changes_no_output_and_wraps_only_attention_projections(build) -> None:
    model = build()
    before = logits(model)
    apply_lora(model, LoRAConfig(r=4))
    assert torch.equal(logits(model), before)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    prefix = "transformer.h" if build is gpt else "bert.layers"
    assert wrapped == sorted(f"{prefix}.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj"))  # not mlp.proj
    layer = model.get_submodule(f"{prefix}.0.attn.qkv")
    assert layer.lora_A.shape == (4, layer.in_features) and layer.lora_B.shape == (layer.out_features, 4)
    assert layer.lora_A.abs().sum() > 0 and not layer.lora_B.any()


def test_wrapping_keeps_parameters_names_and_tying() -> None:
    model = gpt()
    qkv = model.transformer.h[0].attn.qkv
    weight, bias, keys = qkv.weight, qkv.bias, set(model.state_dict())
    apply_lora(model)
    assert model.transformer.h[0].attn.qkv.weight is weight and model.transformer.h[0].attn.qkv.bias is bias
    assert model.lm_head.weight is model.transformer.wte.weight
    new_keys = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict()) and all(k.endswith((".lora_A", ".lora_B")) for k in new_keys)
    assert len(new_keys) == 8


def test_trainable_parameters_counts_adapters_and_saved_modules() -> None:
    model = gpt()
    total = model.num_parameters()
    apply_lora(model, LoRAConfig(r=4))
    C, r = 32, 4
    lora = 2 * (r * (C + 3 * C) + r * (C + C))  # two layers of qkv (C -> 3C) and proj (C -> C)
    assert trainable_parameters(model) == (lora, total + lora)
    cls = bert()
    apply_lora(cls, LoRAConfig(r=2, modules_to_save=["classifier"]))
    H = 16
    assert trainable_parameters(cls)[0] == 2 * (2 * (H + 3 * H) + 2 * (H + H)) + H * 3 + 3


def test_target_patterns_suffixes_and_regex() -> None:
    loose = apply_lora(gpt(), LoRAConfig(target_modules=["qkv", "proj"]))  # "proj" also matches mlp.proj
    assert isinstance(loose.transformer.h[0].mlp.proj, LoRALinear)
    mlp = apply_lora(gpt(), LoRAConfig(target_modules=r"transformer\.h\.\d+\.mlp\.(fc|proj)"))
    wrapped = [n for n, m in mlp.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 and all(".mlp." in n for n in wrapped)


def test_any_module_with_linears_and_gpt_classifier_head() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(5, 4)
    before = net(x)
    apply_lora(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    # B = 0: the same function (to float32 rounding: with autograd on, an AMD CPU runs the base product on oneDNN)
    assert isinstance(net[0], LoRALinear)
    torch.testing.assert_close(net(x), before, rtol=1e-6, atol=1e-6)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B", "2.weight", "2.bias"]
    torch.manual_seed(0)
    cls = GPTForSequenceClassification(
        GPTConfig(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    )
    apply_lora(cls, LoRAConfig(r=2, modules_to_save=["score"]))
    assert cls.score.weight.requires_grad and not cls.transformer.wte.weight.requires_grad
    assert set(lora_state_dict(cls)) >= {"score.weight"}


# ---- training ------------------------------------------------------------------------------------


def test_training_changes_only_adapters_and_loss_falls() -> None:
    every_linear = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]  # (not lm_head: it is the tied embedding)
    model = apply_lora(gpt(), LoRAConfig(r=8, alpha=16, dropout=0.1, target_modules=every_linear)).train()
    before = snapshot(model)
    x = ids(B=2, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]) and p.grad is None, name  # frozen: bit-identical, no gradient


def test_modules_to_save_train_alongside_adapters() -> None:
    model = apply_lora(bert(), LoRAConfig(r=4, target_modules=["attn.proj"], modules_to_save=["classifier"])).train()
    before = snapshot(model)
    x, y = ids(B=4, seed=5), torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    first = None
    for _ in range(25):
        loss = model(x, labels=y).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("classifier.") or n.endswith((".lora_A", ".lora_B"))}


# ---- merging -------------------------------------------------------------------------------------


def test_merge_matches_adapted_outputs_is_idempotent_and_unmerges() -> None:
    model = apply_lora(gpt(), LoRAConfig(r=4))
    base = snapshot(model)
    randomise_adapters(model)
    adapted = logits(model)
    assert (adapted - logits(gpt())).abs().max() > 1e-3  # the adapters do something
    merge_lora(model)
    once = snapshot(model)
    assert not torch.equal(once["transformer.h.0.attn.qkv.weight"], base["transformer.h.0.attn.qkv.weight"])
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    merge_lora(model)  # a second merge does nothing
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())
    unmerge_lora(model)
    unmerge_lora(model)  # nor does a second unmerge
    for name, p in model.named_parameters():
        if not name.endswith((".lora_A", ".lora_B")):  # base weights restored
            torch.testing.assert_close(p, base[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)


def test_merge_and_unload_gives_a_plain_checkpoint(tmp_path: Path) -> None:
    model = apply_lora(gpt(), LoRAConfig(r=4))
    randomise_adapters(model)
    adapted = logits(model)
    plain = merge_and_unload(model)
    assert plain is model and not has_lora(plain) and not hasattr(plain, "lora_config")
    assert all(type(m) is not LoRALinear for m in plain.modules())
    assert type(plain.transformer.h[0].attn.qkv) is torch.nn.Linear
    assert not any("lora" in k for k in plain.state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # as before apply_lora
    assert plain.lm_head.weight is plain.transformer.wte.weight
    plain.save_pretrained(tmp_path)
    again = GPTForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again), adapted, atol=1e-5, rtol=0)


# ---- adapter files -------------------------------------------------------------------------------


def test_save_and_load_adapters_round_trip(tmp_path: Path) -> None:
    model = apply_lora(gpt(), LoRAConfig(r=2, alpha=4))
    randomise_adapters(model)
    adapted = logits(model)
    save_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["target_modules"] == ["attn.qkv", "attn.proj"]
    merge_and_unload(model).save_pretrained(tmp_path / "full")
    small = (tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME).stat().st_size
    assert small < (tmp_path / "full" / "model.safetensors").stat().st_size / 10

    fresh = load_adapters(gpt(), tmp_path / "adapter")  # LoRA applied from the saved config
    assert has_lora(fresh) and fresh.lora_config == LoRAConfig(r=2, alpha=4)
    assert torch.equal(logits(fresh), adapted)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    merged = merge_lora(apply_lora(gpt(), LoRAConfig(r=2, alpha=4)))  # loading into a merged model
    load_adapters(merged, tmp_path / "adapter")
    assert all(layer.merged for layer in merged.modules() if isinstance(layer, LoRALinear))
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=0)


def test_adapters_carry_modules_to_save(tmp_path: Path) -> None:
    model = apply_lora(bert(), LoRAConfig(r=2, modules_to_save=["classifier"]))
    randomise_adapters(model)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)  # as if the head were trained
    assert set(lora_state_dict(model)) == {"classifier.weight", "classifier.bias"} | {
        f"bert.layers.{i}.attn.{p}.lora_{ab}" for i in range(2) for p in ("qkv", "proj") for ab in "AB"
    }
    save_adapters(model, tmp_path)
    fresh = load_adapters(bert(), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    assert fresh.classifier.weight.requires_grad and not fresh.bert.pooler.weight.requires_grad


def test_interrupted_save_leaves_the_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = apply_lora(gpt(), LoRAConfig(r=2))
    save_adapters(model, tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomise_adapters(model)

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no half file, no temp file


# ---- errors --------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'attn\.query'.*match no nn\.Linear.*transformer\.h\.0\.attn\.qkv"):
        apply_lora(gpt(), LoRAConfig(target_modules=["attn.qkv", "attn.query"]))
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(gpt(), LoRAConfig(target_modules=r"encoder\..*"))
    model = apply_lora(gpt())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model)
    with pytest.raises(ValueError, match="lm_head.weight is tied to transformer.wte.weight"):
        apply_lora(gpt(), LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        apply_lora(gpt(), LoRAConfig(modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="both LoRA targets and inside modules_to_save"):
        apply_lora(bert(), LoRAConfig(target_modules=["attn.proj", "classifier"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="has no LoRA layers"):
        merge_lora(gpt())
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(target_modules=[]), dict(target_modules="(")):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)


def test_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapters(gpt(), tmp_path)
    save_adapters(apply_lora(gpt(), LoRAConfig(r=2)), tmp_path)
    with pytest.raises(ValueError, match=r"has shape \(2, 32\), the model expects \(2, 64\)"):
        load_adapters(gpt(n_embd=64), tmp_path)  # another model size
    with pytest.raises(ValueError, match=r"have \(r, alpha\) \[\(4, 16.0\)\]"):
        load_adapters(apply_lora(gpt(), LoRAConfig(r=4)), tmp_path)
    with pytest.raises(ValueError, match="does not match the model's adapters: missing"):
        load_adapters(apply_lora(gpt(), LoRAConfig(r=2, target_modules=["mlp.fc"])), tmp_path)
    (tmp_path / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_adapters(gpt(), tmp_path)
    peft_style = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}
    with pytest.raises(ValueError, match="a peft adapter"):
        LoRAConfig.from_dict(peft_style)
    config = LoRAConfig(r=3, alpha=6.0, dropout=0.1, target_modules=r".*fc", modules_to_save=["score"])
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ---- oracle: peft on transformers' models -----------------------------------------------------


def copy_adapters(ours: torch.nn.Module, theirs: torch.nn.Module, names: dict[str, str]) -> None:
    """Copy our lora_A / lora_B into peft's lora_A.default.weight / lora_B.default.weight. peft's A and B
    are nn.Linear weights, (r, in) and (out, r) like ours, for GPT-2's Conv1D (fan_in_fan_out) too:
    only peft's merge transposes."""
    target = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith((".lora_A", ".lora_B")):
                hf = name
                for a, b in names.items():
                    hf = hf.replace(a, b)
                target[f"base_model.model.{hf}.default.weight"].copy_(p)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations, raised inside peft
def test_gpt2_adapters_match_peft(tmp_path: Path) -> None:
    ours = gpt()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    # HF's fused c_attn is our qkv (Conv1D: transposed base weight, handled by save_pretrained)
    model = apply_lora(ours, LoRAConfig(r=4, alpha=8))
    randomise_adapters(model)
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, target_modules=["attn.c_attn", "attn.c_proj"], fan_in_fan_out=True)
    ).eval()
    copy_adapters(model, peft_model, {".qkv.": ".c_attn.", ".proj.": ".c_proj."})
    x = ids()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    assert (expected - logits(gpt(), x)).abs().max() > 1e-3  # the adapters are not a no-op
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # peft's merge (transposed for Conv1D) agrees with ours
        merged_hf = peft_model.merge_and_unload()(input_ids=x).logits
    torch.testing.assert_close(logits(merge_and_unload(model), x), merged_hf, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bert_classifier_adapters_match_peft(tmp_path: Path) -> None:
    ours = bert()
    ours.save_pretrained(tmp_path)
    # HF's attention.output.dense is our attn.proj (BERT's separate query/key/value differ from our fused qkv)
    model = apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["attn.proj"], modules_to_save=["classifier"]))
    randomise_adapters(model)
    with torch.no_grad():
        model.classifier.weight.mul_(-2.0)
        model.classifier.bias.add_(0.3)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, target_modules=["attention.output.dense"], modules_to_save=["classifier"])
    ).eval()
    copy_adapters(model, peft_model, {"bert.layers.": "bert.encoder.layer.", ".attn.proj.": ".attention.output.dense."})
    saved = dict(peft_model.named_parameters())
    with torch.no_grad():
        for p in ("weight", "bias"):
            saved[f"base_model.model.classifier.modules_to_save.default.{p}"].copy_(getattr(model.classifier, p))
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = peft_model(input_ids=x, attention_mask=mask).logits
        got = model(x, attention_mask=mask).logits
        assert (got - bert()(x, attention_mask=mask).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- docs ----------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "lora.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert (tmp_path / "my-adapter" / ADAPTER_WEIGHTS_NAME).is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file() and not has_lora(namespace["restored"])
