"""dpo_loss against its closed form in float64 (values and gradients), and trained through the fused op."""
import math

import pytest
import torch
from support import DEVICE, randn

from ppo_fast.ops import dpo_loss, fused_linear_logprobs

OP = "dpo_loss"


def test_values_and_gradients_match_the_closed_form(backend):
    pc, pr, rc, rr = (randn(5, seed=s) - 20 for s in range(4))
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1)
    z = [0.3 * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    sig = [1 / (1 + math.exp(-v)) for v in z]
    expected = sum(-0.9 * math.log(s) - 0.1 * math.log(1 - s) for s in sig) / 5
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    grad_c, grad_r = torch.autograd.grad(loss, (pc, pr))
    # d/dz of -(1-e) log s(z) - e log s(-z) = -(1-e)(1-s) + e s; dz/dpi_c = beta, dz/dpi_r = -beta
    dz = torch.tensor([(-0.9 * (1 - s) + 0.1 * s) * 0.3 / 5 for s in sig], dtype=torch.float64)
    torch.testing.assert_close(grad_c.double().cpu(), dz, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad_r.double().cpu(), -dz, rtol=1e-5, atol=1e-8)
    assert float(stats["accuracy"]) == pytest.approx(sum(v > 0 for v in z) / 5)
    assert float(stats["margin"]) == pytest.approx(sum(z) / 5, rel=1e-5)


def test_sequence_logprobs_from_the_fused_op_train_toward_the_chosen(backend):
    """A few DPO steps on a linear head, sequence log-probs from fused_linear_logprobs: the
    chosen responses' implicit reward overtakes the rejected ones'."""
    B, T, H, V = 4, 6, 8, 31
    hidden = randn(2 * B, T, H, seed=10)
    weight = randn(V, H, seed=11, scale=0.1).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    with torch.no_grad():
        ref = fused_linear_logprobs(hidden, weight, labels).sum(-1)
    optimizer = torch.optim.SGD([weight], lr=0.5)
    for _ in range(30):
        seq = fused_linear_logprobs(hidden, weight, labels).sum(-1)
        loss, stats = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(stats["accuracy"]) == 1.0 and float(stats["margin"]) > 0


def test_bad_inputs_give_clear_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"policy_rejected_logp: expected shape \(3,\)"):
        dpo_loss(x, torch.zeros(4), x, x)
    with pytest.raises(ValueError, match=r"ref_chosen_logp: expected a \[B\] tensor"):
        dpo_loss(x, x, torch.zeros(3, 2), x)
    with pytest.raises(ValueError, match=r"beta: expected a finite value > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 0.5\)"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
