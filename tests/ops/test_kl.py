"""kl_penalty and compute_rewards against float64."""
import pytest
import torch
from support import DEVICE, assert_close_f64, ragged_mask, randn

from ppo_fast.ops import compute_rewards, kl_penalty, reference
from ppo_fast.ops.kl import ESTIMATORS

OP = "kl_penalty"  # the `backend` fixture runs over this op's backends


def kl_inputs(shape, dtype, seed=0):
    log_prob = randn(*shape, seed=seed, scale=2.0) - 3
    ref = log_prob + randn(*shape, seed=seed + 1, scale=1.5)
    n = min(3, ref.numel())
    ref.view(-1)[:n] = log_prob.view(-1)[:n] + torch.tensor([25.0, -25.0, 3.0], device=DEVICE)[:n]  # the clamps
    return log_prob.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 1500)])
def test_kl_penalty_matches_float64(backend, estimator, dtype, shape):
    log_prob, ref = (t.requires_grad_() for t in kl_inputs(shape, dtype))
    kl = kl_penalty(log_prob, ref, estimator=estimator)
    assert kl.dtype == torch.float32 and kl.shape == log_prob.shape
    upstream = randn(*shape, seed=9)
    grad_lp, grad_ref = torch.autograd.grad((kl * upstream).sum(), (log_prob, ref))
    log_prob64, ref64 = (t.detach().double().requires_grad_() for t in (log_prob, ref))
    kl64 = reference.kl_penalty(log_prob64, ref64, estimator=estimator)
    grad_lp64, grad_ref64 = torch.autograd.grad((kl64 * upstream).sum(), (log_prob64, ref64))
    assert_close_f64(kl, kl64, "kl")
    assert_close_f64(grad_lp, grad_lp64, "grad log_prob")
    assert_close_f64(grad_ref, grad_ref64, "grad ref")


def test_kl_closed_forms(backend):
    log_prob = torch.tensor([-1.0, -2.0], device=DEVICE)
    ref = torch.tensor([-1.5, -1.0], device=DEVICE)
    torch.testing.assert_close(kl_penalty(log_prob, ref, estimator="k1"), torch.tensor([0.5, -1.0], device=DEVICE))
    torch.testing.assert_close(kl_penalty(log_prob, ref, estimator="abs"), torch.tensor([0.5, 1.0], device=DEVICE))
    torch.testing.assert_close(kl_penalty(log_prob, ref, estimator="mse"), torch.tensor([0.125, 0.5], device=DEVICE))
    kappa = ref - log_prob
    torch.testing.assert_close(kl_penalty(log_prob, ref, estimator="low_var_kl"), kappa.exp() - kappa - 1)
    x = log_prob.clone().requires_grad_()
    value = kl_penalty(x, ref, estimator="k3+")
    value.sum().backward()
    torch.testing.assert_close(value, kappa.exp() - kappa - 1)
    torch.testing.assert_close(x.grad, log_prob - ref)  # the k2 gradient


@pytest.mark.parametrize("estimator", ["k1", "k3", "abs"])
def test_compute_rewards_matches_float64(backend, estimator):
    B, T = 5, 1100
    log_prob, ref = kl_inputs((B, T), torch.float32, seed=2)
    mask = ragged_mask(B, T, seed=2, empty_rows=[3])
    scores = randn(B, seed=3)
    rewards = compute_rewards(scores, log_prob, ref, mask, kl_coef=0.05, estimator=estimator)
    expected = reference.compute_rewards(scores.double(), log_prob.double(), ref.double(), mask, kl_coef=0.05,
                                         estimator=estimator)
    assert rewards.dtype == torch.float32
    assert_close_f64(rewards, expected, "rewards")


def test_compute_rewards_closed_form(backend):
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], device=DEVICE)
    zeros = torch.zeros(3, 6, device=DEVICE)
    rewards = compute_rewards(torch.tensor([2.0, 3.0, 4.0], device=DEVICE), zeros, zeros, mask, kl_coef=0.1)
    expected = torch.zeros(3, 6, device=DEVICE)
    expected[0, 4] = 2.0
    expected[2, 5] = 4.0
    torch.testing.assert_close(rewards, expected)


def test_bad_inputs_give_clear_errors():
    log_prob, ref = kl_inputs((2, 5), torch.float32)
    with pytest.raises(ValueError, match=r"estimator: expected one of .*got 'k4'"):
        kl_penalty(log_prob, ref, estimator="k4")
    with pytest.raises(ValueError, match=r"ref_log_prob: expected shape \(2, 5\)"):
        kl_penalty(log_prob, ref[:, :3])
    with pytest.raises(ValueError, match=r"scores: expected shape \(2,\) \(\[B\], one score per sequence\)"):
        compute_rewards(torch.zeros(3, device=DEVICE), log_prob, ref, torch.ones(2, 5, device=DEVICE), kl_coef=0.1)
    with pytest.raises(TypeError, match=r"kl_coef: expected a Python float"):
        compute_rewards(torch.zeros(2, device=DEVICE), log_prob, ref, torch.ones(2, 5, device=DEVICE), kl_coef=None)


@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e.endswith("+")])
def test_straight_through_estimators_with_infinite_log_probs_follow_the_reference(backend, estimator):
    """'+': the value k2 + sg[value - k2], NaN wherever k2 is infinite (a +inf log-prob against a -inf
    reference), exactly where the reference's is; finite entries as usual."""
    log_prob = torch.tensor([[float("inf"), 0.0, -1.0, -3.0]], device=DEVICE)
    ref = torch.tensor([[float("-inf"), 0.0, -2.0, -float("inf")]], device=DEVICE)
    got = kl_penalty(log_prob, ref, estimator=estimator)
    want = reference.kl_penalty(log_prob.double(), ref.double(), estimator=estimator)
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu())
    finite = torch.isfinite(want)
    assert_close_f64(got[finite], want[finite], estimator)
    rewards = compute_rewards(torch.zeros(1, device=DEVICE), log_prob, ref, torch.ones(1, 4, dtype=torch.bool,
                                                                                      device=DEVICE), kl_coef=0.1,
                              estimator=estimator)
    assert torch.isnan(rewards[0, 0]) and torch.isfinite(rewards[0, 1:3]).all()
