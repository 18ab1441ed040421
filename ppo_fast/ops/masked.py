"""Masked reductions over [B, T] per-token tensors: agg_loss, masked_mean, masked_whiten.

Every aggregation mode is a weighted sum of per-row masked sums,

    agg(L) = sum_b w_b * sum_t m_bt L_bt,   so   d agg / d L_bt = w_b * m_bt,

with w_b = 1 / n_tokens (token-mean), [n_b > 0] / n_seqs (seq-mean-token-sum) or
[n_b > 0] / (n_b * n_seqs) (seq-mean-token-mean), n_b = sum_t m_bt. The row-sum kernel and
the row-scale kernel here are the forward and backward of every loss in ppo_fast.ops.
"""
from __future__ import annotations

import torch

from ppo_fast import reference
from ppo_fast._checks import (
    require_choice,
    require_mask,
    require_optional_count,
    require_per_token,
    require_same_device,
)
from ppo_fast._triton import tl, triton
from ppo_fast.backend import native_module, resolve_backend

AGG_MODES = reference.AGG_MODES


# ----------------------------------------------------------------------------- kernels
@triton.jit
def load_token_tiles(a_ptr, b_ptr, c_ptr, mask_ptr, row, start, T, BLOCK_T: tl.constexpr):
    """Tiles [start, start + BLOCK_T) of row `row` of three [B, T] tensors and the mask, as fp32,
    with the element offsets and in-bounds flags (for the per-token loss kernels)."""
    cols = start + tl.arange(0, BLOCK_T)
    ok = cols < T
    offs = row * T + cols
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    return a, b, c, m, offs, ok


