"""The compiled policy objectives (ppo_fast/ops/objectives.py: clip with its dual clip, CISPO,
GPG / REINFORCE and SAPO) on a token, sequence (GSPO) or sequence-token ratio, with rollout
importance weights — forward and backward in one kernel launch; every other registered objective
runs its definition under autograd (the generic path).

Per token, with delta = clamp(log_prob - old, -20, 20), A the advantage, w the importance weight
(1 without is_weights) and rho the ratio (ppo_fast.ops.reference.policy_ratio):

    token           rho_t = exp(delta_t)
    sequence        rho_t = s = exp(clamp(mean_t' (log_prob - old), +-20)), d s / d log_prob_t = s / n
    sequence-token  rho_t = s, d rho_t / d log_prob_t = s (GSPO-token)

the surrogates (the registry's definitions; their per-token derivatives for the kernels are in
_surrogate below and in csrc/policy_math.h, each tested equal to the definition) give a row's loss
sum_t m w L. Its gradient to log_prob_t is m w (dL/drho rho + dL/dlog_prob) for the token and
sequence-token ratios, and for the sequence ratio m (s / n) sum_t' m w dL/drho (+ the token's own
dL/dlog_prob): a second pass over the row (a third for that sum). No gradient flows where the clamp
of the log-ratio bites. The surrogate and the ratio level are compile-time switches (constexpr in
Triton, template parameters in C++).

The kernel writes per-row masked sums of L and of the statistics (the columns POLICY_ROW_STATS of
the row protocol, ppo_fast/ops/rows.py), and m dL/dlog_prob for the backward, which only scales it
by the aggregation weight of its row.
"""
from __future__ import annotations

from typing import Optional

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.native import native_module
from ppo_fast.ops.checks import native_rows, per_token_inputs, require_float, require_same_device, require_values, \
    value_checks_enabled
from ppo_fast.ops.objectives import Objective, kernel_constants, resolve
from ppo_fast.ops.constants import LOG_RATIO_CLAMP, RATIO_LEVEL_CODES, SURROGATE_CODES
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
_CLIP, _CISPO, _GPG = (tl.constexpr(SURROGATE_CODES[k]) for k in ("clip", "cispo", "gpg"))
_TOKEN, _SEQUENCE = tl.constexpr(RATIO_LEVEL_CODES["token"]), tl.constexpr(RATIO_LEVEL_CODES["sequence"])


def check_is_weights(is_weights, log_prob, mask) -> None:
    """None, or constants >= 0 per token [B, T] or per sequence [B, 1] on log_prob's device (values
    at valid positions checked where the value checks run, see ppo_fast.ops.checks; a masked
    position is never read)."""
    if is_weights is None:
        return
    require_float("is_weights", is_weights)
    shape = log_prob.shape
    if tuple(is_weights.shape) not in (tuple(shape), (shape[0], 1)):
        raise ValueError(f"is_weights: expected shape {tuple(shape)} (per token) or {(shape[0], 1)} (per sequence), "
                         f"got {tuple(is_weights.shape)}")
    require_same_device(is_weights=is_weights, log_prob=log_prob)
    # eager: one reduction when no weight is < 0 (the usual case), the masked check past it. Not
    # min() < 0: a NaN anywhere makes min() NaN and would hide a negative weight beside it.
    if is_weights.numel() and value_checks_enabled(is_weights.device) and (
            torch.compiler.is_compiling() or bool((is_weights < 0).any())):
        valid = mask != 0 if is_weights.shape == mask.shape else (mask != 0).any(-1, keepdim=True)
        require_values((is_weights < 0) & valid, "is_weights: expected importance weights >= 0, found a negative one")


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _surrogate(ratio, log_prob, adv, w, clip_low, clip_high, dual_clip, tau_pos, tau_neg,
               SURROGATE: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr):
    """(L, w dL/drho, w dL/dlog_prob held directly, clipped, dual-clipped) per token (module
    docstring). The weight w multiplies a derivative only where the surrogate has one: a clipped
    token's gradient is 0 even for w = inf, as autograd of the reference gives."""
    zero = tl.zeros_like(ratio)
    if SURROGATE == _CLIP:
        loss_unclipped = -adv * ratio
        loss_clipped = -adv * clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = nan_max(loss_unclipped, loss_clipped)
        d_ratio = tl.where(loss_clipped > loss_unclipped, 0.0, -adv * w)  # a NaN term keeps its NaN gradient
        clipped = (loss_clipped > loss_unclipped).to(tl.float32)
        lower = zero
        if HAS_DUAL_CLIP:
            loss_dual = -adv * dual_clip
            is_lower = (adv < 0) & (loss > loss_dual)
            loss = tl.where(is_lower, loss_dual, loss)
            d_ratio = tl.where(is_lower, 0.0, d_ratio)
            lower = is_lower.to(tl.float32)
        d_log_prob = zero
    elif SURROGATE == _CISPO:
        capped = clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = -capped * adv * log_prob
        d_ratio = zero
        d_log_prob = -capped * adv * w
        clipped = (ratio != capped).to(tl.float32)
        lower = zero
    elif SURROGATE == _GPG:
        loss = -adv * log_prob
        d_ratio = zero
        d_log_prob = -adv * w
        clipped = zero
        lower = zero
    else:  # sapo
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        loss = -adv * gate * (4.0 / tau)
        d_ratio = -4.0 * adv * w * gate * (1.0 - gate)
        d_log_prob = zero
        clipped = zero
        lower = zero
    return loss, d_ratio, d_log_prob, clipped, lower


