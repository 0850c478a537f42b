"""Run-time helpers: seeding, device choice, and the matmul peak that MFU is measured against."""

from __future__ import annotations

import platform
import random
import time
from functools import cache

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks CUDA, then MPS, then CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None


@cache
def onednn_available() -> bool:
    """An x86 CPU and a PyTorch build with oneDNN's linear op (`torch.ops.mkldnn._linear_pointwise`)."""
    machine = platform.machine().lower()
    return (
        machine in ("x86_64", "amd64", "i686", "x86")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def matmul_peak_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seconds: float = 0.3
) -> float:
    """FLOP/s of a large square matmul on `device`: the denominator of MFU, measured, not assumed. On an x86 CPU
    in float32 it is the faster of PyTorch's default kernel (MKL) and oneDNN's, which lmforge's Linear layers use
    where it is faster (on AMD CPUs MKL reaches about half of oneDNN's rate: `nn.cpu_linear`)."""
    device = torch.device(device)
    dtype = dtype or torch.float32
    n = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG streams alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for matmul in kernels:
        for _ in range(3):
            matmul()
        sync()
        reps, start = 0, time.perf_counter()
        while True:
            matmul()
            reps += 1
            if reps % 4 == 0:
                sync()
                if time.perf_counter() - start > seconds:
                    break
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best
