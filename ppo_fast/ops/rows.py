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

from ppo_fast.ops.backend import plain_eager
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
    if agg == "token-mean":  # every w_b is 1 / n_tokens (a row without tokens sums to 0): one sum, one division
        den = row_stats[:, ROW_TOKENS].detach().sum().clamp(min=1) if num_tokens is None else float(num_tokens)
        return row_stats[:, ROW_LOSS].sum() / den
    weights = agg_row_weights(row_stats[:, ROW_TOKENS].detach(), agg, num_tokens, num_seqs)
    return (weights * row_stats[:, ROW_LOSS]).sum()


def row_token_means(row_stats):
    """Masked token means of the statistic columns after the token column (0 for an empty mask):
    the statistics the losses report, over the local valid tokens."""
    return row_stats[:, ROW_TOKENS + 1:].sum(0) / row_stats[:, ROW_TOKENS].sum().clamp(min=1)


def _loss_rows_grad(grad_rows, dloss, dtype):
    """d agg / d x from the row sums' gradient: grad_rows[:, LOSS] * dloss (dloss = m dL/dx)."""
    return None if grad_rows is None else (grad_rows[:, ROW_LOSS, None] * dloss).to(dtype)


def register_loss_rows_autograd(op, body):
    """Autograd of a loss kernel op returning (row_stats, dloss) with dloss = m dL/dx: the loss
    column is sum_t m L, so d row_stats[b, LOSS] / d x[b, t] = dloss[b, t] and
    grad_x = grad_row_stats[:, LOSS] * dloss (the other columns are statistics, not differentiated).

    Returns what the public functions call: in plain eager mode (real tensors, no compile,
    export or tracing mode) `body`, the op's own implementation, through _EagerLossRows, the
    same kernel and backward without torch.library's per-call dispatch (about 80 us a call on a
    CPU, as much as a small loss kernel itself); else the custom op."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.dtype, ctx.n_inputs = inputs[0].dtype, len(inputs)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_rows, _grad_dloss):
        (dloss,) = ctx.saved_tensors
        return (_loss_rows_grad(grad_rows, dloss, ctx.dtype),) + (None,) * (ctx.n_inputs - 1)

    op.register_autograd(backward, setup_context=setup)

    def rows(x, *args):
        if plain_eager(x):
            return _EagerLossRows.apply(x, lambda v: body(v, *args))
        return op(x, *args)

    return rows


class _EagerLossRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, run_on):
        row_stats, dloss = run_on(x)
        ctx.save_for_backward(dloss)
        ctx.dtype = x.dtype
        ctx.mark_non_differentiable(dloss)
        ctx.set_materialize_grads(False)
        return row_stats, dloss

    @staticmethod
    def backward(ctx, grad_rows, _grad_dloss):
        (dloss,) = ctx.saved_tensors
        return _loss_rows_grad(grad_rows, dloss, ctx.dtype), None
