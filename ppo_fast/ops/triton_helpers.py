"""Triton import (so ppo_fast imports everywhere) and the small jit helpers the kernels share.

Without Triton (macOS, Windows) the kernels are never launched: `triton.jit` becomes a no-op
decorator and the backend resolver refuses the `triton` backend.

NaN rule: `tl.minimum` / `tl.maximum` return the non-NaN operand, which would turn a NaN
input into a clamp bound. `clamp` and `nan_max` below propagate NaN, as torch.clamp and
torch.maximum do, so a NaN at a valid position reaches every output that depends on it.
"""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _NoTl:
        constexpr = staticmethod(lambda x: x)

    triton = _NoTriton()
    tl = _NoTl()

MAX_BLOCK_T = 1024


def block_t(T: int) -> int:
    """Block width over T for the per-token kernels: T rounded up to a power of two, at most 1024."""
    return min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T)


@triton.jit
def clamp(x, lo, hi):
    """min(max(x, lo), hi), NaN if x or a bound is NaN (torch.clamp's rule)."""
    return tl.where((lo != lo) | (hi != hi), lo + hi, tl.where(x < lo, lo, tl.where(x > hi, hi, x)))


@triton.jit
def nan_max(a, b):
    """max(a, b), NaN if either is NaN (torch.maximum's rule)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def load_token_tiles(a_ptr, b_ptr, c_ptr, mask_ptr, row, start, T, BLOCK_T: tl.constexpr):
    """Tiles [start, start + BLOCK_T) of row `row` of three [B, T] tensors and the mask, as fp32,
    with the element offsets and the valid flags (in bounds and mask != 0). Inputs at invalid
    positions read as 0, so a NaN there never reaches a sum or a gradient."""
    cols = start + tl.arange(0, BLOCK_T)
    in_row = cols < T
    offs = row * T + cols
    m = tl.load(mask_ptr + offs, mask=in_row, other=0).to(tl.float32)
    valid = m != 0
    a = tl.load(a_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return a, b, c, m, offs, in_row


__all__ = ["HAS_TRITON", "triton", "tl", "block_t", "clamp", "nan_max", "load_token_tiles"]
