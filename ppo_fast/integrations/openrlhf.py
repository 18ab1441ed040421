"""OpenRLHF's signatures (0.11: openrlhf.models.loss, openrlhf.models.utils and the GAE of
openrlhf.trainer.ppo_utils.experience_maker), computed by ppo_fast.ops.

    from ppo_fast.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl
"""
from __future__ import annotations

import torch

from ppo_fast import ops
from ppo_fast.integrations import unsupported

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CLAMP = 10.0  # OpenRLHF clamps every estimator's value to [-10, 10]
_NO_CLIP = float(torch.finfo(torch.float32).max)


def _mask_or_ones(mask, like):
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask


def _token_or_sequence_mean(token_level_loss, dp_size, batch_num_tokens, global_batch_size) -> dict:
    """OpenRLHF's aggregate_loss as ppo_fast's (agg, num_tokens, num_seqs): a global count over
    dp_size ranks is ppo_fast's count / dp_size; without one, the local mean (dp_size unused).
    Counts may be tensors, as OpenRLHF passes them (read once: a device sync on CUDA)."""
    batch_num_tokens, global_batch_size = (None if c is None else float(c) for c in (batch_num_tokens,
                                                                                     global_batch_size))
    if token_level_loss:
        return {"agg": "token-mean", "num_tokens": None if batch_num_tokens is None else batch_num_tokens / dp_size}
    return {"agg": "seq-mean-token-mean", "num_seqs": None if global_batch_size is None else global_batch_size / dp_size}


class PolicyLoss(torch.nn.Module):
    """openrlhf.models.loss.PolicyLoss for policy_loss_type="ppo" without IS correction.
    forward -> (loss, clip_ratio, ppo_kl, vllm_kl=None, is_filter_ratio=None); ppo_kl is the masked
    mean of the raw (unclamped) old - new log-ratio, as OpenRLHF reports it."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 **is_correction):
        super().__init__()
        if policy_loss_type != "ppo":
            raise unsupported("openrlhf", f"policy_loss_type={policy_loss_type!r}", "only 'ppo'")
        if is_correction_level != "off":
            raise unsupported("openrlhf", f"is_correction_level={is_correction_level!r}",
                              "no train/rollout importance-sampling correction")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss = token_level_loss

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        mask = _mask_or_ones(action_mask, log_probs)
        loss, stats = ops.ppo_policy_loss(
            log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            **_token_or_sequence_mean(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size))
        ppo_kl = ops.masked_mean((old_log_probs - log_probs).detach(), mask)
        return loss, stats["clipfrac"], ppo_kl, None, None


class ValueLoss(torch.nn.Module):
    """openrlhf.models.loss.ValueLoss: 0.5 * the (clipped, with clip_eps) squared error."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True):
        super().__init__()
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                global_batch_size=None):
        loss, _ = ops.value_loss(values, old_values, returns, _mask_or_ones(action_mask, values),
                                 clip=_NO_CLIP if self.clip_eps is None else self.clip_eps,
                                 **_token_or_sequence_mean(self.token_level_loss, dp_size, batch_num_tokens,
                                                           global_batch_size))
        return loss


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    """openrlhf.models.utils.compute_approx_kl: k1 / k2 / k3 clamped to [-10, 10]; with
    unbiased_gradient, the value of the estimator and the gradient of k2 (straight-through)."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    if unbiased_gradient and log_probs_old is not None:
        raise unsupported("openrlhf", "log_probs_old (importance-weighted KL gradient)")
    if not unbiased_gradient:
        return ops.kl_penalty(log_probs, log_probs_base, estimator=kl_estimator).clamp(-KL_CLAMP, KL_CLAMP)
    value = ops.kl_penalty(log_probs, log_probs_base, estimator=kl_estimator + "+")  # gradient of k2
    return value + (value.clamp(-KL_CLAMP, KL_CLAMP) - value).detach()


def masked_mean(tensor, mask, dim=None):
    """openrlhf.models.utils.masked_mean over all of a [B, T] tensor (dim=None). ppo_fast returns 0
    for an empty mask where OpenRLHF divides 0 by 0."""
    if dim is not None:
        raise unsupported("openrlhf", f"masked_mean(dim={dim})", "ppo_fast's masked_mean reduces the whole tensor")
    return ops.masked_mean(tensor, _mask_or_ones(mask, tensor))


def get_advantages_and_returns(values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's GAE (experience_maker.get_advantages_and_returns, without `self`): (advantages,
    returns = advantages + mask * values). OpenRLHF runs through masked positions instead of
    skipping them, so a mask must be each row's response followed by padding only (checked)."""
    mask = _mask_or_ones(action_mask, values).bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise unsupported("openrlhf", "an action_mask with a gap or leading zeros",
                          "OpenRLHF's GAE runs through masked positions, ppo_fast's skips them")
    advantages, returns = ops.gae(rewards, values, mask, gamma=float(gamma), lam=float(lambd))
    return advantages, returns
