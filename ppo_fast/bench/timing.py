"""Timing and the device's limits: median wall time (CUDA events on GPU), peak memory, and the
copy bandwidth and matmul rate each record states its figures against."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, min_time_s: float = 0.3, max_reps: int = 50) -> float:
    """Median wall time of fn in ms, after warm-up. CUDA: triton.testing.do_bench (CUDA events)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_memory_mb(fn: Callable[[], object], device: torch.device):
    """Peak allocated memory above what was allocated before fn (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate: bytes read + written per second. The source is written first:
    on a CPU, never-written memory is the kernel's shared zero page, read from cache (that
    inflated this figure ~1.8x before 2026-12-02)."""
    n = (2**28 if device.type == "cuda" else 2**25)  # 1 GiB / 128 MiB of fp32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device) -> float:
    """Dense matmul rate: bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """The fields every record starts with."""
    import datetime

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(), "date": datetime.date.today().isoformat()}
