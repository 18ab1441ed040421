"""Masked reductions over [B, T] per-token tensors: agg_loss, masked_mean, masked_whiten.

Every aggregation mode is a weighted sum of per-row masked sums,

    agg(L) = sum_b w_b * sum_t m_bt L_bt,   so   d agg / d L_bt = w_b * m_bt,

with w_b = 1 / n_tokens (token-mean), [n_b > 0] / n_seqs (seq-mean-token-sum) or
[n_b > 0] / (n_b * n_seqs) (seq-mean-token-mean), n_b = sum_t m_bt. The row-sum kernel and
the row-scale kernel here are the forward and backward of every loss in ppo_fast.ops.

masked_whiten uses the shifted two-pass variance: with c the fp32 mean of pass one,
S1 = sum m (x - c), S2 = sum m (x - c)^2, mean = c + S1/n and var = (S2 - S1^2/n) / (n - 1);
x - c is exact for x near c, so a large mean with a small spread keeps its precision.
"""
from __future__ import annotations

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import native_module, resolve_backend
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
def _scale_rows_kernel(x_ptr, mask_ptr, row_weight_ptr, upstream_ptr, out_ptr, T,
                       HAS_X: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[b, t] = upstream * w[b] (* x[b, t]) (* m[b, t]): the backward of a row-weighted sum."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = cols < T
    out = tl.zeros([BLOCK_T], tl.float32) + tl.load(upstream_ptr).to(tl.float32) * tl.load(row_weight_ptr + row)
    if HAS_X:
        out *= tl.load(x_ptr + row * T + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        out *= tl.load(mask_ptr + row * T + cols, mask=ok, other=0).to(tl.float32)
    tl.store(out_ptr + row * T + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


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
def masked_row_sums(x, mask, center=None):
    """[B, 3] float32 per row: (sum_t m (x - c), sum_t m, sum_t m (x - c)^2), c = center or 0."""
    B, T = x.shape
    out = torch.empty(B, 3, device=x.device, dtype=torch.float32)
    if B:
        _masked_row_sums_kernel[(B,)](x, mask, center, out, T, CENTERED=center is not None, BLOCK_T=block_t(T))
    return out


def scale_rows(row_weight, upstream, shape, out_dtype, *, x=None, mask=None, backend="triton"):
    """upstream * row_weight[:, None] (* x) (* mask): a [B, T] tensor of out_dtype."""
    B, T = shape
    if backend == "cpp":
        x, mask = (None if t is None else t.float().contiguous() for t in (x, mask))
        return native_module("_C").scale_rows(row_weight, upstream.float(), B, T, x, mask).to(out_dtype)
    out = torch.empty(shape, device=row_weight.device, dtype=out_dtype)
    if B * T:
        block = block_t(T)
        _scale_rows_kernel[(B, triton.cdiv(T, block))](
            x, mask, row_weight, upstream.reshape(1).contiguous(), out, T,
            HAS_X=x is not None, HAS_MASK=mask is not None, BLOCK_T=block,
        )
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
    """(agg scalar, row weights) from per-row statistics with the loss and token columns."""
    weights = agg_row_weights(row_stats[:, ROW_TOKENS], agg, num_tokens, num_seqs)
    return (weights * row_stats[:, ROW_LOSS]).sum(), weights


def row_token_means(row_stats):
    """Masked token means of the statistic columns after the token column (0 for an empty mask):
    the statistics the losses report, over the local valid tokens."""
    return row_stats[:, ROW_TOKENS + 1:].sum(0) / row_stats[:, ROW_TOKENS].sum().clamp(min=1)


def _whiten_triton(x, mask, shift_mean):
    first = masked_row_sums(x, mask).double().sum(0)
    n = first[ROW_TOKENS]
    center = (first[0] / n.clamp(min=1)).float().reshape(1)
    second = masked_row_sums(x, mask, center=center).double().sum(0)  # S1, n, S2 about c
    offset = second[0] / n.clamp(min=1)
    var = (second[2] - second[0] * offset) / (n - 1).clamp(min=1)
    stats = torch.stack([center[0].double(), offset, torch.rsqrt(var.clamp(min=0) + WHITEN_EPS)]).float()
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    if x.numel():
        block = 1024
        _whiten_kernel[(triton.cdiv(x.numel(), block),)](x, stats, out, x.numel(), SHIFT_MEAN=shift_mean, BLOCK=block)
    return out


# ----------------------------------------------------------------------------- autograd
class _AggLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, mask, agg, num_tokens, num_seqs):
        total, weights = weighted_row_total(masked_row_sums(loss, mask), agg, num_tokens, num_seqs)
        ctx.save_for_backward(mask, weights)
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        mask, weights = ctx.saved_tensors
        grad_loss = scale_rows(weights, grad_total, ctx.loss_shape, ctx.loss_dtype, mask=mask)
        return grad_loss, None, None, None, None


# ----------------------------------------------------------------------------- public
AGG_LOSS = {"triton": _AggLoss.apply, "torch": reference.agg_loss}
MASKED_MEAN = {"triton": lambda x, mask: _AggLoss.apply(x, mask, "token-mean", None, None),
               "torch": reference.masked_mean}
MASKED_WHITEN = {"triton": _whiten_triton, "torch": reference.masked_whiten}
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
