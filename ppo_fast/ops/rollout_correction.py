"""Rollout correction: importance weights pi_old / pi_rollout for tokens sampled by another engine
(vLLM, SGLang, a sampler in another precision), to feed a loss's `is_weights`.

A handful of elementwise ops and row sums over [B, T] log-probs, read once: plain torch on every
backend (the reference is the implementation), no host sync, so it captures in a CUDA graph and
compiles with the loss around it. See ppo_fast.ops.reference.rollout_correction for the math.

    is_weights, keep, stats = rollout_correction(old_logp, rollout_logp, mask, level="token", mode="truncate", high=2.0)
    loss, _ = ppo_policy_loss(logp, old_logp, adv, mask, is_weights=is_weights)

Peers' settings: verl TIS (rollout_is token|sequence, a threshold C) = level token|sequence, mode
truncate, high=C; verl IcePop ("lower_upper") = mode mask, low, high; TRL vllm_importance_sampling_mode
token|sequence _truncate|_mask = level, mode, low = clip_min, high = clip_max; OpenRLHF
is_correction_level token = level token; its seq level gates on the geometric mean (level
geometric) while keeping each token's own ratio (ppo_fast.integrations.openrlhf composes the two).
"""
from __future__ import annotations

import math

from ppo_fast.ops import reference
from ppo_fast.ops.backend import dispatch
from ppo_fast.ops.checks import per_token_inputs, require_choice, require_python_float

ROLLOUT_CORRECTION = {"torch": reference.rollout_correction}  # the reference only: runs under any backend
IMPLEMENTATIONS = {"rollout_correction": ROLLOUT_CORRECTION}


def require_bounds(low, high):
    """(low, high) as floats: 0 <= low <= high (low None: no lower bound), high > 0 (inf: none)."""
    high = require_python_float("high", high)
    if not (high > 0) or math.isnan(high):
        raise ValueError(f"high: expected an upper bound > 0 on the importance ratio (inf: none), got {high}")
    if low is not None:
        low = require_python_float("low", low)
        if not (0 <= low <= high):
            raise ValueError(f"low: expected None or a bound in [0, high={high}], got {low}")
    return low, high


def rollout_correction(old_log_prob, rollout_log_prob, mask, *, level="token", mode="truncate", low=None, high=2.0):
    """(is_weights, keep_mask, stats): importance weights pi_old / pi_rollout per token ([B, T],
    level "token") or per sequence ([B, 1], "sequence": the product of the ratios, "geometric":
    their geometric mean), truncated to [low, high] (mode "truncate", TIS) or zeroed outside it
    (mode "mask", MIS / IcePop); keep_mask the valid tokens whose unit was kept; stats (detached
    float32 scalars) is_weight_mean, is_weight_max, is_outside_frac, rollout_k1, rollout_k3,
    rollout_ppl_ratio (see ppo_fast.ops.reference.rollout_correction). A NaN rollout log-prob (a token
    the sampler could not score) gives that token ratio 1, as TRL's vLLM correction does. No gradient."""
    old_log_prob, rollout_log_prob, mask = per_token_inputs(
        {"old_log_prob": old_log_prob, "rollout_log_prob": rollout_log_prob}, mask)
    require_choice("level", level, reference.CORRECTION_LEVELS)
    require_choice("mode", mode, reference.CORRECTION_MODES)
    low, high = require_bounds(low, high)
    return dispatch("rollout_correction", ROLLOUT_CORRECTION, old_log_prob.device, old_log_prob.detach(),
                    rollout_log_prob, mask, level=level, mode=mode, low=low, high=high)
