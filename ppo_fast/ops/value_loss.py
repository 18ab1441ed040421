"""Clipped value loss, forward and backward in one pass each.

Per token, with v_c = clamp(v, old - clip, old + clip) (v itself, to the bit, inside the
range, so an unclipped token is never counted as clipped) and R the return:

    l = max((v - R)^2, (v_c - R)^2),   loss = 0.5 * agg(l)
    dl/dv = 2 (v - R) where (v - R)^2 >= (v_c - R)^2, else 2 (v_c - R) [old - clip <= v <= old + clip]
"""
from __future__ import annotations

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.native import native_module
from ppo_fast.ops.checks import native_rows, per_token_inputs, require_nonnegative
from ppo_fast.ops.rows import (
    ROW_CLIPPED,
    ROW_LOSS,
    ROW_TOKENS,
    VALUE_ROW_STATS,
    register_loss_rows_autograd,
    require_agg,
    row_token_means,
    weighted_row_total,
)
from ppo_fast.ops.triton_helpers import block_t, clamp, load_token_tiles, nan_max, tl, triton

_N_STATS = tl.constexpr(len(VALUE_ROW_STATS))
_LOSS, _TOKENS, _CLIPPED = tl.constexpr(ROW_LOSS), tl.constexpr(ROW_TOKENS), tl.constexpr(ROW_CLIPPED)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _value_loss_fwd_kernel(values_ptr, old_ptr, returns_ptr, mask_ptr, dloss_ptr, row_stats_ptr, T, clip,
                           NEEDS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    loss_sum = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    clipped_sum = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        v, old, ret, m, offs, in_row = load_token_tiles(values_ptr, old_ptr, returns_ptr, mask_ptr, row, start, T,
                                                        BLOCK_T)
        lo, hi = old - clip, old + clip
        v_clipped = clamp(v, lo, hi)
        loss_unclipped = (v - ret) * (v - ret)
        loss_clipped = (v_clipped - ret) * (v_clipped - ret)
        if NEEDS_GRAD:
            inside = (v >= lo) & (v <= hi)
            # the larger term's gradient; where either is NaN (no order) both terms', as autograd of
            # the reference's max gives: NaN for a NaN unclipped loss, its gradient for a NaN bound
            d_unclipped = 2.0 * (v - ret)
            d_clipped = tl.where(inside, 2.0 * (v_clipped - ret), 0.0)
            dloss = tl.where(loss_clipped > loss_unclipped, d_clipped,
                             tl.where(loss_unclipped >= loss_clipped, d_unclipped, d_unclipped + d_clipped))
            tl.store(dloss_ptr + offs, m * dloss, mask=in_row)
        loss_sum += m * nan_max(loss_unclipped, loss_clipped)
        count += m
        clipped_sum += m * (loss_clipped > loss_unclipped).to(tl.float32)
    out = row_stats_ptr + row * _N_STATS
    tl.store(out + _LOSS, tl.sum(loss_sum, axis=0))
    tl.store(out + _TOKENS, tl.sum(count, axis=0))
    tl.store(out + _CLIPPED, tl.sum(clipped_sum, axis=0))


# ----------------------------------------------------------------------------- launchers
def _forward_triton(values, old_values, returns, mask, clip, needs_grad):
    B, T = values.shape
    row_stats = torch.empty(B, len(VALUE_ROW_STATS), device=values.device, dtype=torch.float32)
    dloss = torch.empty(B, T, device=values.device, dtype=torch.float32) if needs_grad else None
    if B:
        _value_loss_fwd_kernel[(B,)](values, old_values, returns, mask, dloss, row_stats, T, clip,
                                     NEEDS_GRAD=needs_grad, BLOCK_T=block_t(T))
    return row_stats, dloss


def _forward_cpp(values, old_values, returns, mask, clip, needs_grad):
    inputs = native_rows(values, old_values, returns, mask=mask)
    return native_module("_C").value_loss_forward(*inputs, clip, needs_grad)


KERNELS = {"triton": _forward_triton, "cpp": _forward_cpp}


# ----------------------------------------------------------------------------- custom op
def _value_rows(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                clip: float, needs_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_stats [B, len(VALUE_ROW_STATS)], m dL/dvalues [B, T] or empty), float32."""
    row_stats, dloss = KERNELS[backend](values, old_values, returns, mask, clip, needs_grad)
    return row_stats, values.new_empty(0, dtype=torch.float32) if dloss is None else dloss


value_loss_rows = torch.library.custom_op("ppo_fast::value_loss_rows", _value_rows, mutates_args=())


@value_loss_rows.register_fake
def _(values, old_values, returns, mask, clip, needs_grad, backend):
    row_stats = values.new_empty(values.shape[0], len(VALUE_ROW_STATS), dtype=torch.float32)
    return row_stats, values.new_empty(values.shape if needs_grad else (0,), dtype=torch.float32)


value_rows = register_loss_rows_autograd(value_loss_rows, _value_rows)


# ----------------------------------------------------------------------------- public
def _value_loss_on_kernels(values, old_values, returns, mask, *, clip, agg, num_tokens, num_seqs, backend):
    needs_grad = torch.is_grad_enabled() and values.requires_grad
    row_stats, _ = value_rows(values, old_values, returns, mask, clip, needs_grad, backend)
    (clipfrac,) = row_token_means(row_stats.detach()).unbind()
    return 0.5 * weighted_row_total(row_stats, agg, num_tokens, num_seqs), clipfrac


# {backend: implementation with the public signature}; dispatch calls these.
VALUE_LOSS = backend_table(_value_loss_on_kernels, KERNELS, reference.value_loss)
IMPLEMENTATIONS = {"value_loss": VALUE_LOSS}


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", num_tokens=None, num_seqs=None):
    """Clipped value loss over [B, T] tokens; returns (loss, clipfrac), gradient to `values` only."""
    inputs = per_token_inputs({"values": values, "old_values": old_values, "returns": returns}, mask)
    clip = require_nonnegative("clip", clip)
    require_agg(agg, num_tokens, num_seqs)
    return dispatch("value_loss", VALUE_LOSS, values.device, *inputs, clip=clip, agg=agg, num_tokens=num_tokens,
                    num_seqs=num_seqs)
