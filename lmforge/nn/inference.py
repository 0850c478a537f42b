"""Calling a layer's leaf modules (Linear, LayerNorm) without nn.Module's per-call machinery at inference.

Decoding one token at a time runs every layer's ~6 leaf modules once per token on tiny tensors, so the
~2 µs that `module(x)` spends on hook bookkeeping before reaching the kernel is a visible share of a
step (6 layers x 6 leaves x 64 tokens). `apply(module, x)` gives exactly `module(x)`, running the same
kernel directly on the module's weights when nothing could observe the difference: no autograd graph
is being recorded, the module is a plain `nn.Linear` / `nn.LayerNorm` (not a subclass such as a LoRA
layer), and no hook is registered on it or globally. A module class may declare `direct_call = True`
(its forward records nothing for autograd, e.g. `Int8Linear`) to be called the same way. Otherwise it
calls the module as usual.

On x86 CPUs a float32 Linear of an eval-mode module called this way runs oneDNN's matmul on a copy of its
weight packed into oneDNN's blocked layout (made on first use, kept beside the module, remade when the weight
changes). PyTorch's default CPU matmul handles the few-row products of decoding poorly: on a 2-core AMD EPYC,
16 rows through a 384 x 1536 layer take 0.21 ms with `F.linear` and 0.07 ms packed, a 384 x 51865
vocabulary layer at 8 rows 6.7 ms instead of 2.0, and one row through the 24 Linears of a 6 x 384 GPT (weights
not in cache, as in any real decode step) 2.6 ms instead of 1.2. The cost is memory: the packed copy doubles
the memory of the Linear weights used for inference. `LMFORGE_PACKED_LINEAR=0` in the environment turns it off.
oneDNN compiles a kernel for each new row count, so products run at a few bucketed row counts (`row_bucket`):
a server's step packs prompts of any length (bucketing took 16 in-process streams from 3,007 to 3,428 tokens/s).
On CPUs without AVX-512 a single row (decoding one sequence) goes to `F.linear` instead (`packs_one_row`).
"""

from __future__ import annotations

import os
import weakref
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from lmforge.nn.cpu_linear import autograd_linear
from lmforge.utils import onednn_available

# Linear -> (weight, its data_ptr, its version, packed copy). Kept off the module: an opaque oneDNN tensor
# cannot be deep-copied or pickled, and a copied module simply packs its own weight again.
_packed: weakref.WeakKeyDictionary[nn.Module, tuple[Tensor, int, int, Tensor]] = weakref.WeakKeyDictionary()


def hook_free(module: nn.Module) -> bool:
    """True when calling `module` runs only its forward: no forward/backward hooks on it or globally."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def _parameter(module: nn.Module, name: str) -> Tensor | None:
    """`getattr(module, name)` for a parameter, without nn.Module's `__getattr__` (a Python call for every
    parameter read, ~5 us in a decode step) where the parameter is where nn.Module keeps it."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def apply(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`; for a hook-free plain Linear / LayerNorm outside autograd, its functional form."""
    kind = type(module)
    if (kind is nn.Linear or kind is nn.LayerNorm) and not torch.is_grad_enabled() and hook_free(module):
        if kind is nn.Linear:
            packed = packed_weight(module, x)
            if packed is not None:
                return packed_linear(x, packed, _parameter(module, "bias"))
            return F.linear(x, module.weight, module.bias)
        # torch.layer_norm: F.layer_norm without its Python wrapper (a __torch_function__ test, a cuDNN flag read)
        weight, bias = _parameter(module, "weight"), _parameter(module, "bias")
        return torch.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    if _packed and kind is nn.Linear:  # a forward for training: the weight may change next, without a trace
        _packed.pop(module, None)
    if kind is nn.Linear and hook_free(module):  # autograd on: oneDNN's products where faster (nn.cpu_linear)
        return autograd_linear(x, module.weight, module.bias)
    if getattr(kind, "direct_call", False) and hook_free(module):  # e.g. Int8Linear: forward holds no autograd
        return module.forward(x)
    return module(x)


# Activations (by Hugging Face config name) that oneDNN applies inside the packed matmul, as its post-op:
# (algorithm, approximation) for `_linear_pointwise`.
FUSED_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "swish": ("swish", ""),
}


