"""Tests for lmforge.nn: the attention formula and its fast path, masks, KV cache, position
encodings, feed-forward, LayerNorm and the pre-/post-norm Transformer block.

References are hand computations (explicit loops, the `math` module) and plain PyTorch ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.nn import (
    AttentionMask,
    FeedForward,
    KVCache,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    TransformerBlock,
    causal_mask,
    get_activation,
    layer_norm,
    reference_attention,
    sinusoidal_table,
)
from lmforge.nn.inference import packing_available


# ---------------------------------------------------------------------------------- helpers
def hand_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for 2-D q (Tq, d), k (Tk, d), v (Tk, dv), with Python loops and
    `math` only. A query row with no allowed key gives a zero row."""
    Tq, d = q.shape
    Tk, dv = v.shape
    out = torch.zeros(Tq, dv, dtype=torch.float64)
    for i in range(Tq):
        keys = [j for j in range(Tk) if allowed is None or bool(allowed[i][j])]
        if not keys:
            continue
        scores = {j: sum(float(q[i, c]) * float(k[j, c]) for c in range(d)) / math.sqrt(d) for j in keys}
        top = max(scores.values())
        exp = {j: math.exp(s - top) for j, s in scores.items()}
        z = sum(exp.values())
        for c in range(dv):
            out[i, c] = sum(exp[j] / z * float(v[j, c]) for j in keys)
    return out


def manual_layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as in LayerNorm
    y = (x - mean) / torch.sqrt(var + ln.eps) * ln.weight
    return y + ln.bias if ln.bias is not None else y


def qkv(B=2, H=2, T=5, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))


# ---------------------------------------------------------------------------------- reference attention
def test_reference_attention_equals_hand_computation():
    q, k, v = qkv(B=1, H=1, T=4, d=3)
    v = torch.randn(1, 1, 4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # d_v != d_k
    out, weights = reference_attention(q, k, v)
    assert out.shape == (1, 1, 4, 5) and weights.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], hand_attention(q[0, 0], k[0, 0], v[0, 0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, 4, dtype=torch.float64))


def test_reference_attention_tiny_example_by_hand():
    # one query, two keys: scores (1*1 + 0*0)/sqrt(2) and (1*0 + 0*1)/sqrt(2)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[10.0], [20.0]], dtype=torch.float64)
    w0 = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1.0)
    out, weights = reference_attention(q, k, v)
    torch.testing.assert_close(weights, torch.tensor([[w0, 1 - w0]], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[10 * w0 + 20 * (1 - w0)]], dtype=torch.float64))


def test_reference_attention_with_mask_and_empty_row():
    q, k, v = qkv(B=1, H=1, T=4, d=3, seed=1)
    allowed = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    out, weights = reference_attention(q, k, v, allowed)
    torch.testing.assert_close(out[0, 0], hand_attention(q[0, 0], k[0, 0], v[0, 0], allowed.tolist()))
    assert not out.isnan().any() and not weights.isnan().any()
    assert torch.equal(out[0, 0, 1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(weights[0, 0, 1], torch.zeros(4, dtype=torch.float64))
    assert torch.all(weights[0, 0][~allowed] == 0)


# ---------------------------------------------------------------------------------- masks
def test_causal_mask_values():
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # the 2 queries are positions 2 and 3 of 4
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(1, 5).tolist() == [[True] * 5]
    assert causal_mask(3, 3).dtype == torch.bool


def test_attention_mask_build_without_padding():
    plain = AttentionMask.build(None, 4, 4, causal=False)
    assert plain.allowed is None and not plain.is_causal and plain.empty_rows is None
    assert plain.as_bool(4, 4, torch.device("cpu")) is None

    causal = AttentionMask.build(None, 4, 4, causal=True)
    assert causal.allowed is None and causal.is_causal and causal.empty_rows is None
    assert torch.equal(causal.as_bool(4, 4, torch.device("cpu")), causal_mask(4, 4)[None, None])

    one_query = AttentionMask.build(None, 1, 6, causal=True)  # decoding step: sees everything
    assert one_query.allowed is None and not one_query.is_causal

    chunk = AttentionMask.build(None, 2, 5, causal=True)  # 2 new tokens after 3 cached ones
    assert not chunk.is_causal
    assert chunk.allowed.shape == (1, 1, 2, 5)
    assert chunk.allowed[0, 0].tolist() == [[True, True, True, True, False], [True] * 5]

    all_real = AttentionMask.build(torch.ones(2, 4, dtype=torch.long), 4, 4, causal=True)
    assert all_real.allowed is None and all_real.is_causal


def test_attention_mask_build_with_padding():
    pad = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    m = AttentionMask.build(pad, 4, 4, causal=False)
    assert m.allowed.shape == (2, 1, 4, 4) and not m.is_causal and m.empty_rows is None
    for b in range(2):
        for i in range(4):
            assert m.allowed[b, 0, i].tolist() == pad[b].bool().tolist()

    m = AttentionMask.build(pad, 4, 4, causal=True)
    # left-padded row 1: query 0 is padding and sees only itself (padding) -> an empty row
    assert m.empty_rows is not None and m.empty_rows.shape == (2, 1, 4, 1)
    assert m.empty_rows[:, 0, :, 0].tolist() == [[False] * 4, [True, False, False, False]]
    expected = [
        [[True, False, False, False], [True, True, False, False], [True, True, True, False], [True, True, True, False]],
        [
            [False, False, False, False],
            [False, True, False, False],
            [False, True, True, False],
            [False, True, True, True],
        ],
    ]
    assert m.as_bool(4, 4, torch.device("cpu"))[:, 0].tolist() == expected
    # the fast path lets the empty row attend everywhere (finite), the output is zeroed later
    assert m.allowed[1, 0, 0].tolist() == [True] * 4

    m = AttentionMask.build(torch.tensor([[1, 1, 0, 1]]), 1, 4, causal=True)  # one decoding step
    assert m.allowed[0, 0].tolist() == [[True, True, False, True]] and m.empty_rows is None


# ---------------------------------------------------------------------------------- multi-head attention
@pytest.fixture()
def mha() -> MultiHeadAttention:
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4).eval()
    with torch.no_grad():  # non-zero biases, so a wrong bias split would show
        m.qkv.bias.normal_()
        m.proj.bias.normal_()
    return m


PADDINGS = {
    "right": torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]),
    "left": torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]),
}


