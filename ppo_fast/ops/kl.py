"""KL penalty estimators per token, and KL-shaped token rewards.

With d = log_prob - ref and k = clamp(ref - log_prob, -20, 20):

    k1: d         dk1/dlog_prob = 1
    abs: |d|      sign(d)
    k2: d^2 / 2   d
    k3: clamp(exp(k) - k - 1, -10, 10)     -(exp(k) - 1) inside both clamps, else 0

and d/dref = -d/dlog_prob for every estimator. A '+' suffix keeps the value and takes the k2
gradient (straight-through).
"""
from __future__ import annotations

import torch

from ppo_fast import reference
from ppo_fast._checks import (
    require_choice,
    require_float,
    require_mask,
    require_per_token,
    require_python_float,
    require_same_device,
    require_shape,
)
from ppo_fast._triton import tl, triton
from ppo_fast.backend import resolve_backend
from ppo_fast.ops.masked import _block_t

ESTIMATORS = reference.KL_ESTIMATORS + tuple(e + "+" for e in reference.KL_ESTIMATORS)
_CODES = {"k1": 0, "kl": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3}
BLOCK = 1024


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _kl_value(log_prob, ref, ESTIMATOR: tl.constexpr):
    diff = log_prob - ref
    if ESTIMATOR == 0:
        value = diff
    elif ESTIMATOR == 1:
        value = tl.abs(diff)
    elif ESTIMATOR == 2:
        value = 0.5 * diff * diff
    else:
        kappa = tl.minimum(tl.maximum(ref - log_prob, -20.0), 20.0)
        value = tl.minimum(tl.maximum(tl.exp(kappa) - kappa - 1.0, -10.0), 10.0)
    return value


@triton.jit
def _kl_grad(log_prob, ref, ESTIMATOR: tl.constexpr):
    """d KL / d log_prob."""
    diff = log_prob - ref
    if ESTIMATOR == 0:
        grad = tl.zeros_like(diff) + 1.0
    elif ESTIMATOR == 1:
        grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif ESTIMATOR == 2:
        grad = diff
    else:
        raw = ref - log_prob
        kappa = tl.minimum(tl.maximum(raw, -20.0), 20.0)
        value = tl.exp(kappa) - kappa - 1.0
        inside = (raw >= -20.0) & (raw <= 20.0) & (value >= -10.0) & (value <= 10.0)
        grad = tl.where(inside, 1.0 - tl.exp(kappa), 0.0)
    return grad