def apply_activated(module: nn.Module, x: Tensor, activation: str) -> Tensor | None:
    """`act(module(x))` as one oneDNN call (the activation applied as the matmul's output is written), or
    None where that path does not apply (see `packed_weight`; also a Linear subclass or a hooked module).
    Saves a read and a write of the (B, T, d_ff) activations per feed-forward layer. The tanh GELU is applied
    apart (`gelu_tanh_sigmoid_`) on CPUs without AVX-512 (`fuses_tanh_gelu`)."""
    fused = FUSED_ACTIVATIONS.get(activation)
    if fused is None or type(module) is not nn.Linear or torch.is_grad_enabled() or not hook_free(module):
        return None
    packed = packed_weight(module, x)
    if packed is None:
        return None
    if fused[1] == "tanh" and not fuses_tanh_gelu():
        return gelu_tanh_sigmoid_(packed_linear(x, packed, _parameter(module, "bias")))
    return packed_linear(x, packed, _parameter(module, "bias"), *fused)


@cache
def fuses_tanh_gelu() -> bool:
    """Whether oneDNN applies the tanh GELU inside a packed product (its post-op): on CPUs with AVX-512. On AVX2
    ones that post-op costs ~3.5 ns an element (a 112 x 256 x 1024 product 858 us with it, 445 without, on a 2-core
    Zen 3 EPYC) and PyTorch's tanh ~1.6, while the same function through a sigmoid (`gelu_tanh_sigmoid_`) takes 102
    us for those 112 x 1024 values: prompt-prefilling server steps 6% faster, decoding steps the same."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def gelu_tanh_sigmoid_(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU, 0.5x(1 + tanh(u)) with u = sqrt(2/pi)(x + 0.044715x^3), in place, written as x * sigmoid(2u)
    (the same function: 0.5(1 + tanh(u)) = sigmoid(2u)). Error against float64 ~3.5e-7 (PyTorch's gelu ~3.2e-7).
    Sigmoid vectorises well on AVX2 CPUs and tanh does not: half the time of PyTorch's tanh GELU there."""
    u = x * x
    u.mul_(0.07135481627260025).add_(1.5957691216057308).mul_(x)  # 2u = 2 sqrt(2/pi) (0.044715 x^2 + 1) x
    return x.mul_(u.sigmoid_())


def row_bucket(rows: int) -> int:
    """The row count a packed matmul of `rows` rows runs at: up to 8 as is, then rounded up to a multiple of
    8 (to 128), of 64 (to 1024), of 256. oneDNN compiles a kernel for every new row count (0.1-0.2 ms each on
    a 2-core AMD EPYC, and its cache keeps 1,024): a server whose steps pack prompts of any length would
    otherwise compile in most steps and, running long, evict its own kernels. 41 sizes cover 1..2048 rows."""
    if rows <= 8:
        return rows
    step = 8 if rows <= 128 else 64 if rows <= 1024 else 256
    return -(-rows // step) * step


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, post: str = "none", algorithm: str = "") -> Tensor:
    """oneDNN's matmul with a packed weight (and an optional activation `post`): x (..., in) -> (..., out),
    run at `row_bucket` rows. Extra rows are zeros whose outputs are dropped; a row's result does not depend on
    the row count (bit for bit on the CPUs measured; the tests allow float32 rounding)."""
    rows = x.numel() // x.size(-1)
    bucket = row_bucket(rows)
    if bucket == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], algorithm)
    padded = x.new_empty(bucket, x.size(-1))  # (bucket, in)
    padded[:rows] = x.reshape(rows, -1)
    padded[rows:] = 0
    y = torch.ops.mkldnn._linear_pointwise(padded, packed, bias, post, [], algorithm)[:rows]  # (rows, out)
    return y.view(x.shape[:-1] + y.shape[-1:])  # (..., out) (written so that TorchScript compiles it too)


