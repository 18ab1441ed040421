"""KL penalty estimators per token, and KL-shaped token rewards.

With d = log_prob - ref and k = clamp(ref - log_prob, -20, 20):

    k1: d         dk1/dlog_prob = 1
    abs: |d|      sign(d)
    k2: d^2 / 2   d
    k3: clamp(exp(k) - k - 1, -10, 10)     -(exp(k) - 1) inside both clamps, else 0
    k3_raw: exp(k) - k - 1                 -(exp(k) - 1) inside the clamp of k, else 0

and d/dref = -d/dlog_prob for every estimator. A '+' suffix keeps the value and takes the k2
gradient (straight-through): the reference's k2 + sg[value - k2], which is NaN wherever k2 is
infinite (inf - inf), and the kernels give NaN there too.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.native import native_module
from ppo_fast.ops.checks import (
    contiguous,
    native_rows,
    per_token_inputs,
    require_choice,
    require_finite,
    require_float,
    require_same_device,
    require_shape,
)
from ppo_fast.ops.constants import K3_CLAMP, KL_ABS, KL_ESTIMATOR_CODES, KL_K1, KL_K2, KL_K3_RAW, LOG_RATIO_CLAMP
from ppo_fast.ops.triton_helpers import block_t, clamp, tl, triton

ESTIMATORS = reference.KL_ESTIMATOR_CHOICES
BLOCK = 1024
_K1, _ABS, _K2 = tl.constexpr(KL_K1), tl.constexpr(KL_ABS), tl.constexpr(KL_K2)
_K3_RAW = tl.constexpr(KL_K3_RAW)
_CLAMP, _K3_CLAMP = tl.constexpr(LOG_RATIO_CLAMP), tl.constexpr(K3_CLAMP)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _kl_value(log_prob, ref, ESTIMATOR: tl.constexpr, STRAIGHT: tl.constexpr):
    diff = log_prob - ref
    if ESTIMATOR == _K1:
        value = diff
    elif ESTIMATOR == _ABS:
        value = tl.abs(diff)
    elif ESTIMATOR == _K2:
        value = 0.5 * diff * diff
    else:
        kappa = clamp(ref - log_prob, -_CLAMP, _CLAMP)
        value = tl.exp(kappa) - kappa - 1.0
        if ESTIMATOR != _K3_RAW:
            value = clamp(value, -_K3_CLAMP, _K3_CLAMP)
    if STRAIGHT:  # k2 + (value - k2): NaN where k2 is not finite
        value = tl.where(0.5 * diff * diff < float("inf"), value, float("nan"))
    return value


@triton.jit
def _kl_grad(log_prob, ref, ESTIMATOR: tl.constexpr):
    """d KL / d log_prob."""
    diff = log_prob - ref
    if ESTIMATOR == _K1:
        grad = tl.zeros_like(diff) + 1.0
    elif ESTIMATOR == _ABS:
        grad = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif ESTIMATOR == _K2:
        grad = diff
    else:
        raw = ref - log_prob
        kappa = clamp(raw, -_CLAMP, _CLAMP)
        value = tl.exp(kappa) - kappa - 1.0
        inside = (raw >= -_CLAMP) & (raw <= _CLAMP)
        if ESTIMATOR != _K3_RAW:
            inside = inside & (value >= -_K3_CLAMP) & (value <= _K3_CLAMP)
        grad = tl.where(inside, 1.0 - tl.exp(kappa), 0.0)
    return grad


@triton.jit
def _kl_fwd_kernel(log_prob_ptr, ref_ptr, out_ptr, numel, ESTIMATOR: tl.constexpr, STRAIGHT: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    log_prob = tl.load(log_prob_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_value(log_prob, ref, ESTIMATOR, STRAIGHT), mask=ok)


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
                    ESTIMATOR: tl.constexpr, STRAIGHT: tl.constexpr, BLOCK_T: tl.constexpr):
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
        m = tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
        log_prob = tl.load(log_prob_ptr + offs, mask=m != 0, other=0.0).to(tl.float32)  # masked: read as 0
        ref = tl.load(ref_ptr + offs, mask=m != 0, other=0.0).to(tl.float32)
        reward = -kl_coef * _kl_value(log_prob, ref, ESTIMATOR, STRAIGHT) * m + tl.where(cols == last_valid, score, 0.0)
        tl.store(out_ptr + offs, reward, mask=ok)


# ----------------------------------------------------------------------------- kernel launchers
def _launch_kl(log_prob, ref_log_prob, estimator):
    out = torch.empty(log_prob.shape, device=log_prob.device, dtype=torch.float32)
    if log_prob.numel():
        _kl_fwd_kernel[(triton.cdiv(log_prob.numel(), BLOCK),)](
            log_prob, ref_log_prob, out, log_prob.numel(), ESTIMATOR=_codes(estimator)[0],
            STRAIGHT=estimator.endswith("+"), BLOCK=BLOCK)
    return out


def _launch_kl_backward(log_prob, ref_log_prob, upstream, code, want_log_prob, want_ref):
    grad_lp = torch.empty_like(log_prob) if want_log_prob else None
    grad_ref = torch.empty_like(ref_log_prob) if want_ref else None
    if log_prob.numel():
        _kl_bwd_kernel[(triton.cdiv(log_prob.numel(), BLOCK),)](
            log_prob, ref_log_prob, upstream.contiguous(), grad_lp, grad_ref, log_prob.numel(),
            ESTIMATOR=code, WANT_LOG_PROB=want_log_prob, WANT_REF=want_ref, BLOCK=BLOCK)
    return grad_lp, grad_ref


def _cpp_kl(log_prob, ref_log_prob, estimator):
    return native_module("_C").kl_forward(*native_rows(log_prob, ref_log_prob), _codes(estimator)[0],
                                          estimator.endswith("+"))


def _cpp_kl_backward(log_prob, ref_log_prob, upstream, code, want_log_prob, want_ref):
    """The C++ kernel reads and writes float32; the gradients go back in the inputs' dtypes."""
    grads = native_module("_C").kl_backward(*native_rows(log_prob, ref_log_prob, upstream), code, want_log_prob,
                                            want_ref)
    return tuple(g.to(t.dtype) if want else None
                 for g, t, want in zip(grads, (log_prob, ref_log_prob), (want_log_prob, want_ref)))


