"""PPO clipped policy loss (asymmetric and dual clip), forward and backward in one pass each.

Per token, with D = clamp(log_prob - old, -20, 20), r = exp(D):

    L1 = -A r,  L2 = -A clamp(r, 1 - c_low, 1 + c_high),  Lc = max(L1, L2)
    L  = min(-A c, Lc) where A < 0 (dual clip c), else Lc
    dL / d log_prob = r * dL/dr * [-20 <= log_prob - old <= 20],
    dL/dr = -A where L1 >= L2 (and not dual-clipped), else 0.

The forward kernel writes per-row masked sums of L and of the statistics (the columns
POLICY_ROW_STATS of the row protocol, ppo_fast/ops/rows.py), and m * dL/dlog_prob for the
backward, which only scales it by the aggregation weight of its row.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import dispatch, native_module
from ppo_fast.ops.checks import per_token_inputs, require_dual_clip, require_nonnegative
from ppo_fast.ops.constants import LOG_RATIO_CLAMP
from ppo_fast.ops.rows import (
    POLICY_ROW_STATS,
    ROW_CLIPPED,
    ROW_LOSS,
    ROW_LOWER_CLIPPED,
    ROW_NEG_LOG_RATIO,
    ROW_TOKENS,
    register_loss_rows_autograd,
    require_agg,
    row_token_means,
    weighted_row_total,
)
from ppo_fast.ops.triton_helpers import block_t, clamp, load_token_tiles, nan_max, tl, triton

_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)
_N_STATS = tl.constexpr(len(POLICY_ROW_STATS))
_LOSS, _TOKENS, _CLIPPED = tl.constexpr(ROW_LOSS), tl.constexpr(ROW_TOKENS), tl.constexpr(ROW_CLIPPED)
_NEG_LOG_RATIO, _LOWER = tl.constexpr(ROW_NEG_LOG_RATIO), tl.constexpr(ROW_LOWER_CLIPPED)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _policy_loss_fwd_kernel(
    log_prob_ptr, old_ptr, adv_ptr, mask_ptr, dloss_ptr, row_stats_ptr, T,
    clip_low, clip_high, dual_clip,
    HAS_DUAL_CLIP: tl.constexpr, NEEDS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    loss_sum = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    clipped_sum = tl.zeros([BLOCK_T], tl.float32)
    neg_delta_sum = tl.zeros([BLOCK_T], tl.float32)
    lower_sum = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        log_prob, old, adv, m, offs, in_row = load_token_tiles(log_prob_ptr, old_ptr, adv_ptr, mask_ptr, row, start,
                                                               T, BLOCK_T)
        raw_delta = log_prob - old
        delta = clamp(raw_delta, -_CLAMP, _CLAMP)
        ratio = tl.exp(delta)
        loss_unclipped = -adv * ratio
        loss_clipped = -adv * clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = nan_max(loss_unclipped, loss_clipped)
        dloss_dratio = tl.where(loss_unclipped >= loss_clipped, -adv, 0.0)
        if HAS_DUAL_CLIP:
            loss_dual = -adv * dual_clip
            lower = (adv < 0) & (loss > loss_dual)
            loss = tl.where(lower, loss_dual, loss)
            dloss_dratio = tl.where(lower, 0.0, dloss_dratio)
            lower_sum += m * lower.to(tl.float32)
        if NEEDS_GRAD:
            in_range = (raw_delta >= -_CLAMP) & (raw_delta <= _CLAMP)
            tl.store(dloss_ptr + offs, tl.where(in_range, m * dloss_dratio * ratio, 0.0), mask=in_row)
        loss_sum += m * loss
        count += m
        clipped_sum += m * (loss_clipped > loss_unclipped).to(tl.float32)
        neg_delta_sum -= m * delta
    out = row_stats_ptr + row * _N_STATS
    tl.store(out + _LOSS, tl.sum(loss_sum, axis=0))
    tl.store(out + _TOKENS, tl.sum(count, axis=0))
    tl.store(out + _CLIPPED, tl.sum(clipped_sum, axis=0))
    tl.store(out + _NEG_LOG_RATIO, tl.sum(neg_delta_sum, axis=0))
    tl.store(out + _LOWER, tl.sum(lower_sum, axis=0))


# ----------------------------------------------------------------------------- launchers
def _forward_triton(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, dual_clip, needs_grad):
    B, T = log_prob.shape
    row_stats = torch.empty(B, len(POLICY_ROW_STATS), device=log_prob.device, dtype=torch.float32)
    dloss = torch.empty(B, T, device=log_prob.device, dtype=torch.float32) if needs_grad else None
    if B:
        _policy_loss_fwd_kernel[(B,)](
            log_prob, old_log_prob, advantages, mask, dloss, row_stats, T,
            clip_low, clip_high, 1.0 if dual_clip is None else dual_clip,
            HAS_DUAL_CLIP=dual_clip is not None, NEEDS_GRAD=needs_grad, BLOCK_T=block_t(T),
        )
    return row_stats, dloss


def _forward_cpp(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, dual_clip, needs_grad):
    inputs = (t.float().contiguous() for t in (log_prob, old_log_prob, advantages, mask))
    return native_module("_C").policy_loss_forward(*inputs, clip_low, clip_high, dual_clip, needs_grad)


# ----------------------------------------------------------------------------- custom op
KERNELS = {"triton": _forward_triton, "cpp": _forward_cpp}


@torch.library.custom_op("ppo_fast::policy_loss_rows", mutates_args=())
def policy_loss_rows(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: Optional[float],
                     needs_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_stats [B, len(POLICY_ROW_STATS)], m dL/dlog_prob [B, T] or empty), float32."""
    row_stats, dloss = KERNELS[backend](log_prob, old_log_prob, advantages, mask, clip_low, clip_high, dual_clip,
                                        needs_grad)
    return row_stats, log_prob.new_empty(0, dtype=torch.float32) if dloss is None else dloss