@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_fast_path_equals_reference(mha, padding, causal):
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    pad = PADDINGS[padding] if padding else None
    mask = AttentionMask.build(pad, 7, 7, causal=causal)
    fast, no_weights = mha(x, mask)
    ref, weights = mha(x, mask, output_attentions=True)
    assert no_weights is None and weights.shape == (3, 4, 7, 7)
    assert fast.shape == (3, 7, 32)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    # and the reference path is the formula, head by head
    q, k, v = mha.qkv(x).split(32, dim=2)
    heads = lambda t: t.view(3, 7, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    allowed = torch.ones(3, 7, 7, dtype=torch.bool)
    if pad is not None:
        allowed &= pad.bool()[:, None, :]
    if causal:
        allowed &= torch.ones(7, 7, dtype=torch.bool).tril()
    for b in range(3):
        y = torch.cat(
            [hand_attention(q[b, h].detach(), k[b, h].detach(), v[b, h].detach(), allowed[b]) for h in range(4)], dim=1
        )  # (T, C), heads concatenated
        expected = y.float() @ mha.proj.weight.T + mha.proj.bias
        torch.testing.assert_close(ref[b], expected, rtol=0, atol=1e-5)


def test_mha_output_attentions_weights_respect_mask(mha):
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    pad = PADDINGS["left"]
    _, w = mha(x, AttentionMask.build(pad, 7, 7, causal=True), output_attentions=True)
    allowed = pad.bool()[:, None, None, :] & torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.all(w[~allowed.expand_as(w)] == 0)
    row_sums = w.sum(-1)
    has_key = allowed.any(-1).expand_as(row_sums)
    torch.testing.assert_close(row_sums[has_key], torch.ones(int(has_key.sum())))
    assert torch.all(row_sums[~has_key] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_give_zeros_and_finite_gradients(mha, causal):
    # row 1 is all padding; with causal=True the left padding of row 2 also makes empty rows
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    mask = AttentionMask.build(pad, 5, 5, causal=causal)
    assert mask.empty_rows is not None
    for output_attentions in (False, True):
        x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
        mha.zero_grad()
        y, _ = mha(x, mask, output_attentions=output_attentions)
        assert not y.isnan().any()
        # a query with nothing to attend to outputs zero, so its result is just W^O's bias
        for b, i in [(1, 0), (1, 4)] + ([(2, 0), (2, 1)] if causal else []):
            torch.testing.assert_close(y[b, i], mha.proj.bias.detach())
        (y**2).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in mha.parameters())
        assert torch.all(x.grad[1] == 0)  # an all-padding row influences nothing


def test_mha_with_kv_cache_equals_full_causal_pass(mha):
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    full, _ = mha(x, AttentionMask.build(None, 6, 6, causal=True))
    cache = KVCache(n_layer=1, batch_size=2, n_heads=4, max_len=6, head_dim=8)
    prefix, _ = mha(x[:, :4], AttentionMask.build(None, 4, 4, causal=True), cache=cache)
    cache.advance(4)
    steps = [prefix]
    for t in (4, 5):
        y, _ = mha(x[:, t : t + 1], AttentionMask.build(None, 1, t + 1, causal=True), cache=cache)
        cache.advance(1)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_mha_rejects_indivisible_width():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        MultiHeadAttention(30, 4)


# ---------------------------------------------------------------------------------- KV cache
def test_kv_cache_update_and_advance():
    cache = KVCache(n_layer=2, batch_size=2, n_heads=3, max_len=5, head_dim=4)
    assert cache.k.shape == (2, 2, 3, 5, 4) and cache.length == 0
    k1, v1 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    k, v = cache.update(0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    assert cache.length == 0  # update does not move the write position; advance does
    k_other, _ = cache.update(1, -k1, -v1)  # the other layer writes at the same positions
    assert torch.equal(k_other, -k1)
    cache.advance(3)
    assert cache.length == 3
    k2, v2 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k, v = cache.update(0, k2, v2)
    assert k.shape == (2, 3, 5, 4)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert torch.equal(cache.k[1, :, :, :3], -k1)  # layer 1 untouched by layer 0's write


def test_kv_cache_full_error():
    cache = KVCache(n_layer=1, batch_size=1, n_heads=1, max_len=4, head_dim=2)
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    cache.advance(3)
    with pytest.raises(ValueError, match="KV cache is full: 5 positions needed, 4 allocated"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    k, _ = cache.update(0, torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))  # exactly full is fine
    assert k.shape == (1, 1, 4, 2)


def test_kv_cache_reorder_keeps_rows():
    """reorder keeps the chosen rows' filled positions (keys and values, every layer), rows may repeat, and
    decoding goes on from there."""
    cache = KVCache(n_layer=2, batch_size=3, n_heads=1, max_len=4, head_dim=1)
    for step in range(2):  # two positions written, as two decode steps would
        for layer in range(2):
            k = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1) + 10 * step + 100 * layer
            cache.update(layer, k, -k)
        cache.advance(1)
    cache.reorder(torch.tensor([2, 0, 0]))
    assert cache.k.shape == (2, 3, 1, 4, 1)
    assert cache.k[1, :, 0, :2, 0].tolist() == [[103.0, 113.0], [101.0, 111.0], [101.0, 111.0]]
    assert torch.equal(cache.v[:, :, :, :2], -cache.k[:, :, :, :2])
    k, v = cache.update(0, torch.full((3, 1, 1, 1), 7.0), torch.full((3, 1, 1, 1), -7.0))
    assert k[:, 0, :, 0].tolist() == [[3.0, 13.0, 7.0], [1.0, 11.0, 7.0], [1.0, 11.0, 7.0]]
    assert torch.equal(v, -k)


@pytest.mark.parametrize("index", [[0, 0, 2, 3], [1, 0, 2, 3], [3, 1, 2, 0], [2, 2, 0, 0], [0, 1, 2, 3]])
def test_kv_cache_reorder_equals_gathering_the_rows(index):
    """Whether few rows move (copied in place, even when rows swap) or many (a new buffer), the filled
    positions after reorder are exactly those of the chosen rows."""
    torch.manual_seed(0)
    cache = KVCache(n_layer=2, batch_size=4, n_heads=2, max_len=6, head_dim=3)
    for layer in range(2):
        cache.update(layer, torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3))
    cache.advance(3)
    want_k, want_v = cache.k[:, index, :, :3].clone(), cache.v[:, index, :, :3].clone()
    cache.reorder(torch.tensor(index))
    assert torch.equal(cache.k[:, :, :, :3], want_k) and torch.equal(cache.v[:, :, :, :3], want_v)