def _cpp_rewards(scores, log_prob, ref_log_prob, mask, kl_coef, estimator):
    scores, log_prob, ref_log_prob, mask = native_rows(scores, log_prob, ref_log_prob, mask=mask)
    return native_module("_C").compute_rewards_forward(scores, log_prob, ref_log_prob, mask, kl_coef,
                                                       _codes(estimator)[0], estimator.endswith("+"))


def _launch_rewards(scores, log_prob, ref_log_prob, mask, kl_coef, estimator):
    B, T = log_prob.shape
    out = torch.empty(B, T, device=log_prob.device, dtype=torch.float32)
    if B * T:
        _rewards_kernel[(B,)](scores, log_prob, ref_log_prob, mask, out, T, kl_coef,
                              ESTIMATOR=_codes(estimator)[0], STRAIGHT=estimator.endswith("+"),
                              BLOCK_T=block_t(T))
    return out


# {backend: (kl forward, kl backward, compute_rewards)}: what the custom ops below launch.
class KLKernels(NamedTuple):
    """One backend's KL launchers: the penalty, its backward, the per-token rewards."""
    forward: Callable
    backward: Callable
    rewards: Callable


KERNELS = {"triton": KLKernels(_launch_kl, _launch_kl_backward, _launch_rewards),
           "cpp": KLKernels(_cpp_kl, _cpp_kl_backward, _cpp_rewards)}


def _codes(estimator):
    """(value code, gradient code): a '+' estimator takes the gradient of k2."""
    value_code = KL_ESTIMATOR_CODES[estimator.rstrip("+")]
    return value_code, KL_K2 if estimator.endswith("+") else value_code


def kl_and_grad(log_prob, ref_log_prob, estimator, kernels: KLKernels):
    """Per-token (KL, d KL / d log_prob) on one backend's KERNELS entry, without autograd, for ops
    that form their gradient in the forward (fused_linear_ppo_loss)."""
    _, grad_code = _codes(estimator)
    grad, _ = kernels.backward(log_prob, ref_log_prob, torch.ones_like(log_prob), grad_code, True, False)
    return kernels.forward(log_prob, ref_log_prob, estimator), grad


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("ppo_fast::kl_forward", mutates_args=())
def kl_forward(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str, backend: str) -> torch.Tensor:
    return KERNELS[backend].forward(log_prob, ref_log_prob, estimator)


@kl_forward.register_fake
def _(log_prob, ref_log_prob, estimator, backend):
    return log_prob.new_empty(log_prob.shape, dtype=torch.float32)


