"""gae, group_advantages and the KL controllers."""
import pytest
import torch
from conftest import DEVICE, assert_close_f64
from helpers import ragged_mask, randn

from ppo_fast import AdaptiveKLController, FixedKLController, reference
from ppo_fast.ops import gae, group_advantages


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


def test_group_advantages_closed_forms(backend):
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], device=DEVICE)
    grpo = group_advantages(scores, 3)
    torch.testing.assert_close(grpo[:3], torch.tensor([-1.0, 0.0, 1.0], device=DEVICE) / (1 + 1e-6))
    torch.testing.assert_close(grpo[3:], torch.zeros(3, device=DEVICE))
    rloo = group_advantages(scores, 3, mode="rloo")
    torch.testing.assert_close(rloo[:3], torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5], device=DEVICE))
    torch.testing.assert_close(group_advantages(scores, 3, mode="none")[:3], torch.tensor([-1.0, 0.0, 1.0],
                                                                                          device=DEVICE))
    assert torch.all(group_advantages(scores, 1) == 0)


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match=r"group_size: 4 does not divide the batch of 6 scores"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=r"mode: expected one of"):
        group_advantages(torch.zeros(6), 3, mode="ppo")
    with pytest.raises(ValueError, match=r"group_size: expected an int >= 1"):
        group_advantages(torch.zeros(6), 0)


def test_gae_bad_inputs():
    with pytest.raises(ValueError, match=r"values: expected shape \(2, 3\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"gamma: expected a finite value >= 0, got -1"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=-1.0)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 64)  # error clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 100 / 10000))
