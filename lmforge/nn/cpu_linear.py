"""float32 Linear layers with autograd on x86 CPUs through oneDNN, where PyTorch's default (MKL) is slow.

PyTorch's CPU builds run float32 matrix products in training on MKL. On AMD CPUs MKL does not reach the
machine's speed: on a 2-vCPU AMD EPYC (Zen 5, AVX-512), 2 threads, the products of a Marian-shaped training
step (768 rows through 512 -> 2048, 2048 -> 512, 512 -> 8000, and their backward products) ran at 150-200 GFLOP/s
with `F.linear` / `torch.mm`, and at 300-420 GFLOP/s with oneDNN's matmul, which PyTorch ships as
`torch.ops.mkldnn._linear_pointwise`. `linear(x, weight, bias)` is `F.linear` with autograd, computed by oneDNN:
the forward product and both backward products (dX = dY W, dW = dY^T X), on the tensors as they are (no copies).

It is used by `nn.inference.apply` for a plain `nn.Linear` when all of these hold: autograd is on, float32 weights
and inputs on the CPU, no autocast, not inside `torch.compile`, oneDNN present and enabled, and the CPU is an AMD
one (on Intel CPUs MKL is PyTorch's tuned default and stays). `LMFORGE_TRAINING_MATMUL=onednn` or `=aten` forces
the choice. Values agree with `F.linear` to float32 rounding (a different summation order); the choice is fixed
per machine, so a resumed run computes exactly what the uninterrupted one did.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge.utils import onednn_available


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN for the forward and backward products."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        lp = torch.ops.mkldnn._linear_pointwise
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dX = dY W: dY (..., out) through the (in, out) view of W
            grad_x = lp(grad, weight.t(), None, "none", [], "")  # (..., in)
        rows = grad.reshape(-1, grad.size(-1))  # (M, out)
        if ctx.needs_input_grad[1]:  # dW = dY^T X: (out, M) through the (in, M) view of X
            grad_w = lp(rows.t(), x.reshape(-1, x.size(-1)).t(), None, "none", [], "")  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)  # (out,)
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` computed by oneDNN, with autograd (first derivatives). x (..., in),
    weight (out, in), bias (out,) -> (..., out)."""
    return _OneDNNLinear.apply(x, weight, bias)


def autograd_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN where `use_onednn` says so (the one place that decides)."""
    return linear(x, weight, bias) if use_onednn(x, weight) else F.linear(x, weight, bias)


@cache
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@cache
def training_onednn() -> bool:
    """Whether float32 Linear layers with autograd run on oneDNN in this process (see the module docstring)."""
    choice = os.environ.get("LMFORGE_TRAINING_MATMUL", "auto").strip().lower()
    if choice not in ("auto", "onednn", "aten"):
        raise ValueError(f"LMFORGE_TRAINING_MATMUL must be auto, onednn or aten; got {choice!r}")
    if choice == "aten" or not onednn_available():
        return False
    return choice == "onednn" or _cpu_vendor() == "AuthenticAMD"


def use_onednn(x: Tensor, weight: Tensor) -> bool:
    """True when this Linear product should run `linear` here: autograd on, float32 on the CPU, no autocast, not
    being compiled, oneDNN enabled, and `training_onednn()`."""
    return (
        torch.is_grad_enabled()
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and x.device.type == "cpu" == weight.device.type
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.enabled
        and training_onednn()
    )
