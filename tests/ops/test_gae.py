"""gae against the float64 loop, closed forms, long sequences, masked gaps."""
import pytest
import torch
from support import DEVICE, assert_close_f64, ragged_mask, randn

from ppo_fast.ops import gae, reference

OP = "gae"  # the `backend` fixture runs over this op's backends


@pytest.mark.parametrize("B, T", [(4, 1), (6, 37), (3, 3000)])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_float64_loop(backend, B, T, gamma, lam):
    rewards = randn(B, T, seed=1, scale=0.1)
    values = randn(B, T, seed=2)
    mask = ragged_mask(B, T, seed=3, empty_rows=[1] if B > 2 else [])
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    adv64, returns64 = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    assert adv.dtype == torch.float32 and not adv.requires_grad
    assert_close_f64(adv, adv64, "advantages")
    assert_close_f64(returns, returns64, "returns")


def test_gae_long_sequences_stay_exact(backend):
    """T = 20000 with gamma = lam = 1 (undiscounted reward-to-go): fp32 error stays at rounding level."""
    B, T = 2, 20000
    rewards = randn(B, T, seed=4, scale=0.01)
    rewards[:, -1] += 1.0
    values = randn(B, T, seed=5, scale=0.1, dtype=torch.bfloat16)
    mask = torch.ones(B, T, device=DEVICE)
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Independent closed form: with gamma = lam = 1, returns are the reward-to-go.
    reward_to_go = rewards.double().flip(-1).cumsum(-1).flip(-1)
    assert (returns.double() - reward_to_go).abs().max() < 1e-4
    assert (adv.double() - (reward_to_go - values.double())).abs().max() < 1e-4


def test_gae_skips_masked_gaps(backend):
    """A gap inside a response carries the next value and the advantage across it."""
    rewards = torch.tensor([[0.0, 9.0, 0.0, 1.0]], device=DEVICE)
    values = torch.tensor([[0.5, 7.0, 0.25, 0.0]], device=DEVICE)
    mask = torch.tensor([[1, 0, 1, 1]], device=DEVICE)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # t=3: 1 - 0 = 1; t=2: 0 + 0 - 0.25 + 1 = 0.75; t=1 skipped (carries 0.75); t=0: 0 + 0.25 - 0.5 + 0.75
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.75, 0.75, 1.0]], device=DEVICE))


def test_gae_empty_batch(backend):
    adv, returns = gae(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, 5, device=DEVICE),
                       torch.zeros(0, 5, device=DEVICE))
    assert adv.shape == (0, 5) and returns.shape == (0, 5)


def test_gae_bad_inputs():
    with pytest.raises(ValueError, match=r"values: expected shape \(2, 3\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"gamma: expected a finite value >= 0, got -1"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=-1.0)


