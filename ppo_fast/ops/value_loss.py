"""Clipped value loss, forward and backward in one pass each.

Per token, with v_c = old + clamp(v - old, -clip, clip), R the return:

    l = max((v - R)^2, (v_c - R)^2),   loss = 0.5 * agg(l)
    dl/dv = 2 (v - R) where (v - R)^2 >= (v_c - R)^2, else 2 (v_c - R) [|v - old| <= clip]
"""
from __future__ import annotations

import torch

from ppo_fast import reference
from ppo_fast._checks import (
    require_choice,
    require_mask,
    require_nonnegative,
    require_optional_count,
    require_per_token,
    require_same_device,
)
from ppo_fast._triton import tl, triton
from ppo_fast.backend import native_module, resolve_backend
from ppo_fast.ops.masked import (
    AGG_MODES,
    _block_t,
    load_token_tiles,
    row_token_means,
    scale_rows,
    weighted_row_total,
)


@triton.jit
def _value_loss_fwd_kernel(values_ptr, old_ptr, returns_ptr, mask_ptr, dloss_ptr, row_stats_ptr, T, clip,
                           NEEDS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    loss_sum = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    clipped_sum = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        v, old, ret, m, offs, ok = load_token_tiles(values_ptr, old_ptr, returns_ptr, mask_ptr, row, start, T, BLOCK_T)
        step = v - old
        v_clipped = old + tl.minimum(tl.maximum(step, -clip), clip)
        loss_unclipped = (v - ret) * (v - ret)
        loss_clipped = (v_clipped - ret) * (v_clipped - ret)
        if NEEDS_GRAD:
            in_range = (step >= -clip) & (step <= clip)
            dloss = tl.where(loss_unclipped >= loss_clipped, 2.0 * (v - ret),
                             tl.where(in_range, 2.0 * (v_clipped - ret), 0.0))
            tl.store(dloss_ptr + offs, m * dloss, mask=ok)
        loss_sum += m * tl.maximum(loss_unclipped, loss_clipped)
        count += m
        clipped_sum += m * (loss_clipped > loss_unclipped).to(tl.float32)
    out = row_stats_ptr + row * 3
    tl.store(out, tl.sum(loss_sum, axis=0))
    tl.store(out + 1, tl.sum(count, axis=0))
    tl.store(out + 2, tl.sum(clipped_sum, axis=0))


def _launch_forward(backend, values, old_values, returns, mask, clip, needs_grad):
    if backend == "cpp":
        inputs = (t.float().contiguous() for t in (values, old_values, returns, mask))
        return native_module("_C").value_loss_forward(*inputs, clip, needs_grad)
    B, T = values.shape
    row_stats = torch.empty(B, 3, device=values.device, dtype=torch.float32)
    dloss = torch.empty(B, T, device=values.device, dtype=torch.float32) if needs_grad else None
    if B:
        _value_loss_fwd_kernel[(B,)](values, old_values, returns, mask, dloss, row_stats, T, clip,
                                     NEEDS_GRAD=needs_grad, BLOCK_T=_block_t(T))
    return row_stats, dloss


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, agg, num_tokens, num_seqs, backend):
        row_stats, dloss = _launch_forward(backend, values, old_values, returns, mask, clip, ctx.needs_input_grad[0])
        total, weights = weighted_row_total(row_stats[:, 0], row_stats[:, 1], agg, num_tokens, num_seqs)
        ctx.save_for_backward(dloss, 0.5 * weights)
        ctx.dtype, ctx.backend = values.dtype, backend
        (clipfrac,) = row_token_means(row_stats).unbind()
        ctx.mark_non_differentiable(clipfrac)
        return 0.5 * total, clipfrac

    @staticmethod
    def backward(ctx, grad_loss, _grad_clipfrac):
        dloss, weights = ctx.saved_tensors
        grad = scale_rows(weights, grad_loss, dloss.shape, ctx.dtype, x=dloss, backend=ctx.backend)
        return grad, None, None, None, None, None, None, None, None


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", num_tokens=None, num_seqs=None):
    """Clipped value loss over [B, T] tokens; returns (loss, clipfrac), gradient to `values` only."""
    shape = require_per_token({"values": values, "old_values": old_values, "returns": returns})
    require_mask("mask", mask, shape)
    require_same_device(values=values, mask=mask)
    clip = require_nonnegative("clip", clip)
    require_choice("agg", agg, AGG_MODES)
    require_optional_count("num_tokens", num_tokens)
    require_optional_count("num_seqs", num_seqs)
    backend = resolve_backend(values.device, "value_loss", supported=("triton", "cpp", "torch"))
    if backend == "torch":
        return reference.value_loss(values, old_values, returns, mask, clip=clip, agg=agg, num_tokens=num_tokens,
                                    num_seqs=num_seqs)
    return _ValueLoss.apply(values.contiguous(), old_values.detach().contiguous(), returns.detach().contiguous(),
                            mask.contiguous(), clip, agg, num_tokens, num_seqs, backend)