@cache
def packing_available() -> bool:
    """oneDNN's packed matmul is used on x86 CPUs where PyTorch has it, unless LMFORGE_PACKED_LINEAR=0."""
    if os.environ.get("LMFORGE_PACKED_LINEAR", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@cache
def packs_one_row() -> bool:
    """Whether a one-row product (x of a single row) runs packed: on CPUs with AVX-512. On AVX2 ones oneDNN's
    call costs ~40 us before any arithmetic, and `F.linear` (the weight in `decode_layout`) is faster for one
    row in every layer measured (2-core Zen 3 EPYC: 256 x 768 26 vs 67 us, 256 x 256 20 vs 69, 1024 x 256 50
    vs 75, 256 x 4096 142 vs 146): one stream through the server's scheduler +15% (in-process, 6 interleaved
    rounds), `generate` at batch 1 +12% (median of 10; the same tokens). From a few rows on, packing wins the
    wide layers there too (a 256 x 4096 head at 4 rows: 198 vs 434 us); with AVX-512 (a Zen 5 EPYC) it wins
    from one row (a lone stream 1.8x faster)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def packed_weight(module: nn.Linear, x: Tensor) -> Tensor | None:
    """The module's weight packed for oneDNN (cached per module), or None where `F.linear` is the better
    kernel: not float32 on the CPU, packing unavailable (not x86, LMFORGE_PACKED_LINEAR=0, or oneDNN turned
    off with `torch.backends.mkldnn.flags(enabled=False)`), one row on a CPU without AVX-512 (`packs_one_row`),
    or inside `torch.compile` (inductor packs weights itself when freezing; a copy made here is not a graph
    constant and would fail its lowering).

    Only a module in eval mode is packed, and a forward with autograd on drops its copy: that is how a
    weight change is noticed when nothing else records it (a fused optimizer's step leaves the tensor's
    version counter as it was; so does writing through `weight.data`). Otherwise the copy is made again
    when the weight's version or storage changes. After changing an eval-mode model's weights through
    `.data` with no training forward in between, call `forget_packed(model)`."""
    # Called for every Linear of every step: the cheapest tests first, and the weight's dtype and device only
    # when packing it (a packed copy exists only of a float32 CPU weight, and any change to the weight's
    # dtype or device gives it new storage). In a decode step each Python operation here costs several times
    # its cost in a loop: the step's kernels have pushed the interpreter's data out of the CPU's caches.
    if x.dtype is not torch.float32 or not x.is_cpu or module.training or torch.compiler.is_compiling():
        return None  # (the compiler picks, and packs for, its own kernels)
    if not (packing_available() and torch.backends.mkldnn.enabled):
        return None
    if x.numel() == x.size(-1) and not packs_one_row():
        return None
    w = _parameter(module, "weight")
    version = 0 if w.is_inference() else w._version  # (a model loaded under inference_mode has no counter)
    cached = _packed.get(module)
    if cached is None or cached[0] is not w or cached[1] != w.data_ptr() or cached[2] != version:
        if w.dtype is not torch.float32 or not w.is_cpu:
            return None
        # Made again after any change to the weight (an optimizer step, load_state_dict, `weight.data = ...`).
        # The batch-size hint (8) only tunes the blocking; every row count is computed correctly with it.
        cached = (w, w.data_ptr(), version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8))
        _packed[module] = cached
    return cached[3]


def forget_packed(model: nn.Module) -> None:
    """Drop the packed weight copies of the model's Linear layers (they are made again on next use)."""
    for module in model.modules():
        _packed.pop(module, None)


def decode_layout(model: nn.Module) -> nn.Module:
    """Store every plain Linear's weight as the (out, in) view of an (in, out) row-major tensor, in place.

    Same values and shapes, so every computation gives the same result up to float rounding; only the memory
    order changes. A decode step multiplies one row by each weight, and PyTorch's CPU kernels stream an
    (in, out) matrix about 3x faster there than an (out, in) one (2-core AMD EPYC, one thread: GPT-2's
    8192 x 384 output layer 0.74 ms instead of 2.33 ms; the 25 Linears of a 6 x 384 decode step 7.8 ms
    instead of 10.3), and equally fast for 4 rows or more. A tied output layer is the input embedding
    too: its rows are then read strided, which costs a lookup nothing measurable. Idempotent. Where `apply`
    runs oneDNN's packed kernel (x86) the parameter's layout no longer matters; elsewhere (ARM,
    LMFORGE_PACKED_LINEAR=0) it does."""
    seen: set[int] = set()
    for module in model.modules():
        if type(module) is nn.Linear and id(module.weight) not in seen:
            seen.add(id(module.weight))
            w = module.weight
            if w.dim() == 2 and w.stride() == (w.size(1), 1):  # row-major (out, in): re-lay it out
                w.data = w.data.t().contiguous().t()
    return model
