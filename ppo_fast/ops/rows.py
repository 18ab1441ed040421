"""The row-statistics protocol every loss shares (policy loss, value loss, the fused PPO loss,
agg_loss).

A loss kernel reads [B, T] per-token inputs and writes, per row b, masked sums over t of the
loss and of its statistics (the columns below, mirrored for C++ and CUDA in csrc/ppo_constants.h),
and m * dL/dx for the backward. Every aggregation mode is a weighted sum of the row sums,

    agg(L) = sum_b w_b sum_t m_bt L_bt,   so   d agg / d L_bt = w_b m_bt,

with n_b = sum_t m_bt and w_b = 1 / n_tokens (token-mean), [n_b > 0] / n_seqs
(seq-mean-token-sum) or [n_b > 0] / (n_b n_seqs) (seq-mean-token-mean); `num_tokens` /
`num_seqs` replace the local counts (the global batch under accumulation or data parallelism).
So the backward is one product, grad_x[b, t] = (w_b g) (m dL/dx)[b, t], formed by autograd from
the row sums (register_loss_rows_autograd). The statistics the losses report are masked token
means of their columns over the local valid tokens (row_token_means).
"""
from __future__ import annotations

import torch

from ppo_fast.ops.checks import require_choice, require_optional_count
from ppo_fast.ops.reference import AGG_MODES

# Columns of the per-row statistics [B, k] that the loss kernels write: masked sums over t.
POLICY_ROW_STATS = ("loss", "tokens", "clipped", "neg_log_ratio", "lower_clipped")
VALUE_ROW_STATS = ("loss", "tokens", "clipped")
ROW_LOSS, ROW_TOKENS, ROW_CLIPPED, ROW_NEG_LOG_RATIO, ROW_LOWER_CLIPPED = range(5)


def require_agg(agg, num_tokens, num_seqs) -> None:
    """An aggregation mode of AGG_MODES, and None or a finite global count > 0 for each count."""
    require_choice("agg", agg, AGG_MODES)
    require_optional_count("num_tokens", num_tokens)
    require_optional_count("num_seqs", num_seqs)


def agg_row_weights(row_counts, agg, num_tokens=None, num_seqs=None):
    """w such that agg(L) = sum_b w_b sum_t m_bt L_bt (see the module docstring); float32 [B]."""
    has_tokens = (row_counts > 0).to(torch.float32)
    if agg == "token-mean":
        den = row_counts.sum().clamp(min=1) if num_tokens is None else float(num_tokens)
        return has_tokens / den
    n_seqs = has_tokens.sum().clamp(min=1) if num_seqs is None else float(num_seqs)
    if agg == "seq-mean-token-sum":
        return has_tokens / n_seqs
    return has_tokens / (row_counts.clamp(min=1) * n_seqs)


def weighted_row_total(row_stats, agg, num_tokens, num_seqs):
    """agg of the loss column from per-row statistics with the loss and token columns."""
    weights = agg_row_weights(row_stats[:, ROW_TOKENS].detach(), agg, num_tokens, num_seqs)
    return (weights * row_stats[:, ROW_LOSS]).sum()


def row_token_means(row_stats):
    """Masked token means of the statistic columns after the token column (0 for an empty mask):
    the statistics the losses report, over the local valid tokens."""
    return row_stats[:, ROW_TOKENS + 1:].sum(0) / row_stats[:, ROW_TOKENS].sum().clamp(min=1)


def register_loss_rows_autograd(op) -> None:
    """Autograd of a loss kernel op returning (row_stats, dloss) with dloss = m dL/dx: the loss
    column is sum_t m L, so d row_stats[b, LOSS] / d x[b, t] = dloss[b, t] and
    grad_x = grad_row_stats[:, LOSS] * dloss (the other columns are statistics, not differentiated)."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.dtype, ctx.n_inputs = inputs[0].dtype, len(inputs)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_rows, _grad_dloss):
        (dloss,) = ctx.saved_tensors
        grad = None if grad_rows is None else (grad_rows[:, ROW_LOSS, None] * dloss).to(ctx.dtype)
        return (grad,) + (None,) * (ctx.n_inputs - 1)

    op.register_autograd(backward, setup_context=setup)
