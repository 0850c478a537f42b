"""Tests for lmforge.models.gpt: shapes, the causal-LM loss, weight tying and initialisation,
parity with Hugging Face's GPT2LMHeadModel in both directions, checkpoints, the non-GPT-2
variants (sinusoidal, rotary, post-norm), config validation and the optional outputs.

transformers is the oracle: its models are built from tiny random configs inside the tests."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel  # test-only oracle (the "test" extra)

from lmforge.config import GPTConfig
from lmforge.models.gpt import GPTForCausalLM
from lmforge.nn.losses import causal_lm_loss

V, CTX = 101, 32


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=V, n_positions=CTX, n_layer=2, n_head=4, n_embd=32)
    kw.update(overrides)
    return GPTConfig(**kw)


def tiny_model(seed: int = 0, perturb: float = 0.0, **overrides) -> GPTForCausalLM:
    """A tiny model; `perturb` adds noise to every parameter (biases and norms too), so that a
    wrong name, transpose or bias mapping shows up in the numbers."""
    torch.manual_seed(seed)
    model = GPTForCausalLM(tiny_config(**overrides)).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


def batch(B: int = 3, T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.stack(
        [torch.cat([torch.zeros(T - n, dtype=torch.long), torch.ones(n, dtype=torch.long)]) for n in lengths]
    )


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting each row's real tokens from 0 (as for a left-padded batch)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def model() -> GPTForCausalLM:
    return tiny_model(perturb=0.05)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, model):
    """(lmforge model, the same weights loaded by transformers from lmforge's save_pretrained)."""
    d = tmp_path_factory.mktemp("lmforge_to_hf")
    model.save_pretrained(d)
    hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval()
    return model, hf


# ---------------------------------------------------------------------------------- shapes and loss
def test_output_shapes(model):
    ids = batch(2, 7)
    out = model(ids)
    assert out.logits.shape == (2, 7, V) and out.loss is None
    assert out.hidden_states is None and out.attentions is None and out.past_key_values is None
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, V)
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, out.logits[:, -3:])
    index = torch.tensor([0, 2, ids.size(1) - 1])  # positions named by a tensor, as transformers allows
    torch.testing.assert_close(model(ids, logits_to_keep=index).logits, out.logits[:, index])
    trunk = model.transformer(ids)
    assert trunk.last_hidden_state.shape == (2, 7, 32)
    assert out["logits"] is out.logits and out[0] is out.logits  # HF-style access


