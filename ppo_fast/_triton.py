"""Import Triton where it exists, so that ppo_fast imports everywhere.

Without Triton (macOS, Windows) the kernels below are never launched: `triton.jit`
becomes a no-op decorator and the backend resolver refuses the `triton` backend.
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

    triton = _NoTriton()
    tl = None

__all__ = ["HAS_TRITON", "triton", "tl"]
