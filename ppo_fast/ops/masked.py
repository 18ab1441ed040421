"""Masked reductions over [B, T] per-token tensors: agg_loss, masked_mean, masked_whiten.

Every aggregation mode is a weighted sum of per-row masked sums,

    agg(L) = sum_b w_b * sum_t m_bt L_bt,   so   d agg / d L_bt = w_b * m_bt,

with w_b = 1 / n_tokens (token-mean), [n_b > 0] / n_seqs (seq-mean-token-sum) or
[n_b > 0] / (n_b * n_seqs) (seq-mean-token-mean), n_b = sum_t m_bt. The row-sum kernel here
(and each loss's own row kernel) is the forward; the backward is d agg / d L_bt = w_b m_bt,
formed by autograd from the row sums (`register_loss_rows_autograd`).

masked_whiten uses the shifted two-pass variance: with c the fp32 mean of pass one,
S1 = sum m (x - c), S2 = sum m (x - c)^2, mean = c + S1/n and var = (S2 - S1^2/n) / (n - 1);
x - c is exact for x near c, so a large mean with a small spread keeps its precision.
"""
from __future__ import annotations

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import resolve_backend
from ppo_fast.ops.checks import (
    contiguous,
    require_choice,
    require_mask,
    require_optional_count,
    require_per_token,
    require_same_device,
)
from ppo_fast.ops.constants import ROW_LOSS, ROW_TOKENS, WHITEN_EPS
from ppo_fast.ops.triton_helpers import block_t, tl, triton

AGG_MODES = reference.AGG_MODES


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _masked_row_sums_kernel(x_ptr, mask_ptr, center_ptr, out_ptr, T, CENTERED: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[b] = (sum_t m (x - c), sum_t m, sum_t m (x - c)^2), c = center (0 unless CENTERED)."""
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    squares = tl.zeros([BLOCK_T], tl.float32)
    center = 0.0
    if CENTERED:
        center = tl.load(center_ptr)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        m = tl.load(mask_ptr + row * T + cols, mask=cols < T, other=0).to(tl.float32)
        x = tl.load(x_ptr + row * T + cols, mask=m != 0, other=0.0).to(tl.float32)
        x = tl.where(m != 0, x - center, 0.0)
        total += m * x
        count += m
        squares += m * x * x
    tl.store(out_ptr + row * 3, tl.sum(total, axis=0))
    tl.store(out_ptr + row * 3 + 1, tl.sum(count, axis=0))
    tl.store(out_ptr + row * 3 + 2, tl.sum(squares, axis=0))


@triton.jit
def _whiten_kernel(x_ptr, stats_ptr, out_ptr, numel, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """out = ((x - c) - offset) * inv_std (+ c + offset), stats = (c, offset, inv_std)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    center = tl.load(stats_ptr)
    offset = tl.load(stats_ptr + 1)
    inv_std = tl.load(stats_ptr + 2)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = ((x - center) - offset) * inv_std
    if not SHIFT_MEAN:
        y += center + offset
    tl.store(out_ptr + offs, y, mask=ok)


# ----------------------------------------------------------------------------- launchers
def _row_sums_triton(x, mask, center=None):
    B, T = x.shape
    out = torch.empty(B, 3, device=x.device, dtype=torch.float32)
    if B:
        _masked_row_sums_kernel[(B,)](x, mask, center, out, T, CENTERED=center is not None, BLOCK_T=block_t(T))
    return out


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


def _whiten_triton(x, mask, shift_mean):
    first = _row_sums_triton(x, mask).double().sum(0)
    n = first[ROW_TOKENS]
    center = (first[0] / n.clamp(min=1)).float().reshape(1)
    second = _row_sums_triton(x, mask, center=center).double().sum(0)  # S1, n, S2 about c
    offset = second[0] / n.clamp(min=1)
    var = (second[2] - second[0] * offset) / (n - 1).clamp(min=1)
    stats = torch.stack([center[0].double(), offset, torch.rsqrt(var.clamp(min=0) + WHITEN_EPS)]).float()
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    if x.numel():
        block = 1024
        _whiten_kernel[(triton.cdiv(x.numel(), block),)](x, stats, out, x.numel(), SHIFT_MEAN=shift_mean, BLOCK=block)
    return out


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("ppo_fast::masked_row_sums", mutates_args=())
def masked_row_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 3] float32 per row: (sum_t m x, sum_t m, sum_t m x^2); differentiable to x through the
    first column (the one agg_loss weights; the others are statistics)."""
    return _row_sums_triton(x, mask)


@masked_row_sums.register_fake
def _(x, mask):
    return x.new_empty(x.shape[0], 3, dtype=torch.float32)


def _row_sums_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.dtype = inputs[0].dtype


def _row_sums_backward(ctx, grad_rows):
    (mask,) = ctx.saved_tensors  # d sum_t m x / d x = m
    return (grad_rows[:, :1] * mask.to(torch.float32)).to(ctx.dtype), None


masked_row_sums.register_autograd(_row_sums_backward, setup_context=_row_sums_setup)


@torch.library.custom_op("ppo_fast::masked_whiten", mutates_args=())
def masked_whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    return _whiten_triton(x, mask, shift_mean)


@masked_whiten_op.register_fake
def _(x, mask, shift_mean):
    return x.new_empty(x.shape, dtype=torch.float32)


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


# ----------------------------------------------------------------------------- public
def _agg_triton(loss, mask, agg, num_tokens, num_seqs):
    return weighted_row_total(masked_row_sums(loss, mask), agg, num_tokens, num_seqs)


AGG_LOSS = {"triton": _agg_triton, "torch": reference.agg_loss}
MASKED_MEAN = {"triton": lambda x, mask: _agg_triton(x, mask, "token-mean", None, None),
               "torch": reference.masked_mean}
MASKED_WHITEN = {"triton": masked_whiten_op, "torch": reference.masked_whiten}
BACKENDS = {"agg_loss": tuple(AGG_LOSS), "masked_mean": tuple(MASKED_MEAN), "masked_whiten": tuple(MASKED_WHITEN)}


def _prepare(name, x, mask):
    require_per_token({name: x})
    require_mask("mask", mask, x.shape)
    require_same_device(**{name: x, "mask": mask})
    return contiguous(x, mask)


def agg_loss(loss, mask, agg="token-mean", *, num_tokens=None, num_seqs=None):
    """Reduce a [B, T] per-token loss to a scalar by `agg` (see ppo_fast.ops.reference.agg_loss)."""
    require_choice("agg", agg, AGG_MODES)
    require_optional_count("num_tokens", num_tokens)
    require_optional_count("num_seqs", num_seqs)
    loss, mask = _prepare("loss", loss, mask)
    backend = resolve_backend(loss.device, "agg_loss", AGG_LOSS)
    if backend == "torch":
        return reference.agg_loss(loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return AGG_LOSS[backend](loss, mask, agg, num_tokens, num_seqs)


def masked_mean(x, mask):
    """sum(mask * x) / sum(mask) over a [B, T] tensor, float32; 0 for an empty mask."""
    x, mask = _prepare("x", x, mask)
    return MASKED_MEAN[resolve_backend(x.device, "masked_mean", MASKED_MEAN)](x, mask)


def masked_whiten(x, mask, *, shift_mean=True):
    """(x - mu) * rsqrt(var + 1e-8), masked mean and unbiased masked variance; no gradient."""
    x, mask = _prepare("x", x, mask)
    backend = resolve_backend(x.device, "masked_whiten", MASKED_WHITEN)
    if backend == "torch":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean)
    return MASKED_WHITEN[backend](x.detach(), mask, shift_mean)
