"""The critic-free variants in the loop: GRPO, RLOO and a REINFORCE++-style baseline from groups of
responses to one prompt (no critic loaded or trained)."""
import pytest
import torch

pytest.importorskip("transformers")
from support import DEVICE, tiny_config  # noqa: E402

from ppo_fast.ops import reference  # noqa: E402
from ppo_fast.ppo import ConfigError, PPOConfig, PPOTrainer  # noqa: E402


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_baseline"])
def test_loop_advantages_equal_the_reference(tmp_path, estimator):
    """The group's advantage on every response token, minus the KL still to come (kl_coef in
    the reward), as the reference ops compute it in float64 on the same experience."""
    trainer = PPOTrainer(tiny_config(tmp_path, advantage_estimator=estimator, samples_per_prompt=4, kl_coef=0.05))
    assert trainer.critic is None and trainer.optimizer.params[1] == []
    rollout = trainer.rollout()
    assert rollout.prompts[0:4] == [rollout.prompts[0]] * 4  # each prompt's responses side by side
    experience, _ = trainer.make_experience(rollout)
    scores = trainer.score(rollout).double()
    mask = experience.mask
    mode = {"grpo": "grpo", "rloo": "rloo", "reinforce_baseline": "none"}[estimator]
    kl_rewards = reference.compute_rewards(torch.zeros_like(scores), experience.old_logp.double(),
                                           experience.ref_logp.double(), mask, kl_coef=0.05)
    kl_to_go, _ = reference.gae(kl_rewards, torch.zeros_like(kl_rewards), mask, gamma=1.0, lam=1.0)
    expected = reference.group_advantages(scores, 4, mode=mode)[:, None] * mask + kl_to_go
    if estimator == "reinforce_baseline":
        expected = reference.masked_whiten(expected, mask)
    torch.testing.assert_close(experience.advantages.double(), expected, rtol=1e-4, atol=1e-5)


def test_a_critic_free_step_trains_the_policy_only(tmp_path):
    trainer = PPOTrainer(tiny_config(tmp_path, advantage_estimator="grpo", samples_per_prompt=4, kl_loss_coef=0.05))
    before = [p.detach().clone() for p in trainer.optimizer.params[0]]
    metrics = trainer.step()
    assert metrics["value_loss"] == 0 and metrics["critic_grad_norm"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.optimizer.params[0]))


def test_default_task_learns_with_grpo(tmp_path):
    history = PPOTrainer(PPOConfig(out=str(tmp_path), device=DEVICE.type, progress=False, steps=100,
                                   advantage_estimator="grpo", samples_per_prompt=4, kl_coef=0.0)).train()
    rewards = [m["reward_mean"] for m in history]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > first + 0.1, f"reward {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("overrides, message", [
    (dict(advantage_estimator="grpo"), "samples_per_prompt must be >= 2"),
    (dict(samples_per_prompt=3), "must be a multiple of samples_per_prompt"),
    (dict(advantage_estimator="ppo"), "advantage_estimator: expected one of"),
])
def test_bad_estimator_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **overrides).validate()