# ---------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("dim", [6, 7])
def test_sinusoidal_table_matches_formula(dim):
    table = sinusoidal_table(50, dim)
    assert table.shape == (50, dim) and table.dtype == torch.float32
    for pos in (0, 1, 7, 49):
        for i in range((dim + 1) // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-7)
            if 2 * i + 1 < dim:
                assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-7)
    if dim == 7:  # the last column of an odd width is a sine
        assert table[3, 6].item() == pytest.approx(math.sin(3 / 10000 ** (6 / 7)), abs=1e-7)


def test_sinusoidal_embedding_looks_up_positions():
    emb = SinusoidalPositionalEmbedding(16, 8)
    assert list(emb.parameters()) == []
    assert "table" not in emb.state_dict()  # fixed, not saved
    ids = torch.tensor([[0, 3, 15], [2, 2, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 8)
    assert out[0, 1, 0].item() == pytest.approx(math.sin(3.0), abs=1e-7)
    assert out[1, 2, 3].item() == pytest.approx(math.cos(1 / 10000 ** (2 / 8)), abs=1e-7)


def test_learned_positions_look_up_rows():
    torch.manual_seed(0)
    emb = LearnedPositionalEmbedding(10, 4)
    ids = torch.tensor([[0, 9, 4]])
    assert torch.equal(emb(ids), emb.weight[ids])
    assert emb.weight.requires_grad and emb.num_positions == 10


def test_rotary_rotates_pairs_by_hand():
    rope = RotaryEmbedding(head_dim=4, max_positions=8)
    x = torch.zeros(1, 1, 8, 4)
    x[0, 0, 5] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = rope(x, torch.arange(8))
    p = 5
    # pair (0, 2) turns by p * 10000^0, pair (1, 3) by p * 10000^(-2/4)
    a0, a1 = p * 1.0, p / 100.0
    expected = [
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
    ]
    assert out[0, 0, 5].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.all(out[0, 0, :5] == 0) and torch.all(out[0, 0, 6:] == 0)
    # position 0 is the identity
    x0 = torch.randn(1, 1, 1, 4)
    torch.testing.assert_close(rope(x0, torch.tensor([0])), x0)


def test_rotary_dot_products_depend_only_on_offset():
    rope = RotaryEmbedding(head_dim=8, max_positions=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def score(m: int, n: int) -> float:
        qm = rope(q.view(1, 1, 1, 8), torch.tensor([[m]]))
        kn = rope(k.view(1, 1, 1, 8), torch.tensor([[n]]))
        return float((qm * kn).sum())

    for offset in (0, 3, 11):
        values = [score(n + offset, n) for n in (0, 5, 20, 40)]
        assert values == pytest.approx([values[0]] * 4, abs=1e-4)
    assert abs(score(3, 0) - score(11, 0)) > 1e-3  # but it does depend on the offset
    # rotation keeps the norm
    r = rope(q.view(1, 1, 1, 8), torch.tensor([[13]]))
    assert float(r.norm()) == pytest.approx(float(q.norm()), rel=1e-6)


def test_rotary_batched_positions_and_odd_head_dim():
    rope = RotaryEmbedding(head_dim=4, max_positions=16)
    x = torch.randn(2, 3, 5, 4)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])  # (B, T), e.g. left padding
    out = rope(x, pos)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], rope(x[b : b + 1], pos[b]))
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryEmbedding(head_dim=5, max_positions=8)