@torch.library.custom_op("ppo_fast::kl_backward", mutates_args=())
def kl_backward(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, upstream: torch.Tensor, grad_code: int,
                want_log_prob: bool, want_ref: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    grads = KERNELS[backend].backward(log_prob, ref_log_prob, upstream, grad_code, want_log_prob, want_ref)
    return tuple(log_prob.new_empty(0) if g is None else g for g in grads)


@kl_backward.register_fake
def _(log_prob, ref_log_prob, upstream, grad_code, want_log_prob, want_ref, backend):
    return (torch.empty_like(log_prob) if want_log_prob else log_prob.new_empty(0),
            torch.empty_like(ref_log_prob) if want_ref else log_prob.new_empty(0))


def _kl_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.grad_code = _codes(inputs[2])[1]
    ctx.backend = inputs[3]


def _kl_backward(ctx, upstream):
    log_prob, ref_log_prob = ctx.saved_tensors
    want_log_prob, want_ref = ctx.needs_input_grad[:2]
    grad_lp, grad_ref = kl_backward(log_prob, ref_log_prob, upstream, ctx.grad_code, want_log_prob, want_ref,
                                    ctx.backend)
    return grad_lp if want_log_prob else None, grad_ref if want_ref else None, None, None


kl_forward.register_autograd(_kl_backward, setup_context=_kl_setup)


@torch.library.custom_op("ppo_fast::compute_rewards", mutates_args=())
def compute_rewards_op(scores: torch.Tensor, log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float, estimator: str, backend: str) -> torch.Tensor:
    return KERNELS[backend].rewards(scores, log_prob, ref_log_prob, mask, kl_coef, estimator)


@compute_rewards_op.register_fake
def _(scores, log_prob, ref_log_prob, mask, kl_coef, estimator, backend):
    return log_prob.new_empty(log_prob.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------- public
def _kl_penalty_on_kernels(log_prob, ref_log_prob, *, estimator="k1", backend):
    return kl_forward(log_prob, ref_log_prob, estimator, backend)


def _compute_rewards_on_kernels(scores, log_prob, ref_log_prob, mask, *, kl_coef, estimator="k1", backend):
    return compute_rewards_op(scores, log_prob, ref_log_prob, mask, kl_coef, estimator, backend)


# {backend: implementation with the public signature}; dispatch calls these.
KL_PENALTY = backend_table(_kl_penalty_on_kernels, KERNELS, reference.kl_penalty)
COMPUTE_REWARDS = backend_table(_compute_rewards_on_kernels, KERNELS, reference.compute_rewards)
IMPLEMENTATIONS = {"kl_penalty": KL_PENALTY, "compute_rewards": COMPUTE_REWARDS}


def _check_pair(log_prob, ref_log_prob, estimator):
    require_choice("estimator", estimator, ESTIMATORS)
    require_float("log_prob", log_prob)
    require_float("ref_log_prob", ref_log_prob)
    require_shape("ref_log_prob", ref_log_prob, log_prob.shape, "log_prob.shape")
    require_same_device(log_prob=log_prob, ref_log_prob=ref_log_prob)


def kl_penalty(log_prob, ref_log_prob, *, estimator="k1"):
    """Per-token KL estimate (float32, shaped like log_prob), differentiable to both inputs."""
    _check_pair(log_prob, ref_log_prob, estimator)
    return dispatch("kl_penalty", KL_PENALTY, log_prob.device, *contiguous(log_prob, ref_log_prob), estimator=estimator)


def compute_rewards(scores, log_prob, ref_log_prob, mask, *, kl_coef, estimator="k1"):
    """Token rewards [B, T] float32: -kl_coef * KL on valid tokens, plus each sequence's score
    on its last valid token (no score for a fully masked row). No gradient."""
    require_choice("estimator", estimator, ESTIMATORS)
    log_prob, ref_log_prob, mask = per_token_inputs({"log_prob": log_prob, "ref_log_prob": ref_log_prob}, mask)
    require_float("scores", scores)
    require_shape("scores", scores, log_prob.shape[:1], "[B], one score per sequence")
    require_same_device(scores=scores, log_prob=log_prob)
    kl_coef = require_finite("kl_coef", kl_coef)
    return dispatch("compute_rewards", COMPUTE_REWARDS, log_prob.device, scores.contiguous(), log_prob.detach(),
                    ref_log_prob, mask, kl_coef=kl_coef, estimator=estimator)