@triton.jit
def _kl_fwd_kernel(log_prob_ptr, ref_ptr, out_ptr, numel, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    log_prob = tl.load(log_prob_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_value(log_prob, ref, ESTIMATOR), mask=ok)


@triton.jit
def _kl_bwd_kernel(log_prob_ptr, ref_ptr, upstream_ptr, grad_log_prob_ptr, grad_ref_ptr, numel,
                   ESTIMATOR: tl.constexpr, WANT_LOG_PROB: tl.constexpr, WANT_REF: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    log_prob = tl.load(log_prob_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    grad = tl.load(upstream_ptr + offs, mask=ok, other=0.0).to(tl.float32) * _kl_grad(log_prob, ref, ESTIMATOR)
    if WANT_LOG_PROB:
        tl.store(grad_log_prob_ptr + offs, grad.to(grad_log_prob_ptr.dtype.element_ty), mask=ok)
    if WANT_REF:
        tl.store(grad_ref_ptr + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rewards_kernel(scores_ptr, log_prob_ptr, ref_ptr, mask_ptr, out_ptr, T, kl_coef,
                    ESTIMATOR: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row b: out = -kl_coef * KL * m, plus scores[b] at the last t with m = 1."""
    row = tl.program_id(0).to(tl.int64)
    last = tl.full([BLOCK_T], -1, tl.int32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        m = tl.load(mask_ptr + row * T + cols, mask=cols < T, other=0)
        last = tl.maximum(last, tl.where(m != 0, cols, -1))
    last_valid = tl.max(last, axis=0)
    score = tl.load(scores_ptr + row).to(tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        ok = cols < T
        offs = row * T + cols
        log_prob = tl.load(log_prob_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
        reward = -kl_coef * _kl_value(log_prob, ref, ESTIMATOR) * m + tl.where(cols == last_valid, score, 0.0)
        tl.store(out_ptr + offs, reward, mask=ok)


# ----------------------------------------------------------------------------- launchers
def _launch_kl(log_prob, ref_log_prob, code):
    out = torch.empty(log_prob.shape, device=log_prob.device, dtype=torch.float32)
    if log_prob.numel():
        _kl_fwd_kernel[(triton.cdiv(log_prob.numel(), BLOCK),)](
            log_prob, ref_log_prob, out, log_prob.numel(), ESTIMATOR=code, BLOCK=BLOCK)
    return out


def _launch_kl_backward(log_prob, ref_log_prob, upstream, code, want_log_prob, want_ref):
    grad_lp = torch.empty_like(log_prob) if want_log_prob else None
    grad_ref = torch.empty_like(ref_log_prob) if want_ref else None
    if log_prob.numel():
        _kl_bwd_kernel[(triton.cdiv(log_prob.numel(), BLOCK),)](
            log_prob, ref_log_prob, upstream.contiguous(), grad_lp, grad_ref, log_prob.numel(),
            ESTIMATOR=code, WANT_LOG_PROB=want_log_prob, WANT_REF=want_ref, BLOCK=BLOCK)
    return grad_lp, grad_ref


# ----------------------------------------------------------------------------- autograd
class _KLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prob, ref_log_prob, value_code, grad_code):
        ctx.save_for_backward(log_prob, ref_log_prob)
        ctx.grad_code = grad_code
        return _launch_kl(log_prob, ref_log_prob, value_code)

    @staticmethod
    def backward(ctx, upstream):
        log_prob, ref_log_prob = ctx.saved_tensors
        grad_lp, grad_ref = _launch_kl_backward(log_prob, ref_log_prob, upstream, ctx.grad_code,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_lp, grad_ref, None, None


# ----------------------------------------------------------------------------- public
def _check_pair(log_prob, ref_log_prob, estimator):
    require_choice("estimator", estimator, ESTIMATORS)
    require_float("log_prob", log_prob)
    require_float("ref_log_prob", ref_log_prob)
    require_shape("ref_log_prob", ref_log_prob, log_prob.shape, "log_prob.shape")
    require_same_device(log_prob=log_prob, ref_log_prob=ref_log_prob)


def kl_penalty(log_prob, ref_log_prob, *, estimator="k1"):
    """Per-token KL estimate (float32, shaped like log_prob), differentiable to both inputs."""
    _check_pair(log_prob, ref_log_prob, estimator)
    if resolve_backend(log_prob.device, "kl_penalty", supported=("triton", "torch")) == "torch":
        return reference.kl_penalty(log_prob, ref_log_prob, estimator=estimator)
    value_code = _CODES[estimator.rstrip("+")]
    grad_code = _CODES["k2"] if estimator.endswith("+") else value_code
    return _KLTriton.apply(log_prob.contiguous(), ref_log_prob.contiguous(), value_code, grad_code)


def compute_rewards(scores, log_prob, ref_log_prob, mask, *, kl_coef, estimator="k1"):
    """Token rewards [B, T] float32: -kl_coef * KL on valid tokens, plus each sequence's score
    on its last valid token (no score for a fully masked row). No gradient."""
    require_choice("estimator", estimator, ESTIMATORS)
    shape = require_per_token({"log_prob": log_prob, "ref_log_prob": ref_log_prob})
    require_mask("mask", mask, shape)
    require_float("scores", scores)
    require_shape("scores", scores, shape[:1], "[B], one score per sequence")
    require_same_device(scores=scores, log_prob=log_prob, mask=mask)
    kl_coef = require_python_float("kl_coef", kl_coef)
    if resolve_backend(log_prob.device, "compute_rewards", supported=("triton", "torch")) == "torch":
        return reference.compute_rewards(scores, log_prob, ref_log_prob, mask, kl_coef=kl_coef, estimator=estimator)
    B, T = shape
    out = torch.empty(B, T, device=log_prob.device, dtype=torch.float32)
    if B:
        _rewards_kernel[(B,)](scores.contiguous(), log_prob.detach().contiguous(), ref_log_prob.detach().contiguous(),
                              mask.contiguous(), out, T, kl_coef,
                              ESTIMATOR=_CODES[estimator.rstrip("+")], BLOCK_T=_block_t(T))
    return out
