"""Inference with fewer bytes per weight: int8 Linear layers and bf16 detection.

Decoding a small model on a CPU is bound by reading the weights once per token: a batch-1 step of
GPT-2-small shape streams ~16 MB of fp32 Linear weights. `quantize(model, "int8")` swaps every
`nn.Linear` for an `Int8Linear`: weights stored as int8 with one scale per output channel
(symmetric, w ≈ scale * q, |q| <= 127), activations quantized on every call, per row (each row scaled to
a largest |value| of 1, then rounded by the kernel to 7 bits), accumulated in int32, rescaled to float.
A family may ask for a second pass over what the first rounded away on chosen layers (BERT: the
LayerNorm-fed ones), for ~14-bit activations there.

Kernel: PyTorch's own fbgemm (x86) / qnnpack (ARM) `quantized::linear_dynamic`, chosen by
measurement on a 2-core AMD EPYC (AVX2), the 25 Linears of one GPT decode step (6 x 384, vocab
8192): fp32 6.6 ms at batch 1 / 11.1 ms at batch 8; fbgemm dynamic int8 1.4 / 1.8 ms; torchao's
CPU routes were slower than fp32 there (weight-only `_weight_int8pack_mm` 12.5 / 73 ms with fp32
activations, 2.9 / 5.2 ms with bf16 ones; `_int_mm` dynamic 104 ms). PyTorch has announced that its
quantized tensor types will be removed in a future release; when that happens, or on a build without
the kernels, or when a start-up check finds that the kernel's result disagrees with the exact
int8 arithmetic, `Int8Linear` falls back to the reference kernel (dequantize, then `F.linear`):
the same answers, the memory saving kept, the speed not, and a warning says so. Never silent garbage.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from functools import cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.nn.lora import has_lora, merge_and_unload

QUANTIZE_CHOICES = ("int8",)
# Linears smaller than this in either dimension stay fp32: a classifier head over a few labels costs
# nothing to run, and quantizing it would move the decision boundary for no speed.
MIN_FEATURES = 64
# The kernel quantizes activations to 7 bits (reduce_range): on CPUs without VNNI (AVX2) its 8-bit mode
# overflows int16 pair sums (measured on an AMD EPYC: 1e-2 relative errors where 7 bits are exact to 3e-7).
QMAX = 127


@cache
def packed_kernel_ok() -> bool:
    """True when PyTorch's packed int8 kernel exists here and agrees with the reference arithmetic on a
    random layer (checked once per process)."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 128, generator=g) * 0.05
        b = torch.randn(96, generator=g) * 0.01
        x = torch.randn(4, 128, generator=g)
        q, scale = quantize_weight(w)
        got = torch.ops.quantized.linear_dynamic(x, _prepack(q, scale, None), True) + b
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    want = F.linear(x, q.float() * scale[:, None], b)
    # The kernel also rounds the activations to 7-bit integers: allow that, catch anything worse.
    return bool(torch.isfinite(got).all()) and float((got - want).norm() / want.norm()) < 0.05


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (int8 q (out, in), float32 scale (out,)) with w ≈ scale[:, None] * q."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,): an all-zero row gets a tiny scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _linear_dynamic(x: Tensor, packed: torch.ScriptObject, reduce_range: bool) -> Tensor:
    """quantized::linear_dynamic without the Python dispatch checks of `torch.ops` (~10 us a call, 25 calls
    per decode step)."""
    return _kernel()(x, packed, reduce_range)


@cache
def _kernel() -> Callable[..., Tensor]:
    op = torch.ops.quantized.linear_dynamic  # looked up on first use: a build without it fails no import
    return getattr(op.default, "_op", op)


def kernel_rounding(x: Tensor) -> Tensor:
    """`x` as the kernel sees it after its dynamic quantization: QMAX + 1 levels spanning [min(x, 0), max(x, 0)]."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi == lo:
        return torch.zeros_like(x)
    step = (hi - lo) / QMAX
    zero = min(max(round(-lo / step), 0), QMAX)
    return ((torch.round(x / step) + zero).clamp_(0, QMAX) - zero) * step


def _prepack(q: Tensor, scale: Tensor, bias: Tensor | None) -> torch.ScriptObject:
    """The kernel's own packed layout for an int8 weight with per-output-channel scales."""
    zero = torch.zeros(q.size(0), dtype=torch.long)
    with warnings.catch_warnings():  # PyTorch's deprecation notice for quantized tensors, see the module docstring
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())


