"""Chosen-token log-probabilities and entropy from logits, forward and backward.

With x = logits / T over a row of V entries, lse = log sum_v exp(x_v), p = exp(x - lse):

    logp     = x_y - lse
    entropy  = lse - sum_v p_v x_v
    d logp / d x_v    = [v == y] - p_v
    d entropy / d x_v = -p_v (log p_v + entropy)

The forward kernel reads each row once (online log-sum-exp, fp32) and keeps lse and the
entropy per row; the backward kernel re-reads the logits and recomputes p from lse, so no
[N, V] fp32 tensor is ever saved. A NaN or +inf logit makes its row's results NaN (as
log_softmax does); a label outside [0, V) (possible only where value checks are off, see
ppo_fast.ops.checks) gives logp NaN and is never read.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import dispatch, native_module
from ppo_fast.ops.checks import (
    require_float,
    require_integer,
    require_labels_in_range,
    require_same_device,
    require_shape,
    require_temperature,
)
from ppo_fast.ops.triton_helpers import tl, triton

_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# ----------------------------------------------------------------------------- kernels
@triton.jit
def _row_start(logits_ptr, row, rows_per_batch, stride_batch, stride_row):
    # Rows of a [B, T, V] view (e.g. logits[:, :-1]) need two strides; a flat [N, V] view
    # passes rows_per_batch = N and stride_batch = 0.
    return logits_ptr + (row // rows_per_batch) * stride_batch + (row % rows_per_batch) * stride_row


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr,
    V, rows_per_batch, stride_batch, stride_row,
    inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_start(logits_ptr, row, rows_per_batch, stride_batch, stride_row)

    # Each lane j keeps its own online state over the columns it reads: m_j (running max),
    # d_j = sum exp(x - m_j), s_j = sum exp(x - m_j)(x - m_j); the lanes merge once per row.
    # One exp per element: e = exp(-|x - m|) is exp(x - m) when x <= m, else the factor
    # exp(m - x) that re-centres the old sums on the new max x:
    #   x > m:  d' = d e + 1,  s' = e (s - (x - m) d)      x <= m:  d' = d + e,  s' = s + e (x - m)
    m = tl.full([BLOCK_V], -_FLT_MAX, tl.float32)  # finite start: x - m is never -inf - -inf
    d = tl.zeros([BLOCK_V], tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        diff = x - m
        e = tl.exp(-tl.abs(diff))  # NaN for a NaN x, which then reaches d
        new_max = diff > 0
        if WITH_ENTROPY:
            s = tl.where(new_max, e * s - tl.where(d > 0, e * diff * d, 0.0), s + tl.where(e > 0, e * diff, 0.0))
        d = tl.where(new_max, d * e + 1.0, d + e)
        m = tl.where(new_max, x, m)

    row_max = tl.max(m, axis=0)
    scale = tl.exp(m - row_max)  # NaN for a lane that saw +inf: the row's results become NaN
    total = tl.sum(d * scale, axis=0)
    log_d = tl.log(total)
    tl.store(lse_ptr + row, row_max + log_d)
    if WITH_ENTROPY:
        # sum e (x - row_max) over the lane = s_j + (m_j - row_max) d_j; H = log d - E[x - max]
        centred = tl.sum(scale * (s + tl.where(d > 0, (m - row_max) * d, 0.0)), axis=0)
        tl.store(entropy_ptr + row, log_d - centred / total)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        x_label = tl.load(row_ptr + tl.where(in_range, label, 0)).to(tl.float32) * inv_temperature
        logp = tl.where(in_range, x_label - row_max - log_d, float("nan"))
        tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, grad_logits_ptr, labels_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr, entropy_ptr,
    V, rows_per_batch, stride_batch, stride_row,
    inv_temperature, ignore_index,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_start(logits_ptr, row, rows_per_batch, stride_batch, stride_row)
    grad_row_ptr = grad_logits_ptr + row * V
    lse = tl.load(lse_ptr + row)

    g_logp = tl.zeros([], tl.float32)
    label = tl.full([], -1, tl.int64)
    if HAS_GRAD_LOGP:
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        g_logp = tl.where(ignored, 0.0, tl.load(grad_logp_ptr + row).to(tl.float32))
    g_entropy = tl.zeros([], tl.float32)
    entropy = tl.zeros([], tl.float32)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        logp = x - lse
        p = tl.exp(logp)
        # d/dx = g_logp ([v == y] - p) - g_entropy p (log p + H); [v == y] - p stays in fp32.
        grad = tl.where(cols == label, 1.0 - p, -p) * g_logp
        if HAS_GRAD_ENTROPY:
            grad -= g_entropy * p * tl.where(p > 0, logp + entropy, 0.0)
        grad = grad * inv_temperature
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------- launchers
def _rows_layout(logits: torch.Tensor):
    """(logits, rows_per_batch, stride_batch, stride_row) addressing every row of [..., V]
    without a copy where the strides allow (flat views and [B, T, V] slices)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    V = logits.shape[-1]
    n_rows = logits.numel() // V
    if logits.dim() == 3 and logits.stride(0) != logits.stride(1) * logits.shape[1]:
        return logits, logits.shape[1], logits.stride(0), logits.stride(1)
    try:
        flat = logits.view(n_rows, V)
    except RuntimeError:
        logits = logits.contiguous()
        flat = logits.view(n_rows, V)
    return logits, max(n_rows, 1), 0, flat.stride(0)