@triton.jit
def _policy_loss_fwd_kernel(
    log_prob_ptr, old_ptr, adv_ptr, mask_ptr, is_ptr, dloss_ptr, row_stats_ptr, T, is_stride_row, is_stride_t,
    clip_low, clip_high, dual_clip, tau_pos, tau_neg,
    SURROGATE: tl.constexpr, RATIO_LEVEL: tl.constexpr, HAS_IS: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    NEEDS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if RATIO_LEVEL != _TOKEN:  # pass 1: the row's mean log-ratio, s = exp(clamp(mean))
        delta_acc = tl.zeros([BLOCK_T], tl.float32)
        n_acc = tl.zeros([BLOCK_T], tl.float32)
        for start in range(0, T, BLOCK_T):
            log_prob, old, adv, m, offs, in_row = load_token_tiles(log_prob_ptr, old_ptr, adv_ptr, mask_ptr, row,
                                                                   start, T, BLOCK_T)
            delta_acc += tl.where(m != 0, log_prob - old, 0.0)
            n_acc += m
        n = tl.sum(n_acc, axis=0)
        mean = tl.sum(delta_acc, axis=0) / tl.maximum(n, 1.0)
        seq_ratio = tl.exp(clamp(mean, -_CLAMP, _CLAMP))
        seq_inside = (mean >= -_CLAMP) & (mean <= _CLAMP)
    else:
        n, seq_ratio, seq_inside = 0.0, 1.0, True

    loss_sum = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    clipped_sum = tl.zeros([BLOCK_T], tl.float32)
    neg_delta_sum = tl.zeros([BLOCK_T], tl.float32)
    lower_sum = tl.zeros([BLOCK_T], tl.float32)
    ratio_grad_sum = tl.zeros([BLOCK_T], tl.float32)  # sequence: sum_t w dL/drho (w = m is_weight)
    for start in range(0, T, BLOCK_T):  # pass 2: the losses
        log_prob, old, adv, m, offs, in_row = load_token_tiles(log_prob_ptr, old_ptr, adv_ptr, mask_ptr, row, start,
                                                               T, BLOCK_T)
        valid = m != 0
        w = m
        if HAS_IS:
            cols = start + tl.arange(0, BLOCK_T)
            w = m * tl.load(is_ptr + row * is_stride_row + cols * is_stride_t, mask=valid, other=0.0).to(tl.float32)
        raw_delta = log_prob - old
        delta = clamp(raw_delta, -_CLAMP, _CLAMP)
        if RATIO_LEVEL == _TOKEN:
            ratio = tl.exp(delta)
            inside = (raw_delta >= -_CLAMP) & (raw_delta <= _CLAMP)
        else:
            ratio = tl.zeros_like(delta) + seq_ratio
            inside = (tl.zeros_like(delta) + tl.where(seq_inside, 1.0, 0.0)) > 0
        loss, d_ratio, d_log_prob, clipped, lower = _surrogate(ratio, log_prob, adv, w, clip_low, clip_high,
                                                               dual_clip, tau_pos, tau_neg, SURROGATE, HAS_DUAL_CLIP)
        if NEEDS_GRAD:
            if RATIO_LEVEL == _SEQUENCE:
                ratio_grad_sum += tl.where(valid, d_ratio, 0.0)
                grad = d_log_prob
            else:
                grad = tl.where(inside, d_ratio * ratio, 0.0) + d_log_prob
            tl.store(dloss_ptr + offs, tl.where(valid, grad, 0.0), mask=in_row)
        loss_sum += tl.where(valid, w * loss, 0.0)
        count += m
        clipped_sum += m * clipped
        neg_delta_sum -= m * delta
        lower_sum += m * lower
    if NEEDS_GRAD and RATIO_LEVEL == _SEQUENCE:  # pass 3: d s / d log_prob_t = s / n to every valid token
        coef = tl.where(seq_inside, seq_ratio / tl.maximum(n, 1.0) * tl.sum(ratio_grad_sum, axis=0), 0.0)
        for start in range(0, T, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            in_row = cols < T
            offs = row * T + cols
            m = tl.load(mask_ptr + offs, mask=in_row, other=0).to(tl.float32)
            grad = tl.load(dloss_ptr + offs, mask=in_row, other=0.0)
            tl.store(dloss_ptr + offs, tl.where(m != 0, grad + m * coef, 0.0), mask=in_row)
    out = row_stats_ptr + row * _N_STATS
    tl.store(out + _LOSS, tl.sum(loss_sum, axis=0))
    tl.store(out + _TOKENS, tl.sum(count, axis=0))
    tl.store(out + _CLIPPED, tl.sum(clipped_sum, axis=0))
    tl.store(out + _NEG_LOG_RATIO, tl.sum(neg_delta_sum, axis=0))
    tl.store(out + _LOWER, tl.sum(lower_sum, axis=0))


# ----------------------------------------------------------------------------- launchers
# Each takes the kernel's constants (objectives.kernel_constants): surrogate, ratio_level, clip_low,
# clip_high, dual_clip (None: none), tau_pos, tau_neg.
def _forward_triton(log_prob, old_log_prob, advantages, mask, is_weights, constants, needs_grad):
    surrogate, level, clip_low, clip_high, dual_clip, tau_pos, tau_neg = constants
    B, T = log_prob.shape
    row_stats = torch.empty(B, len(POLICY_ROW_STATS), device=log_prob.device, dtype=torch.float32)
    dloss = torch.empty(B, T, device=log_prob.device, dtype=torch.float32) if needs_grad else None
    if B:
        per_token = is_weights is not None and is_weights.shape[-1] == T  # else [B, 1]: one weight per row
        _policy_loss_fwd_kernel[(B,)](
            log_prob, old_log_prob, advantages, mask, is_weights, dloss, row_stats, T, T if per_token else 1,
            1 if per_token else 0,
            clip_low, clip_high, 1.0 if dual_clip is None else dual_clip, tau_pos, tau_neg,
            SURROGATE=SURROGATE_CODES[surrogate], RATIO_LEVEL=RATIO_LEVEL_CODES[level], HAS_IS=is_weights is not None,
            HAS_DUAL_CLIP=dual_clip is not None, NEEDS_GRAD=needs_grad, BLOCK_T=block_t(T),
        )
    return row_stats, dloss


def _forward_cpp(log_prob, old_log_prob, advantages, mask, is_weights, constants, needs_grad):
    surrogate, level, *values = constants
    inputs = native_rows(log_prob, old_log_prob, advantages, mask=mask)
    weights = None if is_weights is None else is_weights.float().contiguous()
    return native_module("_C").policy_loss_forward(*inputs, weights, SURROGATE_CODES[surrogate],
                                                   RATIO_LEVEL_CODES[level], *values, needs_grad)


KERNELS = {"triton": _forward_triton, "cpp": _forward_cpp}


# ----------------------------------------------------------------------------- custom op
def _policy_rows(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 is_weights: Optional[torch.Tensor], objective: str, objective_params: str, needs_grad: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_stats [B, len(POLICY_ROW_STATS)], m dL/dlog_prob [B, T] or empty), float32; the objective
    as Objective.to_op_args gives it (a compiled one)."""
    constants = kernel_constants(Objective.from_op_args(objective, objective_params))
    row_stats, dloss = KERNELS[backend](log_prob, old_log_prob, advantages, mask, is_weights, constants, needs_grad)
    return row_stats, log_prob.new_empty(0, dtype=torch.float32) if dloss is None else dloss


policy_loss_rows = torch.library.custom_op("ppo_fast::policy_loss_rows", _policy_rows, mutates_args=())


@policy_loss_rows.register_fake
def _(log_prob, old_log_prob, advantages, mask, is_weights, objective, objective_params, needs_grad, backend):
    row_stats = log_prob.new_empty(log_prob.shape[0], len(POLICY_ROW_STATS), dtype=torch.float32)
    return row_stats, log_prob.new_empty(log_prob.shape if needs_grad else (0,), dtype=torch.float32)


policy_rows = register_loss_rows_autograd(policy_loss_rows, _policy_rows)


# ----------------------------------------------------------------------------- public
def _ppo_policy_loss_on_kernels(log_prob, old_log_prob, advantages, mask, *, objective: Objective, agg, num_tokens,
                                num_seqs, is_weights, backend):
    """A compiled objective through its kernel; any other through its definition (the generic path)."""
    if not objective.compiled:
        return reference.ppo_policy_loss(log_prob, old_log_prob, advantages, mask, objective=objective, agg=agg,
                                         num_tokens=num_tokens, num_seqs=num_seqs, is_weights=is_weights)
    needs_grad = torch.is_grad_enabled() and log_prob.requires_grad
    row_stats, _ = policy_rows(log_prob, old_log_prob, advantages, mask, is_weights, *objective.to_op_args(),
                               needs_grad, backend)
    clipfrac, approx_kl, lower = row_token_means(row_stats.detach()).unbind()
    loss = weighted_row_total(row_stats, agg, num_tokens, num_seqs)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "clipfrac_lower": lower}


# {backend: implementation with the public signature}; dispatch calls these.
PPO_POLICY_LOSS = backend_table(_ppo_policy_loss_on_kernels, KERNELS, reference.ppo_policy_loss)
IMPLEMENTATIONS = {"ppo_policy_loss": PPO_POLICY_LOSS}


def ppo_policy_loss(log_prob, old_log_prob, advantages, mask, *, objective="clip", agg="token-mean", num_tokens=None,
                    num_seqs=None, is_weights=None, **params):
    """The policy objective over [B, T] tokens: PPO's clipped surrogate by default (verl / OpenRLHF
    conventions), or any objective of the registry (ppo_fast.ops.objectives), aggregated by `agg`.

    Args:
        objective: a registered name — clip (clip_low, clip_high, dual_clip, ratio_level: "token",
            "sequence" (GSPO: s = exp(mean log-ratio), differentiated through the mean) or
            "sequence-token" (GSPO-token: the value s, each token's own gradient)), cispo (clip_low /
            clip_high bound the weight: TRL's absolute cap C is clip_low=1, clip_high=C-1), gpg,
            sapo (tau_pos, tau_neg), the peers' objectives (objectives.REGISTRY) — or an Objective.
        **params: the objective's parameters; one it does not take, or a value out of range, is
            refused before any kernel runs.
        is_weights: None, or importance weights >= 0 per token [B, T] or per sequence [B, 1]
            (rollout_correction's): constants multiplying each token's loss and gradient, never
            the token or sequence counts of the aggregation.
        agg, num_tokens, num_seqs: as in agg_loss.

    Returns (loss, stats): a float32 scalar differentiable to `log_prob` only, and detached
    float32 scalars `clipfrac`, `approx_kl`, `clipfrac_lower` (masked token means; what clipfrac
    counts depends on the objective). A fully masked batch gives 0s.
    """
    inputs = per_token_inputs({"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages}, mask)
    objective = resolve(objective, **params)
    check_is_weights(is_weights, log_prob, mask)
    require_agg(agg, num_tokens, num_seqs)
    weights = None if is_weights is None else is_weights.detach().contiguous()
    return dispatch("ppo_policy_loss", PPO_POLICY_LOSS, log_prob.device, *inputs, objective=objective, agg=agg,
                    num_tokens=num_tokens, num_seqs=num_seqs, is_weights=weights)