class Int8Linear(nn.Module):
    """An inference-only `nn.Linear` with int8 weights: x (..., in) -> (..., out) in float32.

    `q` (out, in) int8 and `scale` (out,) are kept as buffers (what the layer holds, and the reference
    kernel's input); `packed` is the fast kernel's copy in its own layout (None on the reference kernel).
    """

    direct_call = True  # `nn.inference.apply` may call forward directly (no hooks registered)

    def __init__(self, linear: nn.Linear, packed: bool | None = None, passes: int = 1) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(
                "int8 quantization runs on the CPU; move the model to the CPU first (model.to('cpu')), "
                "or use dtype='bfloat16' on a GPU"
            )
        if passes not in (1, 2):
            raise ValueError(f"passes must be 1 or 2, got {passes}")
        self.in_features, self.out_features, self.passes = linear.in_features, linear.out_features, passes
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        use_packed = packed_kernel_ok() if packed is None else packed
        self.packed = _prepack(q, scale, bias) if use_packed else None

    @property
    def weight(self) -> Tensor:
        """The dequantized (out, in) weight, as float32 (what the layer computes with, up to activation rounding)."""
        return self.q.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "an int8-quantized model is for inference only (no gradients flow through Int8Linear); "
                "train or attribute with the float model and quantize it afterwards"
            )
        if self.packed is None or x.dtype is not torch.float32 or x.device.type != "cpu":
            return self._other(x)
        # (`int8_linear` below is this path, one pass, for TorchScript: change both together)
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if self.passes == 1 and rows.shape[0] == 1:  # one row (a decode step): per-tensor is per-row already
            return _linear_dynamic(rows, self.packed, True).view(x.shape[:-1] + (self.out_features,))
        # Per-row scaling: each row's largest |value| becomes 1 before the kernel's per-tensor quantization, so
        # a row is quantized on its own range (and gives the same answer in any batch). The packed weight holds
        # the bias, which the kernel adds to W r: it is taken out before the rescale and put back after.
        s = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # (M, 1)
        r = rows / s
        y = _linear_dynamic(r, self.packed, True)  # (M, out)
        if self.bias is not None:
            y -= self.bias
        if self.passes == 2:  # what the first pass rounded away, in a second pass: ~14-bit activations
            residual = r - kernel_rounding(r)
            t = residual.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
            y2 = _linear_dynamic(residual.div_(t), self.packed, True)
            if self.bias is not None:
                y2 -= self.bias
            y += y2.mul_(t)
        y.mul_(s)  # in place: a broadcasting addcmul took 3 ms per (1280, 1536) call here, mul_ + add_ 0.3
        if self.bias is not None:
            y += self.bias
        return y.view(x.shape[:-1] + (self.out_features,))

    def _other(self, x: Tensor) -> Tensor:
        """Inputs off the fast path: another device (an error), another dtype (cast), the reference kernel."""
        if x.device.type != "cpu":
            raise RuntimeError(
                f"int8 layers run on the CPU; got input on {x.device}: keep the model and inputs on the CPU"
            )
        if x.dtype is not torch.float32:
            return self.forward(x.float())
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kernel = "fbgemm/qnnpack" if self.packed is not None else "reference"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}, passes={self.passes}"
        )


try:  # the packed weight of an int8 layer (`Int8Linear.packed`), as TorchScript types it (serving/step.py)
    Int8Packed = torch.classes.quantized.LinearPackedParamsBase
    _INT8_KERNEL = hasattr(torch.ops.quantized, "linear_dynamic")
except (AttributeError, RuntimeError):
    _INT8_KERNEL = False
if not _INT8_KERNEL:  # a PyTorch without the quantized kernels: no Int8Linear has a packed weight
    Int8Packed = Tensor

if _INT8_KERNEL:

    def int8_linear(x: Tensor, packed: Int8Packed, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045 (TorchScript)
        """`Int8Linear.forward` with one pass on the packed kernel, op for op, for TorchScript (the server's
        compiled step; the forward itself calls the kernel without `torch.ops`' dispatch, ~10 us a call less):
        x (..., in) -> (..., out). Keep the two in step; the tests hold them bit-identical."""
        rows = x.reshape(-1, x.size(-1))  # (M, in)
        if rows.size(0) == 1:
            y = torch.ops.quantized.linear_dynamic(rows, packed, True)
        else:
            s = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # (M, 1)
            y = torch.ops.quantized.linear_dynamic(rows / s, packed, True)  # (M, out)
            if bias is not None:
                y -= bias
            y.mul_(s)
            if bias is not None:
                y += bias
        return y.view(x.shape[:-1] + y.shape[-1:])

else:

    def int8_linear(x: Tensor, packed: Int8Packed, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045 (TorchScript)
        """(No int8 kernel in this PyTorch: never called, as no Int8Linear has a packed weight then.)"""
        raise RuntimeError("this PyTorch has no int8 kernel")


def quantize(
    model: nn.Module, mode: str = "int8", packed: bool | None = None, two_pass: Collection[str] = ()
) -> nn.Module:
    """Swap the model's `nn.Linear` layers (both sides >= MIN_FEATURES) for `Int8Linear`, in place.

    `two_pass`: names of Linear layers (their attribute name, e.g. "qkv") that get a second int8 pass over
    what the first rounded away (~14-bit activations at up to twice the cost), for models whose activations
    7 bits describe too coarsely; each model family says which (`PreTrainedModel.int8_two_pass`).

    LoRA adapters are merged into their base weights first (`merge_and_unload`). The model is put in eval mode: an int8
    model is for inference. `packed=None` picks the fast kernel when it is present and correct here
    (else the reference kernel, with a warning); True / False force one (for tests)."""
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={mode!r} is not supported; choose one of {list(QUANTIZE_CHOICES)}")
    if has_lora(model):  # fold the adapters into plain Linears, which are then quantized
        merge_and_unload(model)
    if packed is None and not packed_kernel_ok():
        warnings.warn(
            "PyTorch's int8 kernels (fbgemm / qnnpack) are missing or wrong on this build; int8 layers use the "
            "reference kernel: same answers and memory, no speed-up. Install a PyTorch build with them "
            "(pip install torch==2.13.0) for the speed",
            stacklevel=2,
        )
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and min(child.in_features, child.out_features) >= MIN_FEATURES:
                setattr(parent, name, Int8Linear(child, packed, passes=2 if name in two_pass else 1))
                swapped += 1
    if not swapped and not is_quantized(model):
        warnings.warn(
            f"quantize({mode!r}) left the model as it was: no Linear layer has both sides >= {MIN_FEATURES} "
            "features, and int8 gains nothing on smaller ones",
            stacklevel=2,
        )
    model.eval()
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


@cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX): elsewhere PyTorch emulates
    them, and bf16 is slower than float32 once a matmul has more than a few rows."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = open("/proc/cpuinfo", encoding="utf-8").read()  # noqa: SIM115 - one short read
            return "avx512_bf16" in flags or "amx_bf16" in flags
    except (OSError, RuntimeError, AttributeError):
        pass
    return False
