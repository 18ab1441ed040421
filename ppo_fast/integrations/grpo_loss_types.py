"""The GRPO loss_type vocabulary TRL's GRPOTrainer and Liger's LigerFusedLinearGRPOLoss share, as
fused_linear_ppo_loss's arguments (one copy for both doors):

    grpo, sapo          mean over the micro-batch's sequences of their token means
    bnpo                mean over the micro-batch's valid tokens
    dr_grpo             sum over B x max_completion_length
    luspo               mean over the micro-batch's sequences of their token sums (length-unbiased)
    dapo, cispo, vespo  sum over a token count the caller gives (TRL's and Liger's num_items_in_batch)

cispo's epsilon_high is an absolute cap C on the detached weight (clip_low 1: no lower bound,
clip_high C - 1, below 0 for TRL's default C < 1); delta ("two-sided clipping", min(ratio, delta))
is ppo_fast's dual clip where delta >= 1 + epsilon_high (the compiled path), the objective
`clip_delta` below that (it also caps the ratio where A > 0: the generic path).
"""
from __future__ import annotations

from ppo_fast.integrations import unsupported

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the clipped surrogate (and its clip fraction)
TOKEN_COUNT_TYPES = ("dapo", "cispo", "vespo")  # divided by the caller's token count, not per accumulation step


def check(peer: str, loss_type: str) -> None:
    """Refuse a loss_type fused_linear_ppo_loss does not compute."""
    if loss_type not in LOSS_TYPES:
        raise unsupported(peer, f"loss_type={loss_type!r}", f"supported: {LOSS_TYPES}")


def objective(loss_type: str, level: str, epsilon_low: float, epsilon_high: float, delta, tau_pos: float,
              tau_neg: float, vespo: dict) -> dict:
    """fused_linear_ppo_loss's objective keywords for a loss_type and importance_sampling_level; vespo:
    VESPO's k_pos, lambda_pos, k_neg, lambda_neg."""
    if loss_type == "vespo":
        return dict(objective="vespo", **{key: float(value) for key, value in vespo.items()})
    if loss_type == "cispo":
        return dict(objective="cispo", clip_low=1.0, clip_high=epsilon_high - 1.0, ratio_level=level)
    if loss_type == "sapo":
        return dict(objective="sapo", tau_pos=float(tau_pos), tau_neg=float(tau_neg), ratio_level=level)
    if delta is not None and delta < 1 + epsilon_high:
        return dict(objective="clip_delta", clip_low=epsilon_low, clip_high=epsilon_high, delta=float(delta),
                    ratio_level=level)
    return dict(clip_low=epsilon_low, clip_high=epsilon_high, dual_clip=delta, ratio_level=level)


def aggregation(loss_type: str, mask, *, max_completion_length, token_count, accumulation: float = 1.0) -> dict:
    """fused_linear_ppo_loss's (agg, num_tokens | num_seqs) for a loss_type; the divisor of grpo,
    sapo, bnpo, dr_grpo and luspo is multiplied by `accumulation` (the gradient-accumulation steps),
    dapo, cispo and vespo divide by `token_count()` (called only for them; the peer's own clamping done)."""
    B = mask.shape[0]
    if loss_type in ("grpo", "sapo"):
        return {"agg": "seq-mean-token-mean", "num_seqs": float(B) * accumulation}
    if loss_type == "bnpo":
        return {"agg": "token-mean", "num_tokens": max(float(mask.sum()), 1.0) * accumulation}
    if loss_type == "luspo":
        return {"agg": "seq-mean-token-sum", "num_seqs": float(B) * accumulation}
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        return {"agg": "token-mean", "num_tokens": float(B * max_completion_length) * accumulation}
    assert loss_type in TOKEN_COUNT_TYPES, loss_type
    return {"agg": "token-mean", "num_tokens": float(token_count())}
