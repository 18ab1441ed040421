"""Masked reductions over [B, T] per-token tensors: agg_loss, masked_mean, masked_whiten.

agg_loss is the row-statistics protocol of ppo_fast/ops/rows.py applied to a given loss: the
row-sum kernel here gives sum_t m L per row, agg(L) = sum_b w_b sum_t m_bt L_bt, and the
backward d agg / d L_bt = w_b m_bt comes from autograd over the row sums.

masked_whiten uses the shifted two-pass variance: with c the fp32 mean of pass one,
S1 = sum m (x - c), S2 = sum m (x - c)^2, mean = c + S1/n and var = (S2 - S1^2/n) / (n - 1);
x - c is exact for x near c, so a large mean with a small spread keeps its precision.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.native import native_module
from ppo_fast.ops.checks import native_rows, per_token_inputs
from ppo_fast.ops.constants import WHITEN_EPS
from ppo_fast.ops.rows import ROW_TOKENS, register_loss_rows_autograd, require_agg, weighted_row_total
from ppo_fast.ops.triton_helpers import block_t, tl, triton


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


def _row_sums_cpp(x, mask):
    return native_module("_C").masked_row_sums_forward(*native_rows(x, mask=mask))


def _whiten_cpp(x, mask, shift_mean):
    return native_module("_C").masked_whiten_forward(*native_rows(x, mask=mask), shift_mean)


# {backend: (row sums, whiten)}: what the custom ops below launch.
class MaskedKernels(NamedTuple):
    """One backend's launchers: masked row sums (the row statistics) and whitening."""
    row_sums: Callable
    whiten: Callable


KERNELS = {"triton": MaskedKernels(_row_sums_triton, _whiten_triton), "cpp": MaskedKernels(_row_sums_cpp, _whiten_cpp)}


# ----------------------------------------------------------------------------- custom ops
def _row_sums(x: torch.Tensor, mask: torch.Tensor, needs_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 3] float32 per row: (sum_t m x, sum_t m, sum_t m x^2), and m = d sum_t m x / d x as
    float32 [B, T] when needs_grad, else empty): the row-statistics protocol of ops/rows.py with
    the loss L = x, differentiable to x through the first column."""
    row_stats = KERNELS[backend].row_sums(x, mask)
    return row_stats, mask.to(torch.float32) if needs_grad else x.new_empty(0, dtype=torch.float32)


masked_row_sums = torch.library.custom_op("ppo_fast::masked_row_sums", _row_sums, mutates_args=())


@masked_row_sums.register_fake
def _(x, mask, needs_grad, backend):
    return (x.new_empty(x.shape[0], 3, dtype=torch.float32),
            x.new_empty(x.shape if needs_grad else (0,), dtype=torch.float32))


row_sums = register_loss_rows_autograd(masked_row_sums, _row_sums)


@torch.library.custom_op("ppo_fast::masked_whiten", mutates_args=())
def masked_whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, backend: str) -> torch.Tensor:
    return KERNELS[backend].whiten(x, mask, shift_mean)


@masked_whiten_op.register_fake
def _(x, mask, shift_mean, backend):
    return x.new_empty(x.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------- public
def _agg_loss_on_kernels(loss, mask, agg="token-mean", *, num_tokens=None, num_seqs=None, backend):
    needs_grad = torch.is_grad_enabled() and loss.requires_grad
    row_stats, _ = row_sums(loss, mask, needs_grad, backend)
    return weighted_row_total(row_stats, agg, num_tokens, num_seqs)


def _masked_mean_on_kernels(x, mask, *, backend):
    return _agg_loss_on_kernels(x, mask, "token-mean", backend=backend)


def _masked_whiten_on_kernels(x, mask, *, shift_mean=True, backend):
    return masked_whiten_op(x, mask, shift_mean, backend)


# {backend: implementation with the public signature}; dispatch calls these.
AGG_LOSS = backend_table(_agg_loss_on_kernels, KERNELS, reference.agg_loss)
MASKED_MEAN = backend_table(_masked_mean_on_kernels, KERNELS, reference.masked_mean)
MASKED_WHITEN = backend_table(_masked_whiten_on_kernels, KERNELS, reference.masked_whiten)
IMPLEMENTATIONS = {"agg_loss": AGG_LOSS, "masked_mean": MASKED_MEAN, "masked_whiten": MASKED_WHITEN}


def agg_loss(loss, mask, agg="token-mean", *, num_tokens=None, num_seqs=None):
    """Reduce a [B, T] per-token loss to a scalar by `agg` (see ppo_fast.ops.reference.agg_loss)."""
    require_agg(agg, num_tokens, num_seqs)
    loss, mask = per_token_inputs({"loss": loss}, mask)
    return dispatch("agg_loss", AGG_LOSS, loss.device, loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)


def masked_mean(x, mask):
    """sum(mask * x) / sum(mask) over a [B, T] tensor, float32; 0 for an empty mask."""
    x, mask = per_token_inputs({"x": x}, mask)
    return dispatch("masked_mean", MASKED_MEAN, x.device, x, mask)


def masked_whiten(x, mask, *, shift_mean=True):
    """(x - mu) * rsqrt(var + 1e-8), masked mean and unbiased masked variance; no gradient."""
    x, mask = per_token_inputs({"x": x}, mask)
    return dispatch("masked_whiten", MASKED_WHITEN, x.device, x.detach(), mask, shift_mean=shift_mean)
