"""ppo_policy_loss, value_loss, agg_loss, masked_mean, masked_whiten against float64."""
import pytest
import torch
from conftest import DEVICE, assert_close_f64
from helpers import ragged_mask, randn

from ppo_fast import reference
from ppo_fast.ops import agg_loss, masked_mean, masked_whiten, ppo_policy_loss, value_loss

AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
SHAPES = [(5, 37), (3, 1), (4, 1100)]  # odd T, T = 1, T past one block


def grad_of(fn, x, upstream):
    x = x.detach().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss * upstream, x)
    return out, grad


def check_loss(op, ref_op, x, others, kwargs, stat_names=()):
    """Loss value, its gradient to x (random upstream scale) and stats vs the float64 reference."""
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


def policy_inputs(B, T, dtype, seed=0):
    old = randn(B, T, seed=seed, scale=0.5) - 2.0
    log_prob = (old + randn(B, T, seed=seed + 1, scale=0.3)).to(dtype)
    return log_prob, old.to(dtype), randn(B, T, seed=seed + 2), ragged_mask(B, T, seed=seed, empty_rows=[1] if B > 2 else [])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_float64(backend, shape, agg, dual_clip, dtype):
    log_prob, old, adv, mask = policy_inputs(*shape, dtype)
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)
    check_loss(ppo_policy_loss, reference.ppo_policy_loss, log_prob, (old, adv, mask), kwargs,
               ("clipfrac", "approx_kl", "clipfrac_lower"))


def test_policy_loss_global_denominators_and_float_mask(backend):
    log_prob, old, adv, mask = policy_inputs(6, 41, torch.float32, seed=3)
    for agg, kwargs in [("token-mean", {"num_tokens": 500}), ("seq-mean-token-sum", {"num_seqs": 16}),
                        ("seq-mean-token-mean", {"num_seqs": 16})]:
        check_loss(ppo_policy_loss, reference.ppo_policy_loss, log_prob, (old, adv, mask.float()),
                   dict(agg=agg, **kwargs), ("clipfrac", "approx_kl"))


def test_policy_loss_closed_form(backend):
    """Independent of the reference: at ratio 1 nothing clips, loss = -mean(A), grad = -A m / n."""
    adv = randn(3, 7, seed=4)
    mask = ragged_mask(3, 7, seed=4)
    log_prob = torch.full((3, 7), -1.5, device=DEVICE, requires_grad=True)
    loss, stats = ppo_policy_loss(log_prob, log_prob.detach().clone(), adv, mask, dual_clip=2.0)
    n = mask.sum()
    torch.testing.assert_close(loss, -(adv * mask).sum() / n)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv * mask / n)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and stats["clipfrac_lower"] == 0


def test_policy_loss_fully_masked_is_zero(backend):
    log_prob, old, adv, _ = policy_inputs(3, 9, torch.float32)
    mask = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    for agg in AGGS:
        x = log_prob.clone().requires_grad_()
        loss, stats = ppo_policy_loss(x, old, adv, mask, agg=agg, dual_clip=3.0)
        loss.backward()
        assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
        assert torch.all(x.grad == 0)


def test_policy_loss_gradient_only_to_log_prob(backend):
    log_prob, old, adv, mask = policy_inputs(3, 9, torch.float32)
    old.requires_grad_()
    adv.requires_grad_()
    x = log_prob.clone().requires_grad_()
    loss, _ = ppo_policy_loss(x, old, adv, mask)
    loss.backward()
    assert x.grad is not None and old.grad is None and adv.grad is None


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


def bad(match, exc=ValueError):
    return pytest.raises(exc, match=match)


def test_bad_inputs_give_clear_errors():
    log_prob, old, adv, mask = policy_inputs(3, 5, torch.float32)
    with bad(r"old_log_prob: expected shape \(3, 5\) \(the shape of log_prob\), got \(3, 4\)"):
        ppo_policy_loss(log_prob, old[:, :4], adv, mask)
    with bad(r"mask: expected a bool or 0/1 mask"):
        ppo_policy_loss(log_prob, old, adv, mask.float() * 2)
    with bad(r"mask: expected shape \(3, 5\)"):
        ppo_policy_loss(log_prob, old, adv, mask[:2])
    with bad(r"agg: expected one of .*got 'mean'"):
        ppo_policy_loss(log_prob, old, adv, mask, agg="mean")
    with bad(r"dual_clip: expected None or a value > 1, got 1.0"):
        ppo_policy_loss(log_prob, old, adv, mask, dual_clip=1.0)
    with bad(r"clip_low: expected a finite value >= 0, got -0.1"):
        ppo_policy_loss(log_prob, old, adv, mask, clip_low=-0.1)
    with bad(r"num_tokens: expected None or a number > 0"):
        ppo_policy_loss(log_prob, old, adv, mask, num_tokens=0)
    with bad(r"log_prob: expected a \[B, T\] tensor, got shape \(15,\)"):
        ppo_policy_loss(log_prob.flatten(), old.flatten(), adv.flatten(), mask.flatten())
    with bad(r"advantages: expected dtype .*got torch.int64", TypeError):
        ppo_policy_loss(log_prob, old, adv.long(), mask)
    with bad(r"clip: expected a finite value >= 0, got -1"):
        value_loss(log_prob, old, adv, mask, clip=-1.0)
    with bad(r"mode: expected one of"):
        agg_loss(log_prob, mask, "sum")
    with bad(r"tensors must be on one device"):
        masked_mean(log_prob, mask.to("meta"))
