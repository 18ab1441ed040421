"""OpenRLHF's signatures (0.11: openrlhf.models.loss, openrlhf.models.utils and the GAE of
openrlhf.trainer.ppo_utils.experience_maker), computed by ppo_fast.ops.

    from ppo_fast.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl
"""
from __future__ import annotations

import math

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


# The pre-0.11 spelling of the train/rollout correction (enable_vllm_is_correction,
# vllm_is_truncated_threshold, vllm_is_correction_type) as 0.11's (level, mode).
_LEGACY_CORRECTION = {"tis": ("token", "clip"), "icepop": ("token", "mask"), "seq-mask-tis": ("seq", "mask")}


class PolicyLoss(torch.nn.Module):
    """openrlhf.models.loss.PolicyLoss: policy_loss_type "ppo" (clip, dual clip) or "gspo" (the
    sequence ratio, differentiated through its mean; per-sequence mean aggregation), with the
    train/rollout importance-sampling correction in either spelling: 0.11's is_correction_level
    (token | seq) / is_correction_mode (clip | mask) / is_correction_threshold, or the earlier
    enable_vllm_is_correction / vllm_is_truncated_threshold / vllm_is_correction_type (tis | icepop |
    seq-mask-tis). forward -> (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio); ppo_kl is the
    masked mean of the raw (unclamped) old - new log-ratio, as OpenRLHF reports it. Gating on the
    ratio, or (mask mode) on the sampled token's binary KL or total variation. A keyword OpenRLHF
    does not have is refused (UnsupportedOption)."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold=(0.5, 5.0), enable_vllm_is_correction: bool = False,
                 vllm_is_truncated_threshold=None, vllm_is_correction_type: str = "tis", **unknown):
        super().__init__()
        if unknown:
            raise unsupported("openrlhf", f"PolicyLoss keyword(s) {sorted(unknown)}",
                              "not an argument of OpenRLHF's PolicyLoss (0.11 or earlier)")
        if policy_loss_type not in ("ppo", "gspo"):
            raise unsupported("openrlhf", f"policy_loss_type={policy_loss_type!r}", "only 'ppo' and 'gspo'")
        if enable_vllm_is_correction:
            if is_correction_level != "off":
                raise ValueError("PolicyLoss: the IS correction is given twice (is_correction_level and "
                                 "enable_vllm_is_correction); use one spelling")
            if vllm_is_correction_type not in _LEGACY_CORRECTION:
                raise ValueError(f"vllm_is_correction_type must be one of {sorted(_LEGACY_CORRECTION)}, got "
                                 f"{vllm_is_correction_type!r}")
            if vllm_is_truncated_threshold is None:
                raise ValueError("vllm_is_truncated_threshold: expected (low, high) with enable_vllm_is_correction")
            is_correction_level, is_correction_mode = _LEGACY_CORRECTION[vllm_is_correction_type]
            is_correction_threshold = vllm_is_truncated_threshold
        if is_correction_level not in ("off", "token", "seq"):
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.gating = is_correction_gating
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sequence mean
        self.correction = None if is_correction_level == "off" else (is_correction_level, is_correction_mode,
                                                                     *map(float, is_correction_threshold))

    def _importance_weights(self, old_log_probs, rollout_log_probs, mask):
        """(is_weights, vllm_kl, is_filter_ratio) of the correction, as OpenRLHF computes them."""
        level, mode, low, high = self.correction
        if self.gating != "ratio":
            return self._divergence_gated_weights(old_log_probs, rollout_log_probs, mask)
        if level == "token":
            weights, _, stats = ops.rollout_correction(old_log_probs, rollout_log_probs, mask, level="token",
                                                       mode="truncate" if mode == "clip" else "mask", low=low,
                                                       high=high)
            return weights, stats["rollout_k1"], stats["is_outside_frac"]
        # seq + mask: gate each sequence on its geometric-mean ratio, weigh each kept token by its own ratio
        token_ratio, _, stats = ops.rollout_correction(old_log_probs, rollout_log_probs, mask, level="token",
                                                       high=math.inf)
        gate, _, _ = ops.rollout_correction(old_log_probs, rollout_log_probs, mask, level="geometric", mode="mask",
                                            low=low, high=high)
        kept = gate != 0  # a sequence outside the band, or without tokens (OpenRLHF's 0/0), is dropped
        return token_ratio * kept, stats["rollout_k1"], 1.0 - kept.float().mean()

    def _divergence_gated_weights(self, old_log_probs, rollout_log_probs, mask):
        """Gating on a divergence of the sampled token's probability (OpenRLHF 0.11, mask mode): with
        p, q = the rollout's and the trainer's probabilities clamped to [1e-6, 1 - 1e-6], binary_kl =
        p log(p / q) + (1 - p) log((1 - p) / (1 - q)) or tv = |p - q|, per token or its mean over a
        sequence; units at or below the bound keep their token's ratio pi_old / pi_rollout, the
        others get 0 (O(tokens), detached: the weights are constants)."""
        level, _, low, high = self.correction
        p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
        q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
        if self.gating == "binary_kl":
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:
            stat = (p - q).abs()
        m = mask.to(stat.dtype)
        if level == "seq":  # a sequence without tokens: 0 / 0, dropped (as OpenRLHF's masked mean)
            stat = ((stat * m).sum(-1) / m.sum(-1))[:, None]
        keep = (stat >= low) & (stat <= high)
        weights = torch.where(keep, (old_log_probs - rollout_log_probs).exp(), 0.0) * m
        filtered = (~keep).float()
        filter_ratio = filtered.mean() if level == "seq" else ops.masked_mean(filtered, mask)
        return weights, ops.masked_mean(rollout_log_probs - old_log_probs, mask), filter_ratio

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        mask = _mask_or_ones(action_mask, log_probs)
        if self.correction is not None and rollout_log_probs is None:
            raise ValueError("rollout_log_probs: required with the IS correction on")
        aggregation = _token_or_sequence_mean(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        is_weights = vllm_kl = is_filter_ratio = None
        base = old_log_probs
        if self.policy_loss_type == "gspo":
            if self.correction is not None:  # OpenRLHF's GSPO takes its ratio against the rollout policy instead
                base = rollout_log_probs
        elif self.correction is not None:
            is_weights, vllm_kl, is_filter_ratio = self._importance_weights(old_log_probs.detach(),
                                                                            rollout_log_probs.detach(), mask)
        loss, stats = ops.ppo_policy_loss(
            log_probs, base, advantages, mask, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip, is_weights=is_weights,
            ratio_level="sequence" if self.policy_loss_type == "gspo" else "token", **aggregation)
        ppo_kl = ops.masked_mean((old_log_probs - log_probs).detach(), mask)
        return loss, stats["clipfrac"], ppo_kl, vllm_kl, is_filter_ratio


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