# ---------------------------------------------------------------------------------- layers
def test_activations_match_torch():
    x = torch.linspace(-4, 4, 41)
    torch.testing.assert_close(
        get_activation("gelu_new")(x), 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    )
    torch.testing.assert_close(get_activation("gelu")(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(get_activation("relu")(x), x.clamp(min=0))
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        get_activation("swishy")


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_feed_forward_formula(activation):
    torch.manual_seed(0)
    ff = FeedForward(8, 24, activation=activation)
    x = torch.randn(2, 3, 8)
    act = {"gelu_new": lambda t: F.gelu(t, approximate="tanh"), "relu": torch.relu}[activation]
    h = act(x @ ff.fc.weight.T + ff.fc.bias)
    torch.testing.assert_close(ff(x), h @ ff.proj.weight.T + ff.proj.bias)
    assert ff.fc.weight.shape == (24, 8) and ff.proj.weight.shape == (8, 24)


def test_layer_norm_without_bias():
    ln = layer_norm(8, bias=False)
    assert ln.bias is None
    assert [n for n, _ in ln.named_parameters()] == ["weight"]
    with torch.no_grad():
        ln.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    torch.testing.assert_close(ln(x), manual_layer_norm(x, ln))
    assert {n for n, _ in layer_norm(8).named_parameters()} == {"weight", "bias"}
    block = TransformerBlock(16, 2, 32, bias=False)
    assert not [n for n, _ in block.named_parameters() if n.endswith("bias")]


def _block_pair():
    torch.manual_seed(0)
    pre = TransformerBlock(16, 2, 64, norm_position="pre").eval()
    with torch.no_grad():  # non-trivial norms, so ln_1 and ln_2 are told apart
        for p in pre.parameters():
            p.add_(0.3 * torch.randn_like(p))
    post = TransformerBlock(16, 2, 64, norm_position="post").eval()
    post.load_state_dict(pre.state_dict())
    return pre, post


def test_transformer_block_pre_and_post_norm_formulas():
    pre, post = _block_pair()
    x = torch.randn(2, 5, 16)
    mask = AttentionMask.build(None, 5, 5, causal=True)

    def attn(block, h):
        return block.attn(h, mask)[0]

    h = x + attn(pre, manual_layer_norm(x, pre.ln_1))
    expected_pre = h + pre.mlp(manual_layer_norm(h, pre.ln_2))
    out_pre, _ = pre(x, mask)
    torch.testing.assert_close(out_pre, expected_pre)

    h = manual_layer_norm(x + attn(post, x), post.ln_1)
    expected_post = manual_layer_norm(h + post.mlp(h), post.ln_2)
    out_post, _ = post(x, mask)
    torch.testing.assert_close(out_post, expected_post)

    assert (out_pre - out_post).abs().max() > 0.1  # same weights, different wiring
    with pytest.raises(ValueError, match="norm_position must be 'pre' or 'post'"):
        TransformerBlock(16, 2, 64, norm_position="sandwich")


def test_transformer_block_returns_attention_weights():
    pre, _ = _block_pair()
    x = torch.randn(1, 4, 16)
    out, w = pre(x, AttentionMask.build(None, 4, 4, causal=True), output_attentions=True)
    assert w.shape == (1, 2, 4, 4)
    assert torch.all(w.triu(diagonal=1) == 0)
    torch.testing.assert_close(out, pre(x, AttentionMask.build(None, 4, 4, causal=True))[0], rtol=0, atol=1e-5)


def test_inference_fast_calls_equal_module_calls_and_respect_hooks():
    """`nn.inference.apply`: at inference a plain Linear/LayerNorm runs functionally on its weights, with
    exactly the module's result; a hooked module, a subclass or a recorded graph gets the ordinary call."""
    from lmforge import GPTConfig, GPTForCausalLM
    from lmforge.nn.inference import apply, hook_free

    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(8, 5), torch.nn.LayerNorm(8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(apply(linear, x), linear(x)) and torch.equal(apply(norm, x), norm(x))
    y = apply(linear, x.requires_grad_())  # grad enabled: the module call, graph recorded
    assert y.grad_fn is not None
    seen = []
    handle = linear.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    assert not hook_free(linear)
    with torch.no_grad():
        apply(linear, x)
    assert seen == [(3, 5)]  # the hook fired
    handle.remove()
    assert hook_free(linear)

    class Scaled(torch.nn.Linear):  # a subclass (as a LoRA layer might be) keeps its own forward
        def forward(self, inp):
            return 2 * super().forward(inp)

    scaled = Scaled(8, 5)
    with torch.no_grad():
        assert torch.equal(apply(scaled, x), 2 * F.linear(x, scaled.weight, scaled.bias))
    # a whole model: the same logits with and without autograd, and a hook on a block's qkv sees every token
    model = GPTForCausalLM(GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        fast = model(ids).logits
    # (eval mode without autograd may run the packed kernel: same values up to float rounding)
    torch.testing.assert_close(fast, model(ids).logits.detach(), rtol=1e-5, atol=1e-6)
    calls = []
    model.transformer.h[1].attn.qkv.register_forward_hook(lambda mod, args, out: calls.append(out.shape[1]))
    model.generate(ids[:1], max_new_tokens=3)
    assert calls == [7, 1, 1]  # prefill, then one call per new token but the last


@pytest.mark.parametrize("rows", [1, 2, 16, 37])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(rows, bias):
    """In eval mode without autograd, `apply` may run oneDNN's packed matmul (x86); its values equal
    F.linear's within float32 rounding for any row count, leading shape, bias or weight layout."""
    from lmforge.nn.inference import apply, decode_layout, packed_weight, packing_available, packs_one_row

    torch.manual_seed(rows)
    linear = torch.nn.Linear(64, 96, bias=bias).eval()
    for layout in ("row-major", "decode"):
        if layout == "decode":
            decode_layout(linear)
        x = torch.randn(rows, 3, 64) if rows > 1 else torch.randn(1, 1, 64)
        with torch.no_grad():
            y = apply(linear, x)
        assert y.shape == x.shape[:-1] + (96,)
        torch.testing.assert_close(y, x @ linear.weight.T + (linear.bias if bias else 0), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            packed = packed_weight(linear, x)
        # on x86 every row count is packed, but one row only with AVX-512 (F.linear is faster there on AVX2)
        assert (packed is not None) == (packing_available() and (rows > 1 or packs_one_row()))


def test_one_row_is_packed_only_with_avx512(monkeypatch):
    """Decoding one sequence multiplies one row: oneDNN's packed kernel where the CPU has AVX-512, F.linear on
    AVX2 CPUs (where oneDNN's per-call cost exceeds the product's); two rows are packed on every x86 CPU. The
    values agree within float32 rounding either way."""
    import lmforge.nn.inference as inference

    capability = torch.backends.cpu.get_cpu_capability()
    assert inference.packs_one_row() == capability.startswith("AVX512")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).eval()
    one, two = torch.randn(1, 1, 64), torch.randn(2, 64)
    results = {}
    for avx512 in (True, False):
        monkeypatch.setattr(inference, "packs_one_row", lambda avx512=avx512: avx512)
        with torch.no_grad():
            assert (inference.packed_weight(linear, one) is not None) == (inference.packing_available() and avx512)
            assert (inference.packed_weight(linear, two) is not None) == inference.packing_available()
            results[avx512] = inference.apply(linear, one)
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[False], F.linear(one, linear.weight, linear.bias), rtol=0, atol=0)


def test_row_buckets_are_few_and_tight():
    """A packed matmul runs at a bucketed row count: never fewer rows than given, at most one step (8, 64 or
    256 rows) more, and few sizes in all, so a server packing prompts of any length compiles few kernels."""
    from lmforge.nn.inference import row_bucket

    buckets = [row_bucket(r) for r in range(1, 2049)]
    assert [row_bucket(r) for r in range(9)] == list(range(9))  # decoding a few rows: as is
    assert row_bucket(9) == 16 and row_bucket(129) == 192 and row_bucket(1025) == 1280
    assert all(b >= r and b - r < (8 if r <= 128 else 64 if r <= 1024 else 256) for r, b in enumerate(buckets, 1))
    assert len(set(buckets)) == 41


@pytest.mark.skipif(not packing_available(), reason="oneDNN's packed matmul runs on x86 CPUs only")
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
def test_padded_rows_leave_each_rows_result_unchanged(activation):
    """Rows padded up to a bucket: each row's output is what the same matmul at exactly that many rows gives
    (the padding changes no real row's sums), and F.linear's within float32 rounding."""
    from lmforge.nn.inference import (
        FUSED_ACTIVATIONS,
        apply,
        apply_activated,
        fuses_tanh_gelu,
        gelu_tanh_sigmoid_,
        packed_weight,
        row_bucket,
    )

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 160).eval()
    x = torch.randn(300, 64)
    post, algorithm = FUSED_ACTIVATIONS.get(activation, ("none", ""))
    apart = activation == "gelu_new" and not fuses_tanh_gelu()  # the GELU after the product (AVX2 CPUs)
    with torch.no_grad():
        packed = packed_weight(linear, x)
        for rows in (9, 13, 37, 100, 129, 250):
            assert row_bucket(rows) != rows
            y = apply(linear, x[:rows]) if activation == "none" else apply_activated(linear, x[:rows], activation)
            if apart:
                exact = torch.ops.mkldnn._linear_pointwise(x[:rows], packed, linear.bias, "none", [], "")
                exact = gelu_tanh_sigmoid_(exact)
            else:
                exact = torch.ops.mkldnn._linear_pointwise(x[:rows], packed, linear.bias, post, [], algorithm)
            assert y.shape == (rows, 160)
            torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6)
            ref = F.linear(x[:rows], linear.weight, linear.bias)
            ref = ref if activation == "none" else F.gelu(ref, approximate="tanh")
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_tanh_gelu_through_a_sigmoid_is_gpt2s_gelu():
    """x * sigmoid(2u) is 0.5x(1 + tanh(u)) (GPT-2's GELU): against float64 as close as PyTorch's own tanh GELU,
    computed in place."""
    from lmforge.nn.inference import gelu_tanh_sigmoid_

    x = torch.cat([torch.linspace(-12, 12, 20001), torch.randn(20000) * 3])
    u = math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)
    exact = 0.5 * x.double() * (1 + torch.tanh(u))
    y = x.clone()
    assert gelu_tanh_sigmoid_(y) is y
    ours = (y.double() - exact).abs().max().item()
    torchs = (F.gelu(x, approximate="tanh").double() - exact).abs().max().item()
    assert ours <= max(2 * torchs, 1e-6), (ours, torchs)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not packing_available(), reason="oneDNN's packed matmul runs on x86 CPUs only")