def _block_config(V: int):
    block_v = min(triton.next_power_of_2(V), 4096)
    return block_v, (8 if block_v >= 2048 else 4)


def _launch_forward(logits, labels, inv_temperature, ignore_index, with_entropy):
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    n_rows = logits.numel() // V
    out_shape = logits.shape[:-1]
    dev = logits.device
    lse = torch.empty(out_shape, device=dev, dtype=torch.float32)
    logp = torch.empty(out_shape, device=dev, dtype=torch.float32) if labels is not None else None
    entropy = torch.empty(out_shape, device=dev, dtype=torch.float32) if with_entropy else None
    if n_rows:
        block_v, num_warps = _block_config(V)
        _logprobs_fwd_kernel[(n_rows,)](
            logits, labels, logp, entropy, lse,
            V, rows_per_batch, stride_batch, stride_row,
            inv_temperature, ignore_index,
            HAS_LABELS=labels is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return logp, entropy, lse


def _launch_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                     out=None):
    """grad_logits in the logits' dtype, written into `out` when given (it may be the contiguous
    logits themselves: each element is read before it is overwritten, by the same program)."""
    grad_logits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype) if out is None else out
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    n_rows = logits.numel() // V
    if n_rows:
        block_v, num_warps = _block_config(V)
        _logprobs_bwd_kernel[(n_rows,)](
            logits, grad_logits, labels,
            None if grad_logp is None else grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            lse, entropy,
            V, rows_per_batch, stride_batch, stride_row,
            inv_temperature, ignore_index,
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_V=block_v, num_warps=num_warps,
        )
    return grad_logits


def _native_forward(module, logits, labels, inv_temperature, ignore_index, with_entropy):
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    out_shape = logits.shape[:-1]
    logp, entropy, lse = native_module(module).logprobs_forward(
        logits, None if labels is None else labels.long().contiguous(), logits.numel() // V, V, rows_per_batch,
        stride_batch, stride_row, inv_temperature, ignore_index, with_entropy,
    )
    return tuple(None if t is None else t.view(out_shape) for t in (logp, entropy, lse))


def _native_backward(module, logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index,
                     out=None):
    shape = logits.shape
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    grad = native_module(module).logprobs_backward(
        logits, None if labels is None else labels.long().contiguous(), logits.numel() // V, V, rows_per_batch,
        stride_batch, stride_row, lse,
        entropy, *(None if g is None else g.float().contiguous() for g in (grad_logp, grad_entropy)),
        inv_temperature, ignore_index, out,
    )
    return grad.view(shape)


# (forward, backward) launchers per kernel backend: the custom ops below call them by name, and so
# do the chunks of fused_linear.py and fused_linear_ppo_loss.py.
LAUNCHERS = {
    "triton": (_launch_forward, _launch_backward),
    "cuda": (functools.partial(_native_forward, "_C_cuda"), functools.partial(_native_backward, "_C_cuda")),
    "cpp": (functools.partial(_native_forward, "_C"), functools.partial(_native_backward, "_C")),
}


