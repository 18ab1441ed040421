"""value_loss against float64: every agg mode, fully masked batches, the clip fraction."""
import pytest
import torch
from support import DEVICE, check_loss, ragged_mask, randn

from ppo_fast.ops import reference, value_loss

OP = "value_loss"  # the `backend` fixture runs over this op's backends
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
SHAPES = [(5, 37), (3, 1), (4, 1100)]  # odd T, T = 1, T past one block


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_float64(backend, shape, agg, dtype):
    B, T = shape
    old = randn(B, T, seed=5)
    values = (old + randn(B, T, seed=6, scale=0.4)).to(dtype)
    returns = randn(B, T, seed=7)
    mask = ragged_mask(B, T, seed=8, empty_rows=[0])
    check_loss(value_loss, reference.value_loss, values, (old.to(dtype), returns, mask), dict(clip=0.2, agg=agg))


def test_value_loss_fully_masked_is_zero(backend):
    v = randn(2, 5, seed=1).requires_grad_()
    loss, clipfrac = value_loss(v, randn(2, 5, seed=2), randn(2, 5, seed=3), torch.zeros(2, 5, device=DEVICE))
    loss.backward()
    assert loss.item() == 0 and clipfrac.item() == 0 and torch.all(v.grad == 0)


def test_value_loss_clipfrac_counts_only_clipped_tokens(backend):
    """v = 0.03, old = 0.1, clip 0.2: inside the range, so not clipped (old + clamp(v - old) would
    differ from v by an ulp and count it). verl reports 0 here."""
    one = lambda x: torch.tensor([[x]], device=DEVICE)  # noqa: E731
    loss, clipfrac = value_loss(one(0.03), one(0.1), one(0.0), one(1.0), clip=0.2)
    assert clipfrac.item() == 0.0 and loss.item() == pytest.approx(0.5 * 0.03**2)
    values = randn(8, 300, seed=11, scale=1e-3)  # a zero-initialised value head: tiny steps
    _, clipfrac = value_loss(values, randn(8, 300, seed=12, scale=1e-3), randn(8, 300, seed=13), torch.ones(8, 300,
                             device=DEVICE), clip=0.2)
    assert clipfrac.item() == 0.0
    _, clipfrac = value_loss(one(0.5), one(0.1), one(0.0), one(1.0), clip=0.2)  # really clipped: 0.3 vs 0.5
    assert clipfrac.item() == 0.0  # the clipped loss is smaller: max picks the unclipped, not counted
    _, clipfrac = value_loss(one(0.5), one(0.1), one(1.0), one(1.0), clip=0.2)
    assert clipfrac.item() == 1.0


def test_bad_inputs_give_clear_errors():
    x = randn(3, 5)
    with pytest.raises(ValueError, match=r"clip: expected a finite value >= 0, got -1"):
        value_loss(x, x, x, torch.ones(3, 5, device=DEVICE), clip=-1.0)
    with pytest.raises(ValueError, match=r"returns: expected shape \(3, 5\)"):
        value_loss(x, x, x[:, :2], torch.ones(3, 5, device=DEVICE))