@triton.jit
def _masked_row_sums_kernel(x_ptr, mask_ptr, center_ptr, out_ptr, T,
                            CENTERED: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[b] = (sum_t m x, sum_t m), or (sum_t m (x - c)^2, sum_t m) when CENTERED."""
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    center = 0.0
    if CENTERED:
        center = tl.load(center_ptr)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        ok = cols < T
        x = tl.load(x_ptr + row * T + cols, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + row * T + cols, mask=ok, other=0).to(tl.float32)
        if CENTERED:
            x = (x - center) * (x - center)
        total += m * x
        count += m
    tl.store(out_ptr + row * 2, tl.sum(total, axis=0))
    tl.store(out_ptr + row * 2 + 1, tl.sum(count, axis=0))


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
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    mean = tl.load(stats_ptr)
    inv_std = tl.load(stats_ptr + 1)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean) * inv_std
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, y, mask=ok)


# ----------------------------------------------------------------------------- launchers
def _block_t(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 1)), 1024)


def masked_row_sums(x, mask, center=None):
    """[B, 2] float32: (sum_t m x, sum_t m) per row, or sum_t m (x - center)^2 with a center."""
    B, T = x.shape
    out = torch.empty(B, 2, device=x.device, dtype=torch.float32)
    if B:
        _masked_row_sums_kernel[(B,)](x, mask, center, out, T, CENTERED=center is not None, BLOCK_T=_block_t(T))
    return out


def scale_rows(row_weight, upstream, shape, out_dtype, *, x=None, mask=None, backend="triton"):
    """upstream * row_weight[:, None] (* x) (* mask): a [B, T] tensor of out_dtype."""
    B, T = shape
    if backend == "cpp":
        x, mask = (None if t is None else t.float().contiguous() for t in (x, mask))
        return native_module("_C").scale_rows(row_weight, upstream.float(), B, T, x, mask).to(out_dtype)
    out = torch.empty(shape, device=row_weight.device, dtype=out_dtype)
    if B * T:
        block = _block_t(T)
        _scale_rows_kernel[(B, triton.cdiv(T, block))](
            x, mask, row_weight, upstream.reshape(1).contiguous(), out, T,
            HAS_X=x is not None, HAS_MASK=mask is not None, BLOCK_T=block,
        )
    return out


def agg_row_weights(row_counts, mode, num_tokens=None, num_seqs=None):
    """w such that agg(L) = sum_b w_b sum_t m_bt L_bt (see the module docstring); float32 [B]."""
    has_tokens = (row_counts > 0).to(torch.float32)
    if mode == "token-mean":
        den = row_counts.sum().clamp(min=1) if num_tokens is None else torch.tensor(float(num_tokens))
        return has_tokens / den.to(row_counts.device)
    n_seqs = has_tokens.sum().clamp(min=1) if num_seqs is None else float(num_seqs)
    if mode == "seq-mean-token-sum":
        return has_tokens / n_seqs
    return has_tokens / (row_counts.clamp(min=1) * n_seqs)


def weighted_row_total(row_sums, row_counts, agg, num_tokens, num_seqs):
    """(agg scalar, row weights) from per-row masked sums."""
    weights = agg_row_weights(row_counts, agg, num_tokens, num_seqs)
    return (weights * row_sums).sum(), weights


def row_token_means(row_stats):
    """Masked token means of columns 2.. of [B, k] per-row sums whose column 1 is sum_t m:
    the statistics of the losses (local valid tokens; 0 for an empty mask)."""
    return row_stats[:, 2:].sum(0) / row_stats[:, 1].sum().clamp(min=1)


# ----------------------------------------------------------------------------- autograd
class _AggLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, mask, agg, num_tokens, num_seqs):
        sums = masked_row_sums(loss, mask)
        total, weights = weighted_row_total(sums[:, 0], sums[:, 1], agg, num_tokens, num_seqs)
        ctx.save_for_backward(mask, weights)
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        mask, weights = ctx.saved_tensors
        grad_loss = scale_rows(weights, grad_total, ctx.loss_shape, ctx.loss_dtype, mask=mask)
        return grad_loss, None, None, None, None


def _whiten_triton(x, mask, shift_mean):
    sums = masked_row_sums(x, mask)
    n = sums[:, 1].sum()
    mean = (sums[:, 0].sum() / n.clamp(min=1)).reshape(1)
    sq = masked_row_sums(x, mask, center=mean)[:, 0].sum()  # two passes: exact for any mean
    inv_std = torch.rsqrt(sq / (n - 1).clamp(min=1) + 1e-8).reshape(1)
    out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    if x.numel():
        block = 1024
        _whiten_kernel[(triton.cdiv(x.numel(), block),)](
            x, torch.cat([mean, inv_std]), out, x.numel(), SHIFT_MEAN=shift_mean, BLOCK=block
        )
    return out


# ----------------------------------------------------------------------------- public
def _prepare(name, x, mask):
    require_per_token({name: x})
    require_mask("mask", mask, x.shape)
    require_same_device(**{name: x, "mask": mask})
    return x.contiguous(), mask.contiguous()


def agg_loss(loss, mask, mode="token-mean", *, num_tokens=None, num_seqs=None):
    """Reduce a [B, T] per-token loss to a scalar by `mode` (see ppo_fast.reference.agg_loss)."""
    require_choice("mode", mode, AGG_MODES)
    require_optional_count("num_tokens", num_tokens)
    require_optional_count("num_seqs", num_seqs)
    loss, mask = _prepare("loss", loss, mask)
    if resolve_backend(loss.device, "agg_loss", supported=("triton", "torch")) == "torch":
        return reference.agg_loss(loss, mask, mode, num_tokens=num_tokens, num_seqs=num_seqs)
    return _AggLossTriton.apply(loss, mask, mode, num_tokens, num_seqs)


def masked_mean(x, mask):
    """sum(mask * x) / sum(mask) over a [B, T] tensor, float32; 0 for an empty mask."""
    x, mask = _prepare("x", x, mask)
    if resolve_backend(x.device, "masked_mean", supported=("triton", "torch")) == "torch":
        return reference.masked_mean(x, mask)
    return _AggLossTriton.apply(x, mask, "token-mean", None, None)  # sum(m x) / sum(m), 0 if empty


def masked_whiten(x, mask, *, shift_mean=True):
    """(x - mu) * rsqrt(var + 1e-8), masked mean and unbiased masked variance; no gradient."""
    x, mask = _prepare("x", x, mask)
    if resolve_backend(x.device, "masked_whiten", supported=("triton", "torch")) == "torch":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean)
    return _whiten_triton(x.detach(), mask, shift_mean)
