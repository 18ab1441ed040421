"""Input checks shared by the public ops: each error names the argument, what was seen
and what was expected."""
from __future__ import annotations

import math

import torch

LOWP_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


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


def require_positive(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return float(value)


def require_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is in [0, vocab_size) or equals ignore_index (one device sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if labels.numel() and bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels: values must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(labels[where])} at index {where}"
        )
