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
ROLLOUT_REJECTION = {"torch": reference.rollout_rejection}
IMPLEMENTATIONS = {"rollout_correction": ROLLOUT_CORRECTION, "rollout_rejection": ROLLOUT_REJECTION}


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


def rollout_correction(old_log_prob, rollout_log_prob, mask, *, level="token", mode="truncate", low=None, high=2.0,
                       batch_normalize=False):
    """(is_weights, keep_mask, stats): importance weights pi_old / pi_rollout per token ([B, T],
    level "token") or per sequence ([B, 1], "sequence": the product of the ratios, "geometric":
    their geometric mean), truncated to [low, high] (mode "truncate", TIS) or zeroed outside it
    (mode "mask", MIS / IcePop); keep_mask the valid tokens whose unit was kept; stats (detached
    float32 scalars) is_weight_mean, is_weight_max, is_outside_frac, rollout_k1, rollout_k3,
    rollout_ppl_ratio (see ppo_fast.ops.reference.rollout_correction). A NaN rollout log-prob (a token
    the sampler could not score) gives that token ratio 1, as TRL's vLLM correction does.
    batch_normalize: the weights over their batch mean (verl's rollout_is_batch_normalize; the
    divisor as stats["is_batch_norm_factor"]). No gradient."""
    old_log_prob, rollout_log_prob, mask = per_token_inputs(
        {"old_log_prob": old_log_prob, "rollout_log_prob": rollout_log_prob}, mask)
    require_choice("level", level, reference.CORRECTION_LEVELS)
    require_choice("mode", mode, reference.CORRECTION_MODES)
    low, high = require_bounds(low, high)
    if not isinstance(batch_normalize, bool):
        raise TypeError(f"batch_normalize: expected a bool, got {type(batch_normalize).__name__}")
    return dispatch("rollout_correction", ROLLOUT_CORRECTION, old_log_prob.device, old_log_prob.detach(),
                    rollout_log_prob, mask, level=level, mode=mode, low=low, high=high, batch_normalize=batch_normalize)


def require_rejection_criteria(criteria) -> dict:
    """{name: bound} checked: a name "<level>_<k>" (level token / seq_sum / seq_mean / seq_max, k
    k1 / k2 / k3; seq_max with k2 or k3), a bound > 0 for k2 / k3, ratio bounds 0 < low <= high for
    k1; at least one criterion."""
    if not isinstance(criteria, dict) or not criteria:
        raise ValueError(f"criteria: expected a non-empty dict {{name: bound}}, got {criteria!r}")
    names = [f"{level}_{k}" for level in reference.REJECTION_LEVELS for k in reference.REJECTION_ESTIMATORS
             if (level, k) != ("seq_max", "k1")]
    checked = {}
    for name, bound in criteria.items():
        require_choice("criteria", name, names)
        if name.endswith("k1"):
            if not (isinstance(bound, (tuple, list)) and len(bound) == 2):
                raise ValueError(f"criteria[{name!r}]: expected ratio bounds (low, high), got {bound!r}")
            low, high = (require_python_float(f"criteria[{name!r}]", b) for b in bound)
            if not 0 < low <= high < math.inf:
                raise ValueError(f"criteria[{name!r}]: expected 0 < low <= high < inf, got ({low}, {high})")
            checked[name] = (low, high)
        else:
            bound = require_python_float(f"criteria[{name!r}]", bound)
            if not bound > 0:
                raise ValueError(f"criteria[{name!r}]: expected a bound > 0 on the divergence, got {bound}")
            checked[name] = bound
    return checked


def rollout_rejection(old_log_prob, rollout_log_prob, mask, *, criteria):
    """(keep [B, T] bool, stats): the valid tokens to keep when the sampler's policy strays from the
    old one past a divergence bound (a hard trust region: verl's rollout_rs). criteria maps
    "<level>_<k>" to its bound: level token, seq_sum, seq_mean or seq_max (over a sequence's valid
    tokens), k the estimator of KL(rollout || old) from r = log(pi_old / pi_rollout): k1 = -r
    (bounds (low, high) on the ratio: log(low) <= k1 <= log(high)), k2 = r^2 / 2, k3 = e^r - 1 - r
    (a bound: statistic <= bound). A token is kept when every criterion keeps it; multiply the
    loss's mask by `keep`. Stats: each criterion's masked fraction of tokens and of sequences, and
    the combined ones (see ppo_fast.ops.reference.rollout_rejection). No gradient.

        keep, stats = rollout_rejection(old_logp, rollout_logp, mask, criteria={"token_k1": (0.5, 2.0),
                                                                               "seq_max_k3": 0.1})
    """
    old_log_prob, rollout_log_prob, mask = per_token_inputs(
        {"old_log_prob": old_log_prob, "rollout_log_prob": rollout_log_prob}, mask)
    criteria = require_rejection_criteria(criteria)
    return dispatch("rollout_rejection", ROLLOUT_REJECTION, old_log_prob.device, old_log_prob.detach(),
                    rollout_log_prob, mask, criteria=criteria)
