"""One forward of the scheduler's step: the slot cache it runs over, and the same forward as one TorchScript function.

`SlotCache` holds the keys and values of every sequence the scheduler decodes, one row ("slot") each, and does a
step's attention (`attend_slots`). `CompiledStep` runs a GPT-2-style model's whole step (embeddings, blocks, output
layer) over that cache as one TorchScript function: the same kernels in the same order as the model's modules,
so the same logits bit for bit, called from TorchScript's interpreter instead of Python. In a server's step the
model is small and the batch a few rows, so much of the step is not arithmetic but the Python between ~100 small
kernels, and that Python costs several times what a loop measures: the kernels push the interpreter's data out
of the CPU's caches. On a 2-core AMD EPYC (Zen 3) a 16-row decoding step of the quick-start model took 3.3 ms
this way against 4.5 ms through the modules (BENCHMARKS.md, 2026-12-05); `torch.compile` made the same step
3-5x slower (dynamic shapes; BENCHMARKS.md, the entry of 2026-12-04 23:56).

TorchScript is deprecated as of PyTorch 2.13 (`torch.jit.script` warns); lmforge uses it for this one function.
Where it cannot be built (a PyTorch without TorchScript, a model this step does not cover: other positions or
blocks, LoRA layers, two-pass int8 layers, hooks) the scheduler calls the model's modules instead, with the same
results; `lmforge serve --enforce-eager` always does. Int8 models (`--quantize int8`) take the step too: one
stream 1.7x and sixteen 1.2x faster than through the modules on that EPYC (BENCHMARKS.md, 2026-12-05 05:00).

(No `from __future__ import annotations` in this file: TorchScript needs the NamedTuples' annotations as types.)
"""

import json
import logging
import math
import threading
import warnings
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.constants import context_length
from lmforge.models.gpt import GPTForCausalLM
from lmforge.nn.attention import PackedCache
from lmforge.nn.inference import (
    FUSED_ACTIVATIONS,
    fuses_tanh_gelu,
    gelu_tanh_sigmoid_,
    hook_free,
    packed_linear,
    packed_weight,
    packs_one_row,
)
from lmforge.nn.layers import ACTIVATIONS, TransformerBlock
from lmforge.nn.positions import LearnedPositionalEmbedding
from lmforge.nn.quantize import Int8Linear, Int8Packed, int8_linear

log = logging.getLogger("lmforge.serve")


# ---------------------------------------------------------------------------------------------- the slot cache
class Bound(NamedTuple):
    """Where one step's tokens go in a SlotCache, and what its decoding rows attend over (`SlotCache.bind`)."""

    k_rows: list[Tensor]  # per layer, the cache seen as (slots * H * ctx, hs): the rows new keys are copied into
    v_rows: list[Tensor]
    index: Tensor  # (H * T,) each (head, token)'s row there, head-major
    kd: Tensor  # (n_layer, rows, H, width, hs): the decoding rows' keys up to the longest row (a view)
    vd: Tensor
    mask: Tensor | None  # (rows, 1, 1, width), added to the scores where the rows' lengths differ
    rows: int  # decoding rows: the first `rows` tokens, one per row
    segments: list[tuple[int, int]]  # (start, length) of each prompt after them