def test_the_tanh_gelu_is_fused_into_the_product_only_with_avx512(monkeypatch):
    """On AVX-512 CPUs oneDNN applies GPT-2's GELU as the packed product is written; elsewhere the product is
    followed by `gelu_tanh_sigmoid_` (oneDNN's post-op is slower there than PyTorch's sigmoid). Both agree within
    float32 rounding; one row on AVX2 (F.linear) keeps PyTorch's own GELU."""
    import lmforge.nn.inference as inference

    assert inference.fuses_tanh_gelu() == torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 256).eval()
    x = torch.randn(24, 64)
    results = {}
    with torch.no_grad():
        packed = inference.packed_weight(linear, x)
        plain = torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")
        for fused in (True, False):
            monkeypatch.setattr(inference, "fuses_tanh_gelu", lambda fused=fused: fused)
            results[fused] = inference.apply_activated(linear, x, "gelu_new")
        assert torch.equal(
            results[True], torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "gelu", [], "tanh")
        )
        assert torch.equal(results[False], inference.gelu_tanh_sigmoid_(plain.clone()))
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)


def test_packed_weights_follow_every_change_of_the_weights():
    """The packed copy never serves stale weights: after an optimizer step (fused AdamW leaves the version
    counter alone), load_state_dict, `weight.data = ...`, or a training forward, eval calls see the new values;
    a model in training mode is not packed; a model that used packed weights still deep-copies and pickles."""
    import copy
    import pickle
    import platform

    from lmforge.nn.inference import _packed, apply, forget_packed, packing_available

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48).eval()
    x = torch.randn(8, 32)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(apply(linear, x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)

    check()
    assert (linear in _packed) == packing_available()
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available():
        assert packing_available()  # CI's x86 machines run the packed path, not only the fallback
    optimizer = torch.optim.AdamW(linear.parameters(), lr=0.5, fused=True)
    linear.train()
    apply(linear, x).square().sum().backward()  # a training forward drops the copy
    assert linear not in _packed
    optimizer.step()
    linear.eval()
    check()
    linear.load_state_dict({"weight": torch.randn(48, 32), "bias": torch.randn(48)})
    check()
    linear.weight.data = torch.randn(32, 48).t()  # new storage
    check()
    with torch.no_grad():
        linear.weight.mul_(-1.0)  # in place: the version counter moves
    check()
    linear.weight.data.mul_(2.0)  # through .data: nothing records it; forget_packed is the documented remedy
    forget_packed(linear)
    assert linear not in _packed
    check()
    linear.train()
    with torch.no_grad():
        assert torch.equal(apply(linear, x), F.linear(x, linear.weight, linear.bias))  # not packed in training
    linear.eval()
    check()
    clone = copy.deepcopy(linear)
    again = pickle.loads(pickle.dumps(linear))
    with torch.no_grad():
        torch.testing.assert_close(apply(clone, x), apply(linear, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(apply(again, x), apply(linear, x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # weights created under inference_mode (as a server's load) have no version counter
        made = torch.nn.Linear(32, 48).eval()
        torch.testing.assert_close(apply(made, x), F.linear(x, made.weight, made.bias), rtol=1e-5, atol=1e-5)
    linear.double()  # a packed layer converted: no float32 copy is used for it any more
    with torch.no_grad():
        assert torch.equal(apply(linear, x.double()), F.linear(x.double(), linear.weight, linear.bias))


def test_fast_calls_read_swapped_parameters():
    """`torch.func.functional_call` swaps a model's parameters for the call: the fast inference path (which
    reads parameters without nn.Module's `__getattr__`) computes with the swapped ones, as the module would."""
    from lmforge import GPTConfig, GPTForCausalLM

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=16, tie_word_embeddings=False)
    model, other = GPTForCausalLM(config).eval(), GPTForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        own = model(ids).logits
        swapped = torch.func.functional_call(model, dict(other.named_parameters()), (ids,)).logits
        torch.testing.assert_close(swapped, other(ids).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, own, rtol=0, atol=0)  # and the model's own weights after


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # said by mkldnn.flags() on builds without Intel GPUs
def test_packed_linear_can_be_turned_off(monkeypatch):
    """LMFORGE_PACKED_LINEAR=0 (read once per process) and torch.backends.mkldnn.flags(enabled=False) give
    exactly F.linear's result."""
    from lmforge.nn import inference

    linear = torch.nn.Linear(32, 48).eval()
    x = torch.randn(8, 32)
    inference.packing_available.cache_clear()
    monkeypatch.setenv("LMFORGE_PACKED_LINEAR", "0")
    try:
        assert not inference.packing_available()
        with torch.no_grad():
            assert torch.equal(inference.apply(linear, x), F.linear(x, linear.weight, linear.bias))
    finally:
        inference.packing_available.cache_clear()
    monkeypatch.delenv("LMFORGE_PACKED_LINEAR")
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(inference.apply(linear, x), F.linear(x, linear.weight, linear.bias))


def test_compiled_model_leaves_kernels_to_the_compiler():
    """Under `torch.compile` an eval-mode model's Linears trace as plain linear ops, not as lmforge's packed
    oneDNN calls (whose weight copies are not graph constants: inductor's freezing failed on them), and the
    compiled forward gives the eager logits."""
    from lmforge import GPTConfig, GPTForCausalLM

    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=64, n_positions=32, n_layer=2, n_head=2, n_embd=32)).eval()
    ids = torch.randint(0, 64, (3, 10))
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend=backend)(ids).logits
    torch._dynamo.reset()
    assert any("linear" in t for t in seen), seen
    assert not any("_linear_pointwise" in t for t in seen), seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["none", "padded", "empty source"])
