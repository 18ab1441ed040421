"""The native kernels' extension modules: ppo_fast._C (C++, CPU) in the build for this CPU's
instruction set, and ppo_fast._C_cuda (CUDA). setup.py builds _C for any CPU and, on x86-64,
_C_avx2 and _C_avx512 (the same sources with those instructions, as ATen builds its own kernels);
native_module("_C") loads the best one that was built and that this CPU runs (torch's own
cpu_capability, lowered by PPO_FAST_CPU_CAPABILITY). A build that is absent is None, never an
error here: backend.py decides what that means for an op.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

_native_cache: dict = {}
# The CPU kernels' builds by instruction set (setup.py), best first; _C runs on any CPU.
CPU_CAPABILITIES = ("AVX512", "AVX2", "DEFAULT")
CPU_VARIANTS = {"AVX512": "_C_avx512", "AVX2": "_C_avx2", "DEFAULT": "_C"}


def cpu_capability() -> str:
    """The instruction set the CPU kernels use: torch's own (its cpu_capability, which
    ATEN_CPU_CAPABILITY lowers), lowered further by PPO_FAST_CPU_CAPABILITY (default / avx2 /
    avx512; a request above what the CPU runs is refused)."""
    detected = torch.backends.cpu.get_cpu_capability()
    detected = detected if detected in CPU_CAPABILITIES else "DEFAULT"
    asked = os.environ.get("PPO_FAST_CPU_CAPABILITY", "").strip().upper()
    if not asked:
        return detected
    if asked not in CPU_CAPABILITIES:
        raise ValueError(f"PPO_FAST_CPU_CAPABILITY: expected one of {[c.lower() for c in CPU_CAPABILITIES]}, "
                         f"got {asked.lower()!r}")
    if CPU_CAPABILITIES.index(asked) < CPU_CAPABILITIES.index(detected):
        raise ValueError(f"PPO_FAST_CPU_CAPABILITY={asked.lower()}: this CPU runs at most {detected.lower()}")
    return asked


def cpu_kernel_module():
    """The name of the CPU kernels' build in use: the best of ppo_fast._C_avx512, _C_avx2 and
    _C that was built, loads and the CPU runs; None if none was built."""
    for capability in CPU_CAPABILITIES[CPU_CAPABILITIES.index(cpu_capability()):]:
        if _import_native(CPU_VARIANTS[capability]) is not None:
            return CPU_VARIANTS[capability]
    return None


def _import_native(name: str):
    if name not in _native_cache:
        try:
            _native_cache[name] = importlib.import_module(f"ppo_fast.{name}")
        except ImportError:
            _native_cache[name] = None
    return _native_cache[name]


def native_module(name: str):
    """`ppo_fast._C` (the CPU kernels, in the build for this CPU's instruction set:
    cpu_kernel_module) / `ppo_fast._C_cuda` if it was built and loads, else None."""
    if name == "_C":  # resolved once per PPO_FAST_CPU_CAPABILITY value (no C call inside a compiled graph)
        key = ("_C", os.environ.get("PPO_FAST_CPU_CAPABILITY", ""))
        if key not in _native_cache:
            variant = cpu_kernel_module()
            _native_cache[key] = None if variant is None else _import_native(variant)
        return _native_cache[key]
    return _import_native(name)


def warn_if_native_missing() -> None:
    """Say once, at import, which backend CPU (and CUDA) tensors fall back to without a build."""
    if native_module("_C") is None:
        warnings.warn("ppo_fast: the C++ extension ppo_fast._C is not built; CPU tensors use the torch "
                      "backend (build it with `make native` or `pip install --no-build-isolation -e .`)",
                      RuntimeWarning, stacklevel=3)
    if torch.cuda.is_available() and torch.version.cuda and native_module("_C_cuda") is None:
        warnings.warn("ppo_fast: the CUDA extension ppo_fast._C_cuda is not built; the `cuda` backend is "
                      "unavailable (CUDA tensors use Triton)", RuntimeWarning, stacklevel=3)
