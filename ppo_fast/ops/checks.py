"""Input checks shared by the public ops: each error names the argument, what was seen
and what was expected.

Shape, dtype and device checks read only metadata. Checks of tensor *values* (labels in
range, a 0/1 mask) need the values on the host: on CPU tensors they always run (no device to
wait for); on CUDA tensors they would cost a device sync per call and break CUDA-graph
capture, so they run only with PPO_FAST_CHECK_VALUES=1. Without them the kernels still never
read out of bounds: a label outside [0, V) gives a NaN log-prob.
"""
from __future__ import annotations

import math
import os
import sys

import torch

LOWP_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
FLOAT32_MAX = torch.finfo(torch.float32).max


def value_checks_enabled(device: torch.device) -> bool:
    """Whether checks that read tensor values run for tensors on `device` (see the docstring)."""
    return device.type == "cpu" or os.environ.get("PPO_FAST_CHECK_VALUES", "0") == "1"


def any_dtensor(*tensors) -> bool:
    """Whether any of them is a DTensor (never imports torch.distributed.tensor: without it loaded,
    no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(t, module.DTensor) for t in tensors)


def require_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def require_float(name: str, x, dtypes=LOWP_FLOATS) -> None:
    require_tensor(name, x)
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def require_integer(name: str, x) -> None:
    require_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")


def require_same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {seen}")


def require_shape(name: str, x: torch.Tensor, shape, expected_what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ({expected_what}), got {tuple(x.shape)}")


def require_python_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    return float(value)


def require_finite(name: str, value) -> float:
    value = require_python_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value, got {value}")
    return value


def require_positive(name: str, value) -> float:
    value = require_python_float(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return value


def require_nonnegative(name: str, value) -> float:
    value = require_python_float(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
    return value


def require_dual_clip(value):
    """None, or the dual-clip constant c: a finite value > 1 (as a float)."""
    if value is not None and not (require_python_float("dual_clip", value) > 1 and value < float("inf")):
        raise ValueError(f"dual_clip: expected None or a finite value > 1, got {value!r}")
    return None if value is None else float(value)


def require_temperature(value) -> float:
    """A temperature T > 0 whose inverse 1/T, the factor the kernels multiply by, is finite in fp32."""
    value = require_positive("temperature", value)
    if 1.0 / value > FLOAT32_MAX:
        raise ValueError(f"temperature: {value} is so small that 1/temperature overflows float32; "
                         f"expected a value >= {1 / FLOAT32_MAX:.3g}")
    return value


def require_values(bad: torch.Tensor, message: str, where=None) -> None:
    """Raise ValueError(message) if any entry of the boolean tensor `bad` is set; `where(bad)`
    adds where. Under torch.compile the check is an assert op in the graph (no graph break, no
    host read while tracing) that raises RuntimeError(message) when the graph runs."""
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(message + (where(bad) if where else ""))


def require_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is in [0, vocab_size) or equals ignore_index (a value check: see the docstring)."""
    if not labels.numel() or not value_checks_enabled(labels.device):
        return

    def first(bad):
        where = tuple(int(i) for i in bad.nonzero()[0])
        return f"; found {int(labels[where])} at index {where}"

    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    require_values(bad, f"labels: values must be in [0, {vocab_size}) or equal ignore_index={ignore_index}", first)


def require_mask(name: str, mask, shape) -> None:
    """A [B, T] mask of bools or 0/1 values (values checked as the docstring says)."""
    require_tensor(name, mask)
    require_shape(name, mask, shape, "the shape of the per-token inputs")
    if mask.dtype == torch.bool or not mask.numel() or not value_checks_enabled(mask.device):
        return
    require_values((mask != 0) & (mask != 1),
                   f"{name}: expected a bool or 0/1 mask, found values other than 0 and 1 ({mask.dtype})")


def require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def require_optional_count(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected None or a finite number > 0 (a global count), got {value!r}")


def require_per_token(names_and_tensors: dict, dtypes=LOWP_FLOATS):
    """Float [B, T] tensors of one shape, on one device. Returns the shape."""
    first_name, first = next(iter(names_and_tensors.items()))
    for name, x in names_and_tensors.items():
        require_float(name, x, dtypes)
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a [B, T] tensor, got shape {tuple(x.shape)}")
        require_shape(name, x, first.shape, f"the shape of {first_name}")
    require_same_device(**names_and_tensors)
    return first.shape


def per_token_inputs(per_token: dict, mask) -> tuple:
    """The inputs of an op over [B, T] tokens: float [B, T] tensors of one shape on one device and a
    bool or 0/1 mask of that shape there. Returns them contiguous, every one but the first (the
    differentiated one) detached, then the mask."""
    shape = require_per_token(per_token)
    require_mask("mask", mask, shape)
    first_name, first = next(iter(per_token.items()))
    require_same_device(**{first_name: first, "mask": mask})
    return contiguous(first, *(t.detach() for t in list(per_token.values())[1:]), mask)


def native_rows(*tensors, mask=None):
    """The C++ kernels' inputs: float32 row-major tensors, and the mask (when given) as it is when
    bool (read as bytes, never converted), else as float32."""
    rows = tuple(t.float().contiguous() for t in tensors)
    if mask is None:
        return rows
    return (*rows, mask.contiguous() if mask.dtype == torch.bool else mask.float().contiguous())


def contiguous(*tensors):
    """The tensors as dense row-major tensors (a copy only where the strides are not; None stays
    None). The kernels index with flat offsets, so every tensor they read goes through here:
    views with gaps (x[:, ::2]), expanded tensors (stride 0) and transposes are all read right."""
    return tuple(None if t is None else t.contiguous() for t in tensors)