def test_cross_attention_shares_keys_values_within_a_group(padding):
    """Rows in groups of copies of one source (beams) keep one copy of the cross-attention keys/values per group;
    outputs equal those of one copy per row, for decode steps and a longer prefix, with source padding, and
    when a source is all padding (the plain path then runs)."""
    from lmforge.nn import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(16, 4).eval()
    G, g, S = 3, 2, 5
    memory = torch.randn(G, S, 16).repeat_interleave(g, 0)  # (G * g, S, C): each source's rows are copies
    pad = torch.ones(G, S, dtype=torch.long)
    if padding != "none":
        pad[1, 3:] = 0
    if padding == "empty source":
        pad[2] = 0
    pad = None if padding == "none" else pad.repeat_interleave(g, 0)
    caches = {1: KVCache(1, G * g, 4, 8, 4), g: KVCache(1, G * g, 4, 8, 4)}
    caches[g].cross_group = g
    with torch.no_grad():
        for T in (3, 1, 1):
            x = torch.randn(G * g, T, 16)
            mask = AttentionMask.build(pad, T, S, causal=False)
            (want, _), (got, _) = (attn(x, memory, mask, caches[n], 0) for n in (1, g))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert caches[g].cross[0][0].shape == (G, 4, S, 4) and caches[1].cross[0][0].shape == (G * g, 4, S, 4)


