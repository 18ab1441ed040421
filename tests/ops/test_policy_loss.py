"""ppo_policy_loss against float64: every agg mode, dual clip, global denominators, closed forms."""
import pytest
import torch
from support import DEVICE, check_loss, ragged_mask, randn

from ppo_fast.ops import ppo_policy_loss, reference

OP = "ppo_policy_loss"  # the `backend` fixture runs over this op's backends
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
SHAPES = [(5, 37), (3, 1), (4, 1100)]  # odd T, T = 1, T past one block


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


def test_bad_inputs_give_clear_errors():
    log_prob, old, adv, mask = policy_inputs(3, 5, torch.float32)
    with pytest.raises(ValueError, match=r"old_log_prob: expected shape \(3, 5\) \(the shape of log_prob\), got \(3, 4\)"):
        ppo_policy_loss(log_prob, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match=r"mask: expected a bool or 0/1 mask"):
        ppo_policy_loss(log_prob, old, adv, mask.float() * 2)
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 5\)"):
        ppo_policy_loss(log_prob, old, adv, mask[:2])
    with pytest.raises(ValueError, match=r"agg: expected one of .*got 'mean'"):
        ppo_policy_loss(log_prob, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match=r"dual_clip: expected None or a finite value > 1, got 1.0"):
        ppo_policy_loss(log_prob, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match=r"clip_low: expected a finite value >= 0, got -0.1"):
        ppo_policy_loss(log_prob, old, adv, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match=r"num_tokens: expected None or a finite number > 0"):
        ppo_policy_loss(log_prob, old, adv, mask, num_tokens=0)
    with pytest.raises(ValueError, match=r"log_prob: expected a \[B, T\] tensor, got shape \(15,\)"):
        ppo_policy_loss(log_prob.flatten(), old.flatten(), adv.flatten(), mask.flatten())
    with pytest.raises(TypeError, match=r"advantages: expected dtype .*got torch.int64"):
        ppo_policy_loss(log_prob, old, adv.long(), mask)
