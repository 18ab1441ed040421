"""Helpers shared by the tests (not a test module): the device and its backends, float64
comparison at each dtype's tolerance, and the inputs trainers see."""
import contextlib
import os

import pytest
import torch

import ppo_fast
from ppo_fast.ops import IMPLEMENTATIONS
from ppo_fast.ops.backend import available_backends, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NATIVE_FOR_DEVICE = {"cpu": "cpp", "cuda": "cuda"}


def backends_for(op: str) -> list:
    """The backends a test of `op` runs on here: those of its table that target DEVICE, and auto."""
    wanted = {"torch", NATIVE_FOR_DEVICE[DEVICE.type]} | ({"triton"} if triton_available() else set())
    return [b for b in IMPLEMENTATIONS[op] if b in wanted] + ["auto"]


@contextlib.contextmanager
def on_backend(name: str):
    """use_backend(name); a native backend that was not built fails the test under
    PPO_FAST_REQUIRE_NATIVE=1 and skips it (saying why) otherwise."""
    if name in NATIVE_FOR_DEVICE.values() and name not in available_backends(DEVICE):
        message = f"the {name} extension is not built (run `make native`)"
        if os.environ.get("PPO_FAST_REQUIRE_NATIVE") == "1":
            pytest.fail(message + " and PPO_FAST_REQUIRE_NATIVE=1")
        pytest.skip(message)
    with ppo_fast.use_backend(name):
        yield


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


def assert_close_f64(actual: torch.Tensor, expected: torch.Tensor, name: str = "", magnitude: float = 1.0,
                     equal_nan: bool = False) -> None:
    """Compare a backend's result with the float64 oracle, at the tolerance of its dtype.

    `magnitude` scales the absolute tolerance for results whose fp32 error grows with the
    size of the inputs (e.g. terms in log p, whose absolute error grows with |logits / T|).
    With equal_nan, `actual` must be non-finite (NaN or inf) exactly where the oracle is, and
    close to it elsewhere: a scan and a sequential loop can turn one inf into NaN differently.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, atol_frac = tolerances(actual.dtype)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if equal_nan:
        finite = torch.isfinite(expected)
        bad = torch.isfinite(actual) != finite
        assert not bad.any(), f"{name}: non-finite where the oracle is finite or the reverse, at {bad.nonzero()[:5].tolist()}"
        actual, expected = actual[finite], expected[finite]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    scale *= max(magnitude, 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_frac * scale, msg=lambda m: f"{name}: {m}")


def ragged_mask(B, T, *, seed=0, dtype=torch.bool, empty_rows=(), gaps=True):
    """Response masks as trainers see them: a prompt prefix and right padding of zeros, a
    response of random length, gaps inside it (tool/observation tokens), some rows empty."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, max(T // 3, 1), (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[b, start:end] = True
        if gaps and end - start > 4:
            mask[b, start + 1 : start + 1 + (end - start) // 4] = False
    for b in empty_rows:
        mask[b] = False
    return mask.to(dtype).to(DEVICE)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as x in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def grad_of(fn, x, upstream):
    x = x.detach().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return out, grad


def check_loss(op, ref_op, x, others, kwargs, stat_names=()):
    """A loss op's value, its gradient to x (random upstream scale) and stats vs the float64 reference."""
    upstream = 1.7
    out, grad = grad_of(lambda v: op(v, *others, **kwargs), x, upstream)
    others64 = [o.double() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in others]
    out64, grad64 = grad_of(lambda v: ref_op(v, *others64, **kwargs), x.double(), upstream)
    loss, loss64 = (out[0], out64[0]) if isinstance(out, tuple) else (out, out64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == x.dtype
    assert_close_f64(loss, loss64, "loss")
    assert_close_f64(grad, grad64, "grad")
    stats, stats64 = (out[1], out64[1]) if isinstance(out, tuple) else ({}, {})
    if isinstance(stats, dict):
        for name in stat_names:
            assert not stats[name].requires_grad
            assert_close_f64(stats[name], stats64[name], name)
    elif isinstance(stats, torch.Tensor):
        assert_close_f64(stats, stats64, "clipfrac")


def tiny_config(tmp_path, **overrides):
    """A PPOConfig for a few quick steps of the embedded task on DEVICE (CUDA when present)."""
    from ppo_fast.ppo import PPOConfig

    values = dict(out=str(tmp_path / "run"), device=DEVICE.type, progress=False, rollout_batch_size=16,
                  mini_batch_size=8, micro_batch_size=4, ppo_epochs=1, steps=2)
    return PPOConfig(**{**values, **overrides})


def tiny_tokenizer():
    """A word-level tokenizer over digits and a few letters (24 ids: pad 0, eos 1, unk 2), for the
    peers' trainers on tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{str(i): i + 3 for i in range(10)},
             **{c: 13 + i for i, c in enumerate("abcdefghij ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