@policy_loss_rows.register_fake
def _(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, dual_clip, needs_grad, backend):
    row_stats = log_prob.new_empty(log_prob.shape[0], len(POLICY_ROW_STATS), dtype=torch.float32)
    return row_stats, log_prob.new_empty(log_prob.shape if needs_grad else (0,), dtype=torch.float32)


register_loss_rows_autograd(policy_loss_rows)


# ----------------------------------------------------------------------------- public
def _loss_from_rows(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, dual_clip, agg, num_tokens,
                    num_seqs, backend):
    needs_grad = torch.is_grad_enabled() and log_prob.requires_grad
    row_stats, _ = policy_loss_rows(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, dual_clip,
                                    needs_grad, backend)
    clipfrac, approx_kl, lower = row_token_means(row_stats.detach()).unbind()
    loss = weighted_row_total(row_stats, agg, num_tokens, num_seqs)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "clipfrac_lower": lower}


# {backend: implementation with the public signature}; dispatch calls these.
PPO_POLICY_LOSS = {**{b: functools.partial(_loss_from_rows, backend=b) for b in KERNELS},
                   "torch": reference.ppo_policy_loss}
IMPLEMENTATIONS = {"ppo_policy_loss": PPO_POLICY_LOSS}


def ppo_policy_loss(log_prob, old_log_prob, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    agg="token-mean", num_tokens=None, num_seqs=None):
    """PPO clipped surrogate loss over [B, T] tokens (verl / OpenRLHF conventions).

    Returns (loss, stats): a float32 scalar differentiable to `log_prob` only, and a dict of
    detached float32 scalars `clipfrac`, `approx_kl`, `clipfrac_lower` (masked token means).
    `agg`, `num_tokens`, `num_seqs` as in `agg_loss`. A fully masked batch gives 0s.
    """
    inputs = per_token_inputs({"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages}, mask)
    clip_low = require_nonnegative("clip_low", clip_low)
    clip_high = require_nonnegative("clip_high", clip_high)
    dual_clip = require_dual_clip(dual_clip)
    require_agg(agg, num_tokens, num_seqs)
    return dispatch("ppo_policy_loss", PPO_POLICY_LOSS, log_prob.device, *inputs, clip_low=clip_low,
                    clip_high=clip_high, dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