def test_kept_positions_skip_the_last_feed_forward_with_the_same_logits_and_cache(model):
    """logits_to_keep: the last block's feed-forward runs on the kept positions only (a prefill keeps one), the
    logits equal the full forward's at those positions, every position still writes its keys and values to the
    cache (bit for bit: they come before the drop), and padded rows, hidden states and a loss are unaffected."""
    ids = batch(2, 9)
    seen: list[tuple[int, ...]] = []
    hook = model.transformer.h[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            full = model(ids).logits
            seen.clear()
            cache = model.allocate_cache(2, 16)
            last = model(ids, past_key_values=cache, logits_to_keep=1).logits
            assert seen == [(2, 1, 32)]  # one position per row through the last feed-forward
            index = torch.tensor([1, 8])
            torch.testing.assert_close(model(ids, logits_to_keep=index).logits, full[:, index], atol=1e-5, rtol=1e-5)
            assert seen[-1] == (2, 2, 32)
            reference = model.allocate_cache(2, 16)
            model(ids, past_key_values=reference)  # every position, nothing dropped
            seen.clear()
            hidden = model(ids, logits_to_keep=2, output_hidden_states=True)  # all positions run, then picked
            assert seen == [(2, 9, 32)] and hidden.hidden_states[-1].shape == (2, 9, 32)
            mask = torch.ones_like(ids)
            mask[0, :4] = 0  # left padding in the first row
            padded = model(ids, attention_mask=mask, logits_to_keep=1).logits
            torch.testing.assert_close(padded, model(ids, attention_mask=mask).logits[:, -1:], atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.logits, full[:, -2:], atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.k[:, :, :, :9], reference.k[:, :, :, :9]) and torch.equal(cache.v, reference.v)
    assert cache.length == reference.length == 9
    with pytest.raises(ValueError, match="keep drops positions the hidden states would hold"):
        model.transformer(ids, output_hidden_states=True, keep=slice(-1, None))


def test_loss_equals_shifted_cross_entropy(model):
    ids = batch(3, 9)
    labels = ids.clone()
    labels[0, 4:] = -100  # e.g. padding
    labels[2, 1] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # and by hand: the mean of -log p(next token) over the scored positions
    logp = out.logits.log_softmax(-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(3) for t in range(8) if labels[b, t + 1] != -100]
    assert len(terms) == 3 * 8 - 5 - 1
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_labels_one_longer_score_every_position(model):
    block = batch(2, 11)
    x, labels = block[:, :10], block  # context + 1 tokens
    out = model(x, labels=labels)
    expected = F.cross_entropy(out.logits.reshape(-1, V), block[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert model.num_loss_items(labels) == 20
    with pytest.raises(ValueError, match="labels have 12 positions for 10 logits"):
        model(x, labels=batch(2, 12))


def test_all_ignored_labels_give_zero_loss(model):
    ids = batch(2, 6)
    m = tiny_model(perturb=0.05)
    m.train()
    out = m(ids, labels=torch.full_like(ids, -100))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_num_items_in_batch_divides_the_sum(model):
    ids = batch(2, 8)
    labels = ids.clone()
    labels[1, 5:] = -100
    logits = model(ids).logits
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    out = model(ids, labels=labels, num_items_in_batch=40)
    torch.testing.assert_close(out.loss, total / 40)
    torch.testing.assert_close(causal_lm_loss(logits, labels, torch.tensor(7)), total / 7)
    # two half-batches with the global count add up to the full-batch mean
    n = int(model.num_loss_items(labels))
    halves = sum(model(ids[i : i + 1], labels=labels[i : i + 1], num_items_in_batch=n).loss for i in range(2))
    torch.testing.assert_close(halves, model(ids, labels=labels).loss)


def test_forward_rejects_unknown_arguments(model):
    with pytest.raises(TypeError, match="unexpected arguments for GPTForCausalLM.forward: \\['token_type_ids'\\]"):
        model(batch(1, 4), token_type_ids=torch.zeros(1, 4, dtype=torch.long))


def test_sequence_longer_than_context_is_rejected(model):
    with pytest.raises(ValueError, match="sequence of 33 tokens is longer than the model's context of 32"):
        model(batch(1, CTX + 1))
    cache = model.allocate_cache(1, CTX)
    model(batch(1, 30), past_key_values=cache)
    with pytest.raises(ValueError, match="context of 32"):
        model(batch(1, 3), past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask covers 4 positions, expected 5"):
        model(batch(1, 5), attention_mask=torch.ones(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------- tying and init
def test_weight_tying_shares_one_tensor_and_one_gradient():
    m = tiny_model(perturb=0.05)
    assert m.lm_head.weight is m.transformer.wte.weight
    params = list(m.parameters())
    assert sum(p is m.transformer.wte.weight for p in params) == 1
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))  # ids < 50 only
    m(ids, labels=ids).loss.backward()
    assert m.lm_head.weight.grad is m.transformer.wte.weight.grad
    # rows of tokens that never occur in the input get gradient only through the output layer
    assert m.transformer.wte.weight.grad[50:].abs().sum() > 0

    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_parameters() == m.num_parameters() + V * 32


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, n_positions=64, n_layer=4, n_head=4, n_embd=256)
    m = GPTForCausalLM(cfg)
    resid_std = 0.02 / math.sqrt(2 * 4)
    for name, p in m.named_parameters():
        if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            expected = resid_std
        elif name.endswith("weight") and ("ln_" in name):
            assert torch.all(p == 1), name
            continue
        elif name.endswith("weight"):
            expected = 0.02
        else:
            assert name.endswith("bias") and torch.all(p == 0), name
            continue
        n = p.numel()
        # the sample std of n normal draws is within a few 1/sqrt(2n) (relative) of the truth
        assert p.std().item() == pytest.approx(expected, rel=6 / math.sqrt(2 * n)), name
        assert abs(p.mean().item()) < 6 * expected / math.sqrt(n), name
    big = dict(m.named_parameters())
    assert big["transformer.h.3.mlp.proj.weight"].numel() >= 250_000  # the "moderately sized" layer
    assert big["transformer.h.3.mlp.proj.weight"].std().item() == pytest.approx(resid_std, rel=0.01)


# ---------------------------------------------------------------------------------- Hugging Face parity
def test_logits_and_loss_match_transformers(hf_pair):
    model, hf = hf_pair
    ids = batch(3, 12)
    labels = ids.clone()
    labels[1, 7:] = -100
    ours = model(ids, labels=labels)
    with torch.no_grad():
        theirs = hf(ids, labels=labels)
    assert (ours.logits - theirs.logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
    assert model.num_parameters() == hf.num_parameters()


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_with_padding(hf_pair, side):
    model, hf = hf_pair
    T, lengths = 9, [9, 4, 6]
    ids = batch(3, T, seed=2)
    mask = left_padding_mask(lengths, T)
    if side == "right":
        mask = mask.flip(-1)
    pos = hf_positions(mask)
    ours = model(ids, attention_mask=mask).logits  # lmforge derives the positions itself
    ours_explicit = model(ids, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert not ours.isnan().any()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5
    assert torch.equal(ours[real], ours_explicit[real])
    # a padded row gives each real token the logits of the same tokens alone
    for b in range(len(lengths)):
        alone = model(ids[b][real[b]][None]).logits[0]
        torch.testing.assert_close(ours[b][real[b]], alone, rtol=0, atol=1e-5)


def test_hidden_states_and_attentions_match_transformers(hf_pair):
    model, hf = hf_pair
    ids = batch(2, 8, seed=3)
    ours = model(ids, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        theirs = hf(ids, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == model.config.n_layer + 1 == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert a.shape == (2, 8, 32)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(ours.attentions) == model.config.n_layer
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == (2, 4, 8, 8)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the first hidden state is the embedding sum, the logits come from the last one
    emb = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(8))
    torch.testing.assert_close(ours.hidden_states[0], emb)
    torch.testing.assert_close(ours.logits, model.lm_head(ours.hidden_states[-1]))


@pytest.mark.parametrize("activation,n_inner", [("gelu_new", None), ("relu", 48)])
def test_transformers_checkpoint_loads_into_lmforge(tmp_path, activation, n_inner):
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=V,
        n_positions=CTX,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=n_inner,
        activation_function=activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = GPTForCausalLM.from_pretrained(tmp_path)
    assert not ours.training
    assert (ours.config.n_embd, ours.config.n_layer, ours.config.n_head, ours.config.ffn_dim) == (
        32,
        2,
        4,
        n_inner or 128,
    )
    assert ours.config.activation_function == activation and ours.config.eos_token_id == 0
    assert ours.lm_head.weight is ours.transformer.wte.weight
    ids = batch(2, 11, seed=4)
    with torch.no_grad():
        expected = hf(ids, labels=ids)
    out = ours(ids, labels=ids)
    assert (out.logits - expected.logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"position_embedding": "rotary"},
        {"position_embedding": "sinusoidal", "norm_position": "post", "bias": False},
    ],
)
def test_save_load_round_trip(tmp_path, overrides):
    m = tiny_model(perturb=0.05, **overrides)
    m.save_pretrained(tmp_path)
    loaded = GPTForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == m.config
    ids = batch(2, 10, seed=5)
    torch.testing.assert_close(
        loaded(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ
    tied = m.config.tie_word_embeddings
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tied
    if not tied:
        assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
        assert not torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)
    # a step on the loaded model still moves the (shared) embedding for both uses
    loaded.train()
    loaded(ids, labels=ids).loss.backward()
    if tied:
        assert loaded.lm_head.weight.grad is loaded.transformer.wte.weight.grad


def test_config_json_is_hugging_face_shaped(tmp_path):
    cfg = tiny_config(eos_token_id=3)
    cfg.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    assert {k: d[k] for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")} == {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": CTX,
        "vocab_size": V,
    }
    assert d["activation_function"] == "gelu_new" and d["eos_token_id"] == 3
    hf_cfg = GPT2Config.from_pretrained(tmp_path)  # transformers reads it as a GPT-2 config
    assert (hf_cfg.n_embd, hf_cfg.n_layer, hf_cfg.n_head, hf_cfg.n_positions, hf_cfg.vocab_size) == (32, 2, 4, CTX, V)
    assert GPTConfig.from_pretrained(tmp_path) == cfg

    for overrides in (
        {"position_embedding": "rotary"},
        {"position_embedding": "sinusoidal"},
        {"norm_position": "post"},
        {"bias": False},
    ):
        d = tiny_config(**overrides).to_dict()
        assert d["model_type"] == "lmforge-gpt", overrides
        assert d["architectures"] == ["GPTForCausalLM"]
        assert GPTConfig.from_dict(d) == tiny_config(**overrides)


def test_config_keeps_unknown_keys(tmp_path):
    d = tiny_config().to_dict()
    d["my_custom_key"] = [1, 2]
    cfg = GPTConfig.from_dict(d)
    assert cfg.extra == {"my_custom_key": [1, 2]}
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["my_custom_key"] == [1, 2]
    with pytest.raises(ValueError, match="model_type 'bert'"):
        GPTConfig.from_dict({**d, "model_type": "bert"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_embd": 30, "n_head": 4}, r"n_embd \(30\) must be divisible by n_head \(4\)"),
        ({"position_embedding": "alibi"}, "position_embedding must be one of .*got 'alibi'"),
        ({"norm_position": "middle"}, "norm_position must be 'pre' or 'post'"),
        ({"n_embd": 24, "n_head": 8, "position_embedding": "rotary"}, "rotary positions need an even head size"),
        ({"n_layer": 0}, "n_layer must be positive, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


# ---------------------------------------------------------------------------------- variants and training
@pytest.mark.parametrize(
    "overrides", [{"position_embedding": "sinusoidal"}, {"position_embedding": "rotary"}, {"norm_position": "post"}, {}]
)
def test_variants_train_on_a_repeated_batch(overrides):
    m = tiny_model(**overrides)
    if overrides.get("position_embedding") == "rotary":
        assert m.transformer.wpe is None
    if overrides.get("position_embedding") == "sinusoidal":
        assert not list(m.transformer.wpe.parameters())
    m.train()
    ids = batch(4, 16, seed=6)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), abs=0.3)  # near uniform at initialisation
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rotary"])
def test_kv_cache_forward_equals_full_forward(position):
    m = tiny_model(perturb=0.05, position_embedding=position)
    ids = batch(2, 12, seed=7)
    full = m(ids).logits
    cache = m.allocate_cache(2, 12)
    out = m(ids[:, :8], past_key_values=cache)
    assert out.past_key_values is cache and cache.length == 8
    steps = [out.logits]
    for t in range(8, 12):
        steps.append(m(ids[:, t : t + 1], past_key_values=cache).logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    out = m(ids[:, :5], use_cache=True)  # allocates a cache itself
    assert out.past_key_values.length == 5


def test_position_variants_are_position_sensitive():
    # without positions a causal model's last-token logits would not depend on order
    for position in ("learned", "sinusoidal", "rotary"):
        m = tiny_model(perturb=0.05, position_embedding=position)
        a = torch.tensor([[5, 6, 7, 8]])
        b = torch.tensor([[6, 5, 7, 8]])
        assert (m(a).logits[0, -1] - m(b).logits[0, -1]).abs().max() > 1e-4, position


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = batch(2, 10, seed=8)
    grads = []
    for checkpointing in (False, True):
        m = tiny_model(perturb=0.05)
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_attention_weights_sum_to_one_over_allowed_keys(model):
    T = 7
    mask = left_padding_mask([7, 3], T)
    out = model(batch(2, T, seed=9), attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert len(out.attentions) == model.config.n_layer
    allowed = mask.bool()[:, None, None, :] & torch.ones(T, T, dtype=torch.bool).tril()  # (B, 1, T, T)
    for w in out.attentions:
        assert w.shape == (2, 4, T, T)
        assert torch.all(w[~allowed.expand_as(w)] == 0)
        real_rows = mask.bool()[:, None, :].expand(2, 4, T)
        torch.testing.assert_close(w.sum(-1)[real_rows], torch.ones(int(real_rows.sum())))


@pytest.mark.parametrize(
    "key,value",
    [("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True)],
)
def test_unsupported_gpt2_attention_variants_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        GPTConfig.from_dict({"model_type": "gpt2", "n_embd": 32, "n_head": 2, key: value})


def test_a_whole_model_pickles(model):
    """A model object survives pickle (multiprocessing, torch.save of the whole object): every activation
    is a named function, none a lambda, and the copy computes the same logits with tied weights kept."""
    import pickle

    clone = pickle.loads(pickle.dumps(model))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, model(ids).logits)
    assert clone.lm_head.weight is clone.transformer.wte.weight
