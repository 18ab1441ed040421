"""agg_loss, masked_mean and masked_whiten against float64: every mode, global counts, empty masks,
a large mean with a small spread."""
import pytest
import torch
from support import DEVICE, assert_close_f64, check_loss, ragged_mask, randn

from ppo_fast.ops import agg_loss, masked_mean, masked_whiten, reference

OP = "agg_loss"  # masked_mean and masked_whiten have the same backends (tests/ops/test_backend.py checks)
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agg_loss_matches_float64(backend, agg, dtype):
    loss = randn(5, 1100, seed=9, dtype=dtype)
    mask = ragged_mask(5, 1100, seed=9, empty_rows=[2])
    check_loss(agg_loss, reference.agg_loss, loss, (mask, agg), {})
    check_loss(agg_loss, reference.agg_loss, loss, (mask, agg), dict(num_tokens=3000, num_seqs=9))


def test_agg_loss_closed_form(backend):
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], device=DEVICE)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], device=DEVICE)
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(27 / 5)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 24) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 8) / 2)
    assert agg_loss(loss, mask, "token-mean", num_tokens=10).item() == pytest.approx(2.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_and_whiten(backend, dtype):
    x = randn(4, 1100, seed=10, scale=3.0, dtype=dtype) + 5
    mask = ragged_mask(4, 1100, seed=10)
    check_loss(masked_mean, reference.masked_mean, x, (mask,), {})
    for shift_mean in (True, False):
        whitened = masked_whiten(x, mask, shift_mean=shift_mean)
        assert whitened.dtype == torch.float32 and not whitened.requires_grad
        assert_close_f64(whitened, reference.masked_whiten(x.double(), mask, shift_mean=shift_mean), "whiten")
    valid = masked_whiten(x, mask)[mask.bool()].double()
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-4


def test_masked_stats_of_empty_mask_are_defined(backend):
    x = randn(2, 3, seed=1)
    empty = torch.zeros(2, 3, device=DEVICE)
    assert masked_mean(x, empty).item() == 0
    assert torch.isfinite(masked_whiten(x, empty)).all()


def test_masked_whiten_large_mean_small_spread(backend):
    """mean 1e4, std 1e-2: a one-pass fp32 variance loses every digit; the result must stay at
    fp32 precision relative to the whitened values."""
    x = 1e4 + randn(4, 700, seed=21, scale=1e-2)
    mask = ragged_mask(4, 700, seed=21)
    for shift_mean in (True, False):
        expected = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
        actual = masked_whiten(x, mask, shift_mean=shift_mean)
        magnitude = 1.0 if shift_mean else 1e4
        assert_close_f64(actual, expected, "whiten", magnitude=magnitude)
    valid = masked_whiten(x, mask)[mask].double()
    assert abs(valid.mean().item()) < 1e-3 and abs(valid.std().item() - 1) < 1e-3


def test_bad_inputs_give_clear_errors():
    x, mask = randn(3, 5), ragged_mask(3, 5)
    with pytest.raises(ValueError, match=r"agg: expected one of"):
        agg_loss(x, mask, "sum")
    with pytest.raises(ValueError, match=r"tensors must be on one device"):
        masked_mean(x, mask.to("meta"))