def attend_slots(q: Tensor, k: Tensor, v: Tensor, bound: Bound, layer: int) -> Tensor:
    """A step's attention in one layer (see `SlotCache`): q, k, v (1, H, T, hs) -> (1, T, H * hs), heads side by side.

    The new keys/values are stored at `bound.index`; the first `bound.rows` queries attend over their rows of the
    cache, each segment after them is a prompt attending causally over itself."""
    k_rows, v_rows, index, rows = bound.k_rows[layer], bound.v_rows[layer], bound.index, bound.rows
    hs = k.size(-1)
    k_rows.index_copy_(0, index, k[0].reshape(-1, hs))  # k[0]: (H, T, hs), copied (H * T, hs)
    v_rows.index_copy_(0, index, v[0].reshape(-1, hs))
    parts: list[Tensor] = []
    if rows > 0:
        qd = q[0, :, :rows, None].transpose(0, 1)  # (rows, H, 1, hs): each row's one query
        yd = F.scaled_dot_product_attention(qd, bound.kd[layer], bound.vd[layer], attn_mask=bound.mask)
        parts.append(yd.reshape(1, rows, -1))  # (rows, H, 1, hs) -> (1, rows, H * hs)
    for start, length in bound.segments:  # a prompt over itself, as a prefill does
        end = start + length
        y = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=length > 1
        )  # (1, H, length, hs)
        parts.append(y.transpose(1, 2).reshape(1, length, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class SlotCache(PackedCache):
    """Keys and values of up to `slots` sequences, each in its own row from position 0: (n_layer, slots, H, ctx, hs).

    A step's input is one row of tokens (`nn.attention.PackedCache`): first the newest token of each decoding
    sequence (rows 0..n-1, one each, at its own length), then the whole prompt of each sequence being prefilled
    (a "segment" written into its own slot from position 0). `bind` says where each token goes; in each layer,
    `attend` stores the new keys/values and computes the attention: the decoding rows over their own rows of the
    cache (positions past a row's length masked), each prompt causally over itself. So prompts are prefilled in the
    same forward as the step (the weights are read once for both), and a prompt's attention is exactly that of
    `model.generate`'s prefill.
    """

    def __init__(self, model: Any, slots: int) -> None:
        probe = model.allocate_cache(1, 1)  # the model's own layout, dtype and device
        n_layer, _, heads, _, head_dim = probe.k.shape
        self.ctx = context_length(model.config)
        shape = (n_layer, slots, heads, self.ctx, head_dim)
        self.k = torch.zeros(shape, dtype=probe.k.dtype, device=probe.k.device)
        self.v = torch.zeros_like(self.k)
        self.slots, self.heads = slots, heads
        self._head_offsets = torch.arange(heads, device=self.k.device) * self.ctx  # (H,) where each head's row starts
        self._columns = torch.arange(self.ctx, device=self.k.device)  # (ctx,) positions, for the padding mask
        # each layer's cache seen as (slots * H * ctx, hs), the rows the new keys/values are copied into
        self._k_rows = [self.k[i].view(-1, head_dim) for i in range(n_layer)]
        self._v_rows = [self.v[i].view(-1, head_dim) for i in range(n_layer)]
        empty = torch.zeros(0, dtype=torch.long, device=self.k.device)
        self.bound = Bound(self._k_rows, self._v_rows, empty, self.k[:, :0], self.v[:, :0], None, 0, [])

    def bind(self, slots: Tensor, positions: Tensor, decoding: int, segments: list[tuple[int, int]]) -> None:
        """The next step's tokens: token i goes to slot slots[i] at positions[i]; the first `decoding` are rows
        0..decoding-1's newest tokens; `segments` are the (start, length) of each prompt after them."""
        device = self.k.device
        positions = positions.to(device)
        # where each (head, token)'s key goes in a layer's cache seen as (slots * H * ctx, hs): one index_copy_
        first = slots.to(device) * (self.heads * self.ctx) + positions  # (T,) the token's place for head 0
        index = (self._head_offsets[:, None] + first).flatten()  # (H * T,) head-major, as k[0] is laid out
        kd, vd, mask = self.k[:, :0], self.v[:, :0], None
        if decoding:
            lengths = positions[:decoding]  # (n,) each row's tokens before this one
            known = lengths.tolist()
            width = max(known) + 1
            # the decoding rows' keys/values up to the longest row, every layer: (n_layer, n, H, width, hs) views
            kd, vd = self.k[:, :decoding, :, :width], self.v[:, :decoding, :, :width]
            if min(known) != width - 1:  # rows of different lengths: hide what a row has not written
                hidden = self._columns[:width] > lengths[:, None]  # (n, width)
                mask = torch.zeros(hidden.shape, dtype=self.k.dtype, device=device).masked_fill_(hidden, -math.inf)
                mask = mask[:, None, None, :]  # (n, 1, 1, width), added to the scores
        self.bound = Bound(self._k_rows, self._v_rows, index, kd, vd, mask, decoding, segments)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: (1, H, T, hs) for the bound tokens -> the attention output, heads side by side: (1, T, H * hs)."""
        return attend_slots(q, k, v, self.bound, layer)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions to row `dst` (another choice of the same prompt, or to keep
        the active rows in 0..n-1)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


# ---------------------------------------------------------------------------------------------- the compiled step
class Linear(NamedTuple):
    """A Linear layer's tensors: oneDNN's packed copy of the weight where the model's `apply` runs it packed; for
    an `Int8Linear`, its int8 kernel's packed weight instead (and `weight` empty)."""

    weight: Tensor
    bias: Tensor | None
    packed: Tensor | None
    int8: Optional[Int8Packed]  # noqa: UP045 (`X | None` fails on a TorchScript class)


class Norm(NamedTuple):
    weight: Tensor
    bias: Tensor | None


class Block(NamedTuple):
    """A pre-norm block: x + proj(attention(ln_1(x))), then x + fc2(act(fc(ln_2(x))))."""

    ln_1: Norm
    qkv: Linear
    proj: Linear
    ln_2: Norm
    fc: Linear
    fc2: Linear


def _linear(
    x: Tensor, layer: Linear, one_row_packed: bool, post: str = "none", algorithm: str = "", fused_tanh: bool = True
) -> Tensor:
    """As the model's `apply` / `apply_activated` compute a Linear (and `post`, the activation, as FeedForward
    does): packed unless it is one row on a CPU where one row runs `F.linear` (`packs_one_row`); the tanh GELU
    after a packed product apart unless `fused_tanh` (`fuses_tanh_gelu`); an int8 layer as `Int8Linear`."""
    packed = layer.packed
    if packed is not None and (one_row_packed or x.numel() != x.size(-1)):
        if post == "gelu" and algorithm == "tanh" and not fused_tanh:
            return gelu_tanh_sigmoid_(packed_linear(x, packed, layer.bias))
        return packed_linear(x, packed, layer.bias, post, algorithm)
    int8 = layer.int8
    if int8 is not None:
        y = int8_linear(x, int8, layer.bias)
    else:
        y = F.linear(x, layer.weight, layer.bias)
    if post == "gelu":
        return torch.ops.aten.gelu_(y, approximate=algorithm)
    if post == "relu":
        return torch.relu_(y)
    if post == "swish":
        return F.silu(y, inplace=True)
    return y


def gpt_step(
    input_ids: Tensor,
    position_ids: Tensor,
    keep: Tensor | None,
    wte: Tensor,
    wpe: Tensor,
    blocks: list[Block],
    ln_f: Norm,
    head: Linear,
    heads: int,
    eps: float,
    post: str,
    algorithm: str,
    one_row_packed: bool,
    fused_tanh: bool,
    bound: Bound,
) -> Tensor:
    """GPTForCausalLM's forward over a bound SlotCache, op for op: input_ids, position_ids (1, T) -> logits
    (len(keep), V), or (T, V) when keep is None."""
    T = input_ids.size(1)
    x = F.embedding(input_ids, wte) + F.embedding(position_ids, wpe)  # (1, T, C)
    C = x.size(-1)
    hs = C // heads
    last = len(blocks) - 1
    for i, b in enumerate(blocks):
        h = torch.layer_norm(x, [C], b.ln_1.weight, b.ln_1.bias, eps)
        qkv = _linear(h, b.qkv, one_row_packed).view(1, T, 3, heads, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (1, H, T, hs), views into qkv
        y = attend_slots(q, k, v, bound, i)  # (1, T, C)
        x = x + _linear(y, b.proj, one_row_packed)
        if keep is not None and i == last:  # as TransformerBlock: the last feed-forward for kept positions only
            x = x[:, keep]  # (1, len(keep), C)
        h = torch.layer_norm(x, [C], b.ln_2.weight, b.ln_2.bias, eps)
        x = x + _linear(_linear(h, b.fc, one_row_packed, post, algorithm, fused_tanh), b.fc2, one_row_packed)
    x = torch.layer_norm(x, [C], ln_f.weight, ln_f.bias, eps)
    return _linear(x, head, one_row_packed)[0]


_script: Any = None  # gpt_step compiled by TorchScript (once per process), or the error that stopped it
_script_lock = threading.Lock()  # (two schedulers starting at once compile it once)


def _compiled_gpt_step() -> Any:
    global _script
    with _script_lock:
        if _script is None:
            try:
                with warnings.catch_warnings():  # deprecated as of PyTorch 2.13: see the module docstring
                    warnings.simplefilter("ignore", DeprecationWarning)
                    _script = torch.jit.script(gpt_step)
            except Exception as error:  # no TorchScript in this PyTorch, or an op it lacks: the modules run instead
                _script = error
    if isinstance(_script, Exception):
        raise RuntimeError(f"TorchScript could not compile the step: {_script}") from _script
    return _script


class CompiledStep:
    """`model(input_ids, position_ids=..., past_key_values=cache, logits_to_keep=keep).logits[0]` for a SlotCache,
    as one TorchScript call. Build it with `CompiledStep.build(model)` (None for a model it does not cover). It
    reads the weights when built, and reads them again when one of them has been replaced or changed in place (its
    version counter or storage differs) or a Linear layer swapped (raising if the model no longer suits the step,
    e.g. a LoRA layer: the scheduler then calls the modules). Float Linears and one-pass `Int8Linear`s on the
    packed int8 kernel (`lmforge serve --quantize int8`) are covered."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.fn = _compiled_gpt_step()
        self._read()

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why `model` cannot take this step (None when it can)."""
        if type(model) is not GPTForCausalLM:
            return f"{type(model).__name__} is not a GPTForCausalLM"
        c = model.config
        t = model.transformer
        if not isinstance(t.wpe, LearnedPositionalEmbedding):
            return f"position_embedding={c.position_embedding!r} (only 'learned')"
        if c.activation_function not in FUSED_ACTIVATIONS:
            return f"activation {c.activation_function!r}"
        if any(module.training for module in model.modules()):
            return "the model (or one of its layers) is in training mode"
        plain = {nn.Linear, nn.LayerNorm, nn.Embedding, LearnedPositionalEmbedding, TransformerBlock, Int8Linear}
        for name, module in model.named_modules():
            if not hook_free(module):
                return f"a hook on {name or 'the model'}"
            if not list(module.children()) and type(module) not in plain:
                return f"{name} is a {type(module).__name__}"  # e.g. a LoRA layer
            if type(module) is Int8Linear and (module.packed is None or module.passes != 1):
                why = "the reference kernel" if module.packed is None else f"{module.passes} passes"
                return f"{name} is an Int8Linear with {why} (only one pass on the packed kernel)"
        for block in t.h:
            if type(block) is not TransformerBlock or not block.pre_norm or block.attn.rotary is not None:
                return "a block that is not GPT-2's (pre-norm, learned positions)"
            if block.mlp.act is not ACTIVATIONS.get(block.mlp.activation):
                return "a feed-forward activation other than the config's"
        for p in model.parameters():
            if p.device.type != "cpu":
                return f"parameters on {p.device} (the step is built for the CPU)"
        return None

    @classmethod
    def build(cls, model: nn.Module) -> "CompiledStep | None":
        """The compiled step for `model`, or None (logged) where the model's modules must run instead."""
        try:
            why = cls.unsupported(model)
            if why is None:
                step = cls(model)
                log.info(json.dumps({"event": "step", "compiled": True}))
                return step
        except Exception as error:  # a speed-up only: whatever stops it, the modules serve
            why = str(error) if isinstance(error, RuntimeError) else f"{type(error).__name__}: {error}"
        log.info(json.dumps({"event": "step", "compiled": False, "reason": why}))
        return None

    def _read(self) -> None:
        """Read the model's tensors (and packed copies) as they are now."""
        m = self.model
        t = m.transformer
        # (where it was read: a module's _parameters, _buffers, _modules or __dict__; its name there; what was read)
        self._read_from: list[tuple[dict[str, Any], str, Any]] = []
        self._copied: list[tuple[Tensor, int, int]] = []  # (tensor, its data_ptr, its version) of each copy made

        def get(module: nn.Module, name: str) -> Any:
            for where in (module._parameters, module._buffers, module.__dict__):
                if name in where:
                    value = where[name]
                    self._read_from.append((where, name, value))
                    return value
            return getattr(module, name)

        def linear(parent: nn.Module, name: str) -> Linear:
            module = getattr(parent, name)
            if name in parent._modules:  # a layer swapped for another (e.g. quantized later) is noticed too
                self._read_from.append((parent._modules, name, module))
            if type(module) is Int8Linear:
                return Linear(torch.empty(0), get(module, "bias"), None, get(module, "packed"))
            # what the model's `apply` runs for a few rows: packed, or None where F.linear does
            packed = packed_weight(module, torch.zeros(2, module.in_features))
            weight = get(module, "weight")
            if packed is not None:
                self._copied.append((weight, weight.data_ptr(), _version(weight)))
            return Linear(weight, get(module, "bias"), packed, None)

        def norm(module: nn.LayerNorm) -> Norm:
            return Norm(get(module, "weight"), get(module, "bias"))

        self.blocks = [
            Block(norm(b.ln_1), linear(b.attn, "qkv"), linear(b.attn, "proj"), norm(b.ln_2), linear(b.mlp, "fc"),
                  linear(b.mlp, "proj"))
            for b in t.h
        ]  # fmt: skip
        # The embedding table row-major. A tied output layer stores the shared weight as (in, out) columns for
        # one-row products (`decode_layout`), which spreads each token's row over the whole table (a value every
        # V * 4 bytes, each on its own page): 72 rows took 95 us to gather from there, 6.5 us from a copy. So then
        # a row-major copy (V x C more floats): 16 streams' forwards 2-3.5% faster (BENCHMARKS.md, 2026-12-05).
        wte = get(t.wte, "weight")
        self.wte, self.wpe = wte.contiguous(), get(t.wpe, "weight")
        if self.wte is not wte:
            self._copied.append((wte, wte.data_ptr(), _version(wte)))
        self.ln_f, self.head = norm(t.ln_f), linear(m, "lm_head")
        self.heads, self.eps = m.config.n_head, t.ln_f.eps
        self.post, self.algorithm = FUSED_ACTIVATIONS[m.config.activation_function]
        self.one_row_packed, self.fused_tanh = packs_one_row(), fuses_tanh_gelu()

    def _current(self) -> bool:
        """Whether the tensors read are still the model's, and the copies made (packed weights, a row-major
        embedding) still of their tensors' values (a tensor changed in place, or given other storage through
        `.data`, is read as it is now anyway)."""
        for where, name, value in self._read_from:
            if where.get(name) is not value:
                return False
        for weight, ptr, version in self._copied:
            if weight.data_ptr() != ptr or _version(weight) != version:
                return False
        return True

    def __call__(self, input_ids: Tensor, position_ids: Tensor, cache: SlotCache, keep: Tensor | None) -> Tensor:
        """input_ids, position_ids (1, T) -> logits (len(keep), V), or (T, V) for keep None."""
        if not self._current():  # a weight or a layer changed: read the model again, if the step still suits it
            why = self.unsupported(self.model)
            if why is not None:
                raise RuntimeError(f"the model changed and no longer suits the compiled step: {why}")
            self._read()
        return self.fn(
            input_ids, position_ids, keep, self.wte, self.wpe, self.blocks, self.ln_f, self.head, self.heads,
            self.eps, self.post, self.algorithm, self.one_row_packed, self.fused_tanh, cache.bound,
        )  # fmt: skip


def _version(tensor: Tensor) -> int:
    """A tensor's version counter (0 for an inference tensor, which has none)."""
    return 0 if tensor.is_inference() else tensor._version
