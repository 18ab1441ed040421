"""Shared fixtures. Without a GPU the Triton kernels run in Triton's interpreter on CPU
tensors; TRITON_INTERPRET must be set before any kernel is defined, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ppo_fast  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# "auto" is the default path: Triton on CUDA, the C++ extension (or torch) on CPU. The CUDA
# kernels of csrc/ run forced where they are built; an op they lack is skipped, not failed.
BACKENDS = ["torch", "triton", "auto"] + [b for b in ("cuda",) if b in ppo_fast.available_backends(DEVICE)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    error = outcome.excinfo[1] if outcome.excinfo else None
    if isinstance(error, ppo_fast.BackendError) and "does not implement this op" in str(error):
        outcome.force_exception(pytest.skip.Exception(str(error), _use_item_location=True))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ppo_fast.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


def tolerances(dtype: torch.dtype):
    """(rtol, atol as a fraction of the largest expected magnitude) for results of `dtype`.

    float32 results carry fp32 accumulation error only; bf16/fp16 results (gradients in the
    input dtype) are allowed one unit in the last place of that dtype. The absolute part is
    relative to max(|expected|, 1): upstream gradients and log-probs are of order one, and an
    entry far below that (1 - p_y of a near-one-hot row) is below fp32's resolution there.
    """
    return {
        torch.float32: (3e-5, 1e-6),
        torch.bfloat16: (2.0**-7, 1e-6),
        torch.float16: (2.0**-10, 1e-6),
    }[dtype]


def assert_close_f64(actual: torch.Tensor, expected: torch.Tensor, name: str = "", magnitude: float = 1.0) -> None:
    """Compare a backend's result with the float64 oracle, at the tolerance of its dtype.

    `magnitude` scales the absolute tolerance for results whose fp32 error grows with the
    size of the inputs (e.g. terms in log p, whose absolute error grows with |logits / T|).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, atol_frac = tolerances(actual.dtype)
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    scale *= max(magnitude, 1.0)
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol_frac * scale, msg=lambda m: f"{name}: {m}"
    )