@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_values_and_gradients(shape, bias):
    """nn.cpu_linear.linear: the forward and the three gradients equal F.linear's to float32 rounding, for 2-D and
    3-D inputs, with and without bias, and only the gradients asked for are computed."""
    from lmforge.nn.cpu_linear import linear
    from lmforge.nn.inference import packing_available

    assert packing_available() or platform_is_not_x86(), "x86 machines must run the oneDNN path"
    if not packing_available():
        return
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(17, 33, requires_grad=True)
    b = torch.randn(17, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 17)
    params = [t for t in (x, w, b) if t is not None]
    y = linear(x, w, b)
    got = torch.autograd.grad(y, params, grad)
    want_y = F.linear(x, w, b)
    want = torch.autograd.grad(want_y, params, grad)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)
    frozen = torch.randn(17, 33)  # a frozen weight (LoRA's base): only dX
    (gx,) = torch.autograd.grad(linear(x, frozen).sum(), [x])
    torch.testing.assert_close(gx, torch.ones(*shape[:-1], 17) @ frozen, rtol=1e-5, atol=1e-5)


def platform_is_not_x86() -> bool:
    import platform

    return platform.machine().lower() not in ("x86_64", "amd64")


def test_training_matmul_choice_follows_the_environment(monkeypatch):
    """LMFORGE_TRAINING_MATMUL=onednn / aten decides which kernel a Linear with autograd runs (seen in the graph);
    a model trained a step either way reaches the same loss to float32 rounding; a bad value is named."""
    from lmforge import GPTConfig, GPTForCausalLM
    from lmforge.nn import cpu_linear
    from lmforge.nn.inference import apply, packing_available

    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    losses = {}
    try:
        for choice in ("onednn", "aten"):
            monkeypatch.setenv("LMFORGE_TRAINING_MATMUL", choice)
            cpu_linear.training_onednn.cache_clear()
            name = type(apply(linear, x).grad_fn).__name__
            onednn = choice == "onednn" and packing_available()
            assert ("OneDNN" in name) == onednn, name
            torch.manual_seed(0)
            model = GPTForCausalLM(GPTConfig(vocab_size=64, n_positions=16, n_layer=2, n_head=2, n_embd=32))
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
            for _ in range(3):
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            losses[choice] = model(ids, labels=ids).loss.item()
        assert losses["onednn"] == pytest.approx(losses["aten"], rel=1e-4)
        monkeypatch.setenv("LMFORGE_TRAINING_MATMUL", "mkl")
        cpu_linear.training_onednn.cache_clear()
        with pytest.raises(ValueError, match="LMFORGE_TRAINING_MATMUL must be auto, onednn or aten; got 'mkl'"):
            apply(linear, x)
    finally:
        monkeypatch.delenv("LMFORGE_TRAINING_MATMUL", raising=False)
        cpu_linear.training_onednn.cache_clear()