# ----------------------------------------------------------------------------- custom ops
# torch.library ops, so torch.compile(fullgraph=True) and torch.export see one node each (fake
# implementations give the output shapes without running). Absent outputs are empty tensors.
@torch.library.custom_op("ppo_fast::logprobs_forward", mutates_args=())
def logprobs_forward(logits: torch.Tensor, labels: Optional[torch.Tensor], inv_temperature: float,
                     ignore_index: int, with_entropy: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(logp or empty, entropy or empty, lse), float32 shaped like logits.shape[:-1]."""
    logp, entropy, lse = LAUNCHERS[backend][0](logits, labels, inv_temperature, ignore_index, with_entropy)
    return tuple(logits.new_empty(0, dtype=torch.float32) if t is None else t for t in (logp, entropy, lse))


@logprobs_forward.register_fake
def _(logits, labels, inv_temperature, ignore_index, with_entropy, backend):
    def out(present):
        return logits.new_empty(logits.shape[:-1] if present else (0,), dtype=torch.float32)

    return out(labels is not None), out(with_entropy), out(True)


@torch.library.custom_op("ppo_fast::logprobs_backward", mutates_args=())
def logprobs_backward(logits: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor,
                      entropy: Optional[torch.Tensor], grad_logp: Optional[torch.Tensor],
                      grad_entropy: Optional[torch.Tensor], inv_temperature: float, ignore_index: int,
                      backend: str) -> torch.Tensor:
    """grad_logits in the logits' dtype (contiguous)."""
    return LAUNCHERS[backend][1](logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                                 ignore_index).view(logits.shape)


@logprobs_backward.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, inv_temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _setup_backward(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, with_entropy, backend = inputs
    ctx.save_for_backward(logits, labels, output[2], output[1] if with_entropy else None)
    ctx.args = (inv_temperature, ignore_index, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    grad_logp = grad_logp if labels is not None else None
    grad_entropy = grad_entropy if entropy is not None else None
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None, None, None
    grad = logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, *ctx.args)
    return grad, None, None, None, None, None


logprobs_forward.register_autograd(_backward, setup_context=_setup_backward)


# ----------------------------------------------------------------------------- public
def _logprobs_kernels(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend):
    logp, entropy, _ = logprobs_forward(logits, labels, 1.0 / temperature, ignore_index, return_entropy, backend)
    return (logp, entropy) if return_entropy else logp


def _entropy_kernels(logits, *, temperature=1.0, backend):
    return logprobs_forward(logits, None, 1.0 / temperature, -100, True, backend)[1]


# {backend: implementation with the public signature}; dispatch calls these.
LOGPROBS_FROM_LOGITS = {**{b: functools.partial(_logprobs_kernels, backend=b) for b in LAUNCHERS},
                        "torch": reference.logprobs_from_logits}
ENTROPY_FROM_LOGITS = {**{b: functools.partial(_entropy_kernels, backend=b) for b in LAUNCHERS},
                       "torch": reference.entropy_from_logits}
IMPLEMENTATIONS = {"logprobs_from_logits": LOGPROBS_FROM_LOGITS, "entropy_from_logits": ENTROPY_FROM_LOGITS}


def _validate_logits(logits, temperature) -> float:
    require_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    return require_temperature(temperature)


def logprobs_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Log-probability of each label under softmax(logits / temperature), in one pass.

    Args:
        logits: [..., V] float32/bfloat16/float16.
        labels: [...] integer token ids; positions equal to `ignore_index` give logp 0 and
            no gradient through logp (their entropy is still computed).
        temperature: float > 0 dividing the logits.
        return_entropy: also return the entropy of softmax(logits / temperature).

    Returns:
        float32 logp shaped like labels, or (logp, entropy) with return_entropy.
        Differentiable to `logits` through both outputs; the gradient has logits' dtype.
    """
    temperature = _validate_logits(logits, temperature)
    require_integer("labels", labels)
    require_same_device(logits=logits, labels=labels)
    require_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    require_labels_in_range(labels, logits.shape[-1], ignore_index)
    # labels are read by flat row index, whatever the caller's strides; logits' rows by their strides
    return dispatch("logprobs_from_logits", LOGPROBS_FROM_LOGITS, logits.device, logits, labels.contiguous(),
                    temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)


def entropy_from_logits(logits, *, temperature=1.0):
    """Entropy of softmax(logits / temperature) over the last dim: float32 [...], differentiable."""
    temperature = _validate_logits(logits, temperature)
    return dispatch("entropy_from_logits", ENTROPY_FROM_LOGITS, logits.device, logits, temperature=temperature)
