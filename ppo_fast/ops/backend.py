"""Which implementation runs an op: `auto`, `triton`, `cuda`, `cpp` or `torch`.

The choice comes from `use_backend(name)` (innermost wins) or else the environment
variable PPO_FAST_BACKEND, default `auto`:

- auto: Triton for CUDA tensors; for CPU tensors the C++ extension when built, else torch;
  for meta tensors a custom op of the op's table (its fake implementation gives the shapes).
- triton: Triton kernels; on CPU tensors only under TRITON_INTERPRET=1 (the test mode).
- cuda / cpp: the hand-written kernels of csrc/ (`ppo_fast._C_cuda` / `ppo_fast._C`).
- torch: the plain-PyTorch reference, `ppo_fast.ops.reference`.

Each public op keeps a table {backend name: implementation}, every entry a callable with the
op's prepared signature (the `torch` entry is the reference itself), and calls it through
`dispatch`, which picks the entry with `resolve_backend`. A forced backend that cannot run on the
given tensors raises BackendError; it never falls back silently. An op whose only entry is `torch`
(a handful of numbers per prompt: group_advantages, dpo_loss) has no kernel to force: it runs its
reference under any backend.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable

import torch

from ppo_fast.ops.native import native_module

_local = threading.local()


class BackendError(RuntimeError):
    """A backend was asked for that cannot run on the given tensors."""


@dataclasses.dataclass(frozen=True)
class KernelBackend:
    """A backend with kernels of its own: the device types it runs on, whether it is built or
    installed here, and what to do when it is not."""

    devices: tuple
    built: Callable[[], bool]
    missing: str


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    from ppo_fast.ops.triton_helpers import HAS_TRITON

    return HAS_TRITON


# The one place the backends are named: the kernel backends, auto's preference per device type
# (best first; meta tensors: shapes only, the custom ops' fake implementations answer), and the
# names use_backend / PPO_FAST_BACKEND accept.
KERNEL_BACKENDS = {
    "triton": KernelBackend(("cuda",), triton_available, "Triton is not installed."),
    "cuda": KernelBackend(("cuda",), lambda: native_module("_C_cuda") is not None,
                          "ppo_fast._C_cuda was not built (needs a CUDA build of torch and nvcc)."),
    "cpp": KernelBackend(("cpu",), lambda: native_module("_C") is not None,
                         "ppo_fast._C was not built for this CPU's instruction set or below (reinstall with `pip "
                         "install --no-build-isolation -e .`; PPO_FAST_CPU_ISA=all builds every one)."),
}
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch"), "meta": ("cpp", "triton", "cuda", "torch")}
BACKENDS = ("auto", *KERNEL_BACKENDS, "torch")


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for right now: the innermost `use_backend`, else PPO_FAST_BACKEND."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("PPO_FAST_BACKEND", "auto"), "PPO_FAST_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` (thread-local, nestable)."""
    name = _check_name(name, "backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def _runs_on(name: str, device: torch.device) -> bool:
    """Whether kernel backend `name` targets tensors of `device` (Triton: CPU ones when interpreted)."""
    return device.type in KERNEL_BACKENDS[name].devices or (name == "triton" and device.type == "cpu"
                                                             and triton_interpreted())


def available_backends(device: torch.device | str) -> list[str]:
    """Concrete backends that can run on tensors of `device`."""
    device = torch.device(device)
    return ["torch"] + [name for name, backend in KERNEL_BACKENDS.items() if _runs_on(name, device) and backend.built()]


def resolve_backend(device: torch.device, op: str, implementations) -> str:
    """The concrete backend that runs `op` on tensors of `device`.

    `implementations` is the op's table (its keys are the backends it has); `auto` picks the
    best of them that can run here, a forced name must be both implemented and runnable.
    """
    supported = tuple(implementations)
    name = requested_backend()
    if device.type == "meta":  # shapes only: the custom ops' fake implementations answer, no kernel runs
        runnable = [b for b in AUTO_ORDER["meta"] if b in supported]
        if name == "auto" or name in runnable:
            return runnable[0] if name == "auto" else name
    runnable = [b for b in available_backends(device) if b in supported]
    if name == "auto":
        return next(b for b in AUTO_ORDER.get(device.type, ("torch",)) if b in runnable)
    if name not in supported:
        raise BackendError(f"{op}: backend {name!r} does not implement this op (it has {list(supported)})")
    if name not in runnable:
        raise BackendError(f"{op}: backend {name!r} cannot run on {device.type} tensors here; "
                           f"available: {runnable}. {_why_unavailable(name, device)}")
    return name


def _why_unavailable(name: str, device: torch.device) -> str:
    if not _runs_on(name, device):
        interpreted = ", or on CPU tensors under TRITON_INTERPRET=1" if name == "triton" else " only"
        return f"The {name} backend runs on {'/'.join(KERNEL_BACKENDS[name].devices).upper()} tensors{interpreted}."
    return KERNEL_BACKENDS[name].missing


def plain_eager(x: torch.Tensor) -> bool:
    """True where an op may call its kernel directly rather than through its custom op: outside
    torch.compile, export and any tracing or fake-tensor mode (they are all on the dispatch mode
    stack), on a plain tensor that is not on the meta device."""
    stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return (not torch.compiler.is_compiling() and stack is not None and stack() == 0
            and type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type != "meta")


def backend_table(implementation, backends, reference) -> dict:
    """An op's table: {backend: implementation with backend=<that name> bound, for each of
    `backends`} and {"torch": reference}, the plain-PyTorch spec with the public signature."""
    return {**{b: functools.partial(implementation, backend=b) for b in backends}, "torch": reference}


def dispatch(op: str, table: dict, device: torch.device, *args, **kwargs):
    """Run `op` on the backend in force for tensors of `device`: table[backend](*args, **kwargs). A
    table holding the reference alone runs it whatever the backend (no kernel to choose or force)."""
    backend = "torch" if tuple(table) == ("torch",) else resolve_backend(device, op, table)
    return table[backend](*args, **kwargs)
