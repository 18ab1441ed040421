"""The GRPO loss_type vocabulary TRL's GRPOTrainer and Liger's LigerFusedLinearGRPOLoss share, as
fused_linear_ppo_loss's arguments (one copy for both doors):

    grpo, sapo   mean over the micro-batch's sequences of their token means
    bnpo         mean over the micro-batch's valid tokens
    dr_grpo      sum over B x max_completion_length
    dapo, cispo  sum over a token count the caller gives (TRL's and Liger's num_items_in_batch)

cispo's epsilon_high is an absolute cap C on the detached weight (clip_low 1: no lower bound,
clip_high C - 1); delta ("two-sided clipping", min(ratio, delta)) is ppo_fast's dual clip, the
same thing only where delta >= 1 + epsilon_high.
"""
from __future__ import annotations

from ppo_fast.integrations import unsupported

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # the clipped surrogate (and its clip fraction)


def check(peer: str, loss_type: str, epsilon_high: float, delta) -> None:
    """Refuse a loss_type, or a cispo cap / delta, that fused_linear_ppo_loss would compute differently."""
    if loss_type not in LOSS_TYPES:
        raise unsupported(peer, f"loss_type={loss_type!r}", f"supported: {LOSS_TYPES}")
    if loss_type == "cispo" and epsilon_high < 1.0:
        raise unsupported(peer, f"epsilon_high={epsilon_high} with cispo", "a cap below 1")
    if delta is not None and loss_type in CLIP_TYPES and delta < 1 + epsilon_high:
        raise unsupported(peer, f"delta={delta}", "two-sided clipping is the dual clip only for delta >= "
                                                  "1 + epsilon_high")


def objective(loss_type: str, level: str, epsilon_low: float, epsilon_high: float, delta, tau_pos: float,
              tau_neg: float) -> dict:
    """fused_linear_ppo_loss's objective keywords for a loss_type and importance_sampling_level."""
    if loss_type == "cispo":
        return dict(surrogate="cispo", clip_low=1.0, clip_high=epsilon_high - 1.0, ratio_level=level)
    if loss_type == "sapo":
        return dict(surrogate="sapo", tau_pos=float(tau_pos), tau_neg=float(tau_neg), ratio_level=level)
    return dict(clip_low=epsilon_low, clip_high=epsilon_high, dual_clip=delta, ratio_level=level)


def aggregation(loss_type: str, mask, *, max_completion_length, token_count, accumulation: float = 1.0) -> dict:
    """fused_linear_ppo_loss's (agg, num_tokens | num_seqs) for a loss_type; the divisor of grpo,
    sapo, bnpo and dr_grpo is multiplied by `accumulation` (the gradient-accumulation steps),
    dapo and cispo divide by `token_count()` (called only for them; the peer's own clamping done)."""
    B = mask.shape[0]
    if loss_type in ("grpo", "sapo"):
        return {"agg": "seq-mean-token-mean", "num_seqs": float(B) * accumulation}
    if loss_type == "bnpo":
        return {"agg": "token-mean", "num_tokens": max(float(mask.sum()), 1.0) * accumulation}
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        return {"agg": "token-mean", "num_tokens": float(B * max_completion_length) * accumulation}
    return {"agg": "token-mean", "num_tokens": float(token_count())}
