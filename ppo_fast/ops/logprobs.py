"""Chosen-token log-probabilities and entropy from logits, forward and backward, with the row
statistics trainers log (sum of p^2, the mean logit, whether the label is the argmax).

The logits z of a row of V entries become x = z / T, or, for models that scale and softcap their
logits (Gemma's final_logit_softcapping, logit_scale / logits_scaling), x = c tanh(s z / c) / T
(s the logit scale, c the softcap; without a softcap the scale folds into 1/T). Then
lse = log sum_v exp(x_v), p = exp(x - lse):

    logp     = x_y - lse
    entropy  = lse - sum_v p_v x_v
    d logp / d x_v    = [v == y] - p_v
    d entropy / d x_v = -p_v (log p_v + entropy)
    d x / d z         = s (1 - tanh^2(s z / c)) / T        (1 / T without a softcap)

and the statistics log(sum_v p_v^2), mean_v x_v and [x_y is the first maximum of the row].

The forward kernel reads each row once (online log-sum-exp, fp32) and keeps per row the entropy
and the normaliser as the pair norm = (m, log d), m the row's max of x and d = sum_v exp(x_v - m)
(lse = m + log d); the backward kernel re-reads the logits and recomputes p from it, as
log p_v = (x_v - m) - log d, so no [N, V] fp32 tensor is ever saved. The pair, not lse, keeps
log p exact where |m| >> log d (a row at -1e8: m + log d rounds to m in fp32). A NaN or +inf logit makes its row's results NaN (as
log_softmax does); a label outside [0, V) (possible only where value checks are off, see
ppo_fast.ops.checks) gives logp NaN and is never read; in the backward it is a column of another
vocabulary shard (ppo_fast/ops/vocab_parallel.py): its -p g_logp reaches every column, its
indicator none. The softcap and the statistics are
compile-time switches: the plain kernel does no work for them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.native import native_module
from ppo_fast.ops.checks import (
    any_dtensor,
    FLOAT32_MAX,
    require_float,
    require_integer,
    require_labels_in_range,
    require_positive,
    require_same_device,
    require_shape,
    require_temperature,
)
from ppo_fast.ops.triton_helpers import tl, triton

_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# Columns of the [..., 3] row statistics (return_stats).
STATS = ("log_sum_sq_probs", "mean_logit", "is_top1")


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """How a kernel turns a logit z into x (module docstring): x = z inv_t, or with a softcap c,
    x = c tanh(scale z / c) inv_t."""

    inv_t: float
    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, temperature: float, logit_scale: float = 1.0, softcap: Optional[float] = None) -> "LogitTransform":
        if softcap is None:  # the scale folds into 1/T: the plain kernels' one multiply
            return cls(logit_scale / temperature)
        return cls(1.0 / temperature, logit_scale, softcap)

    def to_op_args(self) -> list:
        """The transform as a custom op's one argument: [inv_t, scale, softcap] (softcap 0: none; a
        softcap is > 0)."""
        return [self.inv_t, self.scale, 0.0 if self.softcap is None else self.softcap]

    @classmethod
    def from_op_args(cls, values) -> "LogitTransform":
        inv_t, scale, softcap = values
        return cls(inv_t, scale, softcap if softcap > 0 else None)


def require_logit_transform(temperature, logit_scale, softcap) -> LogitTransform:
    """A LogitTransform from checked arguments: every factor a kernel multiplies by (scale / T, or
    with a softcap c: c / T and scale / c) finite in fp32. A factor that underflows to 0 is
    allowed: every x is then 0, a uniform distribution, as the reference computes it."""
    temperature = require_temperature(temperature)
    logit_scale = require_positive("logit_scale", logit_scale)
    if logit_scale / temperature > FLOAT32_MAX:
        raise ValueError(f"logit_scale: {logit_scale} over temperature {temperature} overflows float32")
    if softcap is not None:
        softcap = require_positive("softcap", softcap)
        if softcap > FLOAT32_MAX:
            raise ValueError(f"softcap: expected a value > 0 that float32 holds (at most {FLOAT32_MAX:.3g}), "
                             f"got {softcap}")
        for what, factor in (("over temperature", softcap / temperature), ("logit_scale over it", logit_scale / softcap)):
            if factor > FLOAT32_MAX:
                raise ValueError(f"softcap: {softcap} ({what}: {factor:.3g}) overflows float32; expected a "
                                 f"softcap and temperature whose ratio is below {FLOAT32_MAX:.3g}")
    return LogitTransform.of(temperature, logit_scale, softcap)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _row_start(logits_ptr, row, rows_per_batch, stride_batch, stride_row):
    # Rows of a [B, T, V] view (e.g. logits[:, :-1]) need two strides; a flat [N, V] view
    # passes rows_per_batch = N and stride_batch = 0.
    return logits_ptr + (row // rows_per_batch) * stride_batch + (row % rows_per_batch) * stride_row


@triton.jit
def _tanh_of(z, scale, softcap):
    """tanh(scale z / softcap) = 2 sigmoid(2 scale z / softcap) - 1."""
    return 2.0 * tl.sigmoid(2.0 * scale * z / softcap) - 1.0


@triton.jit
def _transform(z, inv_t, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return softcap * _tanh_of(z, scale, softcap) * inv_t
    return z * inv_t


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, norm_ptr, stats_ptr,
    V, rows_per_batch, stride_batch, stride_row,
    inv_temperature, scale, softcap, ignore_index,
    HAS_LABELS: tl.constexpr, WITH_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_start(logits_ptr, row, rows_per_batch, stride_batch, stride_row)
    label = tl.full([], -1, tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)

    # Each lane j keeps its own online state over the columns it reads: m_j (running max),
    # d_j = sum exp(x - m_j), s_j = sum exp(x - m_j)(x - m_j); the lanes merge once per row.
    # One exp per element: e = exp(-|x - m|) is exp(x - m) when x <= m, else the factor
    # exp(m - x) that re-centres the old sums on the new max x:
    #   x > m:  d' = d e + 1,  s' = e (s - (x - m) d)      x <= m:  d' = d + e,  s' = s + e (x - m)
    # (where e = 0 the old sums vanish, and the products are skipped: (x - m) d may overflow when
    # m is a finfo.min mask, and 0 x inf is NaN).
    # With stats also q_j = sum exp(2 (x - m_j)) (q' = q e^2 + 1, or q + e^2), the sum of x and the
    # max of x over the columns before the label.
    m = tl.full([BLOCK_V], -_FLT_MAX, tl.float32)  # finite start: x - m is never -inf - -inf
    d = tl.zeros([BLOCK_V], tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    q = tl.zeros([BLOCK_V], tl.float32)
    x_sum = tl.zeros([BLOCK_V], tl.float32)
    before = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        # padding columns stay out of the sums whatever the transform makes of -inf (-c / T with a
        # softcap, NaN when 1 / T underflows to 0)
        x = tl.where(cols < V, _transform(z, inv_temperature, scale, softcap, HAS_SOFTCAP), float("-inf"))
        diff = x - m
        e = tl.exp(-tl.abs(diff))  # NaN for a NaN x, which then reaches d
        new_max = diff > 0
        if WITH_ENTROPY:
            s = tl.where(new_max, tl.where(e > 0, e * (s - diff * d), 0.0), s + tl.where(e > 0, e * diff, 0.0))
        if WITH_STATS:
            q = tl.where(new_max, q * e * e + 1.0, q + e * e)
            x_sum += tl.where(cols < V, x, 0.0)
            before = tl.maximum(before, tl.where(cols < label, x, float("-inf")))
        d = tl.where(new_max, d * e + 1.0, d + e)
        m = tl.where(new_max, x, m)

    row_max = tl.max(m, axis=0)
    scale_j = tl.exp(m - row_max)  # NaN for a lane that saw +inf: the row's results become NaN
    total = tl.sum(d * scale_j, axis=0)
    log_d = tl.log(total)
    tl.store(norm_ptr + 2 * row, row_max)
    tl.store(norm_ptr + 2 * row + 1, log_d)
    if WITH_ENTROPY:
        # sum e (x - row_max) over the lane = scale_j (s_j + (m_j - row_max) d_j); H = log d - E[x - max]
        # (a lane whose scale_j is 0 adds 0: its (m_j - row_max) d_j may overflow)
        centred = tl.sum(tl.where(scale_j > 0, scale_j * (s + (m - row_max) * d), 0.0), axis=0)
        tl.store(entropy_ptr + row, log_d - centred / total)
    if HAS_LABELS:
        ignored = label == ignore_index
        in_range = (label >= 0) & (label < V)
        z_label = tl.load(row_ptr + tl.where(in_range, label, 0)).to(tl.float32)
        x_label = _transform(z_label, inv_temperature, scale, softcap, HAS_SOFTCAP)
        logp = tl.where(in_range, x_label - row_max - log_d, float("nan"))
        tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
        if WITH_STATS:  # the first maximum: x_y >= max and above every column before y
            top1 = in_range & (x_label >= row_max) & (x_label > tl.max(before, axis=0))
            tl.store(stats_ptr + row * 3 + 2, top1.to(tl.float32))
    if WITH_STATS:
        tl.store(stats_ptr + row * 3, tl.log(tl.sum(q * scale_j * scale_j, axis=0)) - 2.0 * log_d)
        tl.store(stats_ptr + row * 3 + 1, tl.sum(x_sum, axis=0) / V)
        if not HAS_LABELS:
            tl.store(stats_ptr + row * 3 + 2, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, grad_logits_ptr, labels_ptr, grad_logp_ptr, grad_entropy_ptr, norm_ptr, entropy_ptr,
    V, rows_per_batch, stride_batch, stride_row,
    inv_temperature, scale, softcap, ignore_index,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = _row_start(logits_ptr, row, rows_per_batch, stride_batch, stride_row)
    grad_row_ptr = grad_logits_ptr + row * V
    row_max = tl.load(norm_ptr + 2 * row)
    log_d = tl.load(norm_ptr + 2 * row + 1)

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
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh_of(z, scale, softcap)
            x = softcap * t * inv_temperature
            dx_dz = scale * (1.0 - t * t) * inv_temperature
        else:
            x = z * inv_temperature
            dx_dz = inv_temperature
        logp = (x - row_max) - log_d
        p = tl.exp(logp)
        # d/dx = g_logp ([v == y] - p) - g_entropy p (log p + H); [v == y] - p stays in fp32.
        grad = tl.where(cols == label, 1.0 - p, -p) * g_logp
        if HAS_GRAD_ENTROPY:
            grad -= g_entropy * p * tl.where(p > 0, logp + entropy, 0.0)
        grad = grad * dx_dz
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


# Both kernels are compiled without FMA fusion: x = z / T is rounded before the row's max is
# subtracted, as written (a fused z * inv_t - m leaves the max entry off by the rounding of its own
# product, 6e22 at |z| = 1e30), so the forward and the backward see the same x.
COMPILE_OPTIONS = dict(enable_fp_fusion=False)


def _block_config(V: int):
    block_v = min(triton.next_power_of_2(V), 4096)
    return block_v, (8 if block_v >= 2048 else 4)


def _empty_outputs(logits, labels, with_entropy, with_stats):
    f32 = dict(device=logits.device, dtype=torch.float32)
    shape = logits.shape[:-1]
    return (torch.empty(shape, **f32) if labels is not None else None,
            torch.empty(shape, **f32) if with_entropy else None, torch.empty(*shape, 2, **f32),
            torch.empty(*shape, 3, **f32) if with_stats else None)


def _launch_forward(logits, labels, tr: LogitTransform, ignore_index, with_entropy, with_stats=False):
    """(logp, entropy, norm [..., 2] (row max, log d), stats [..., 3] (STATS)), None where not asked
    for, float32."""
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    n_rows = logits.numel() // V
    logp, entropy, norm, stats = _empty_outputs(logits, labels, with_entropy, with_stats)
    if n_rows:
        block_v, num_warps = _block_config(V)
        _logprobs_fwd_kernel[(n_rows,)](
            logits, labels, logp, entropy, norm, stats,
            V, rows_per_batch, stride_batch, stride_row,
            tr.inv_t, tr.scale, tr.softcap or 1.0, ignore_index,
            HAS_LABELS=labels is not None, WITH_ENTROPY=with_entropy, HAS_SOFTCAP=tr.softcap is not None,
            WITH_STATS=with_stats, BLOCK_V=block_v, num_warps=num_warps, **COMPILE_OPTIONS,
        )
    return logp, entropy, norm, stats


def _launch_backward(logits, labels, norm, entropy, grad_logp, grad_entropy, tr: LogitTransform, ignore_index,
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
            norm, entropy,
            V, rows_per_batch, stride_batch, stride_row,
            tr.inv_t, tr.scale, tr.softcap or 1.0, ignore_index,
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            HAS_SOFTCAP=tr.softcap is not None, BLOCK_V=block_v, num_warps=num_warps, **COMPILE_OPTIONS,
        )
    return grad_logits


def _native_forward(module, logits, labels, tr: LogitTransform, ignore_index, with_entropy, with_stats=False):
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    out_shape = logits.shape[:-1]
    logp, entropy, norm, stats = native_module(module).logprobs_forward(
        logits, None if labels is None else labels.long().contiguous(), logits.numel() // V, V, rows_per_batch,
        stride_batch, stride_row, tr.inv_t, tr.scale, tr.softcap, ignore_index, with_entropy, with_stats,
    )
    return (*(None if t is None else t.view(out_shape) for t in (logp, entropy)), norm.view(*out_shape, 2),
            None if stats is None else stats.view(*out_shape, 3))


def _native_backward(module, logits, labels, norm, entropy, grad_logp, grad_entropy, tr: LogitTransform, ignore_index,
                     out=None):
    shape = logits.shape
    logits, rows_per_batch, stride_batch, stride_row = _rows_layout(logits)
    V = logits.shape[-1]
    grad = native_module(module).logprobs_backward(
        logits, None if labels is None else labels.long().contiguous(), logits.numel() // V, V, rows_per_batch,
        stride_batch, stride_row, norm.contiguous(),
        entropy, *(None if g is None else g.float().contiguous() for g in (grad_logp, grad_entropy)),
        tr.inv_t, tr.scale, tr.softcap, ignore_index, out,
    )
    return grad.view(shape)


# (forward, backward) launchers per kernel backend: the custom ops below call them by name, and so
# do the chunks of fused_linear.py and fused_linear_ppo_loss.py.
class LogprobsKernels(NamedTuple):
    """One backend's log-probs launchers (the signatures of _launch_forward / _launch_backward)."""
    forward: Callable
    backward: Callable


KERNELS = {
    "triton": LogprobsKernels(_launch_forward, _launch_backward),
    "cuda": LogprobsKernels(functools.partial(_native_forward, "_C_cuda"),
                            functools.partial(_native_backward, "_C_cuda")),
    "cpp": LogprobsKernels(functools.partial(_native_forward, "_C"), functools.partial(_native_backward, "_C")),
}


# ----------------------------------------------------------------------------- custom ops
# torch.library ops, so torch.compile(fullgraph=True) and torch.export see one node each (fake
# implementations give the output shapes without running). Absent outputs are empty tensors.
# The transform travels whole as one list argument (LogitTransform.to_op_args / from_op_args).
@torch.library.custom_op("ppo_fast::logprobs_forward", mutates_args=())
def logprobs_forward(logits: torch.Tensor, labels: Optional[torch.Tensor], transform: list[float], ignore_index: int,
                     with_entropy: bool, with_stats: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp or empty, entropy or empty, norm [..., 2], stats [..., 3] or empty), float32, the leading
    dimensions logits.shape[:-1]."""
    tr = LogitTransform.from_op_args(transform)
    out = KERNELS[backend].forward(logits, labels, tr, ignore_index, with_entropy, with_stats)
    return tuple(logits.new_empty(0, dtype=torch.float32) if t is None else t for t in out)


@logprobs_forward.register_fake
def _(logits, labels, transform, ignore_index, with_entropy, with_stats, backend):
    def out(present, *extra):
        return logits.new_empty((*logits.shape[:-1], *extra) if present else (0,), dtype=torch.float32)

    return out(labels is not None), out(with_entropy), out(True, 2), out(with_stats, 3)


@torch.library.custom_op("ppo_fast::logprobs_backward", mutates_args=())
def logprobs_backward(logits: torch.Tensor, labels: Optional[torch.Tensor], norm: torch.Tensor,
                      entropy: Optional[torch.Tensor], grad_logp: Optional[torch.Tensor],
                      grad_entropy: Optional[torch.Tensor], transform: list[float], ignore_index: int,
                      backend: str) -> torch.Tensor:
    """grad_logits in the logits' dtype (contiguous)."""
    tr = LogitTransform.from_op_args(transform)
    return KERNELS[backend].backward(logits, labels, norm, entropy, grad_logp, grad_entropy, tr,
                                 ignore_index).view(logits.shape)


@logprobs_backward.register_fake
def _(logits, labels, norm, entropy, grad_logp, grad_entropy, transform, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _setup_backward(ctx, inputs, output):
    logits, labels, transform, ignore_index, with_entropy, with_stats, backend = inputs
    ctx.save_for_backward(logits, labels, output[2], output[1] if with_entropy else None)
    ctx.args = (transform, ignore_index, backend)
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, _grad_norm, _grad_stats):
    logits, labels, norm, entropy = ctx.saved_tensors
    grad_logp = grad_logp if labels is not None else None
    grad_entropy = grad_entropy if entropy is not None else None
    if grad_logp is None and grad_entropy is None:
        return (None,) * ctx.n_inputs
    grad = logprobs_backward(logits, labels, norm, entropy, grad_logp, grad_entropy, *ctx.args)
    return (grad,) + (None,) * (ctx.n_inputs - 1)


logprobs_forward.register_autograd(_backward, setup_context=_setup_backward)


# ----------------------------------------------------------------------------- public
def split_stats(stats: torch.Tensor) -> dict:
    """The [..., 3] statistics as {log_sum_sq_probs, mean_logit (float32), is_top1 (bool)}, detached."""
    stats = stats.detach()
    return {STATS[0]: stats[..., 0], STATS[1]: stats[..., 1], STATS[2]: stats[..., 2] > 0.5}


def _logprobs_from_logits_on_kernels(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                                     logit_scale=1.0, softcap=None, return_stats=False, backend):
    tr = LogitTransform.of(temperature, logit_scale, softcap)
    logp, entropy, _, stats = logprobs_forward(logits, labels, tr.to_op_args(), ignore_index,
                                               return_entropy or return_stats, return_stats, backend)
    if return_stats:
        return logp, entropy, split_stats(stats)
    return (logp, entropy) if return_entropy else logp


def _entropy_from_logits_on_kernels(logits, *, temperature=1.0, logit_scale=1.0, softcap=None, backend):
    tr = LogitTransform.of(temperature, logit_scale, softcap)
    return logprobs_forward(logits, None, tr.to_op_args(), -100, True, False, backend)[1]


# {backend: implementation with the public signature}; dispatch calls these.
LOGPROBS_FROM_LOGITS = backend_table(_logprobs_from_logits_on_kernels, KERNELS, reference.logprobs_from_logits)
ENTROPY_FROM_LOGITS = backend_table(_entropy_from_logits_on_kernels, KERNELS, reference.entropy_from_logits)
IMPLEMENTATIONS = {"logprobs_from_logits": LOGPROBS_FROM_LOGITS, "entropy_from_logits": ENTROPY_FROM_LOGITS}


def _validate_logits(logits, temperature, logit_scale, softcap, shard=False):
    """shard: logits are one rank's vocabulary shard (tp_group), which may be empty."""
    require_float("logits", logits)
    if logits.dim() < 1 or (logits.shape[-1] == 0 and not shard):
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    require_logit_transform(temperature, logit_scale, softcap)
    return float(temperature)


def logprobs_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, logit_scale=1.0,
                         softcap=None, return_stats=False, tp_group=None, tp_invariant=False):
    """Log-probability of each label under softmax(x), x the logits over the temperature (module
    docstring: optionally scaled and softcapped), in one pass.

    Args:
        logits: [..., V] float32/bfloat16/float16.
        labels: [...] integer token ids; positions equal to `ignore_index` give logp 0 and
            no gradient through logp (their entropy is still computed).
        temperature: float > 0 dividing the logits.
        return_entropy: also return the entropy of softmax(x).
        logit_scale, softcap: x = softcap tanh(logit_scale z / softcap) / temperature (softcap None:
            x = logit_scale z / temperature), as models with final-logit softcapping compute them.
        return_stats: also return (implies the entropy) a dict of detached per-row statistics:
            log_sum_sq_probs = log sum_v p_v^2, mean_logit = mean_v x_v, is_top1 (bool) = the label
            is the row's first maximum (False for an ignored label).
        tp_group: a process group over which the vocabulary is split (ppo_fast/ops/vocab_parallel.py):
            logits are this rank's shard [..., V_local], contiguous shards in rank order, labels
            global ids; every rank gets the whole rows' results (plain tensors). Or logits a
            DTensor sharded on its last dim over one mesh dimension (that dimension's group; labels
            plain or replicated). tp_invariant: results bitwise the same for any group size (shards
            start on multiples of 128 columns).

    Returns:
        float32 logp shaped like labels, (logp, entropy) with return_entropy, or (logp, entropy,
        stats) with return_stats. Differentiable to `logits` through logp and entropy; the
        gradient has logits' dtype.
    """
    if any_dtensor(logits, labels):  # logits sharded on the vocabulary: the group is its mesh dimension's
        from ppo_fast.ops import vocab_parallel

        tp_group, local = vocab_parallel.from_dtensors(tp_group, {"logits": (logits, -1)}, {"labels": labels})
        logits, labels = local["logits"], local["labels"]
    temperature = _validate_logits(logits, temperature, logit_scale, softcap, shard=tp_group is not None)
    require_integer("labels", labels)
    require_same_device(logits=logits, labels=labels)
    require_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    if tp_group is not None:  # labels are global ids: checked against the whole vocabulary there
        from ppo_fast.ops import vocab_parallel

        return vocab_parallel.logprobs_from_logits(
            logits, labels.contiguous(), tp_group=tp_group, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, logit_scale=float(logit_scale),
            softcap=None if softcap is None else float(softcap), return_stats=return_stats, invariant=tp_invariant)
    require_labels_in_range(labels, logits.shape[-1], ignore_index)
    # labels are read by flat row index, whatever the caller's strides; logits' rows by their strides
    return dispatch("logprobs_from_logits", LOGPROBS_FROM_LOGITS, logits.device, logits, labels.contiguous(),
                    temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                    logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
                    return_stats=return_stats)


def entropy_from_logits(logits, *, temperature=1.0, logit_scale=1.0, softcap=None, tp_group=None, tp_invariant=False):
    """Entropy of softmax(x) over the last dim (x as in logprobs_from_logits): float32 [...], differentiable;
    tp_group / tp_invariant as in logprobs_from_logits (a vocabulary shard)."""
    if any_dtensor(logits):
        from ppo_fast.ops import vocab_parallel

        tp_group, local = vocab_parallel.from_dtensors(tp_group, {"logits": (logits, -1)}, {})
        logits = local["logits"]
    temperature = _validate_logits(logits, temperature, logit_scale, softcap, shard=tp_group is not None)
    if tp_group is not None:
        from ppo_fast.ops import vocab_parallel

        return vocab_parallel.logprobs_from_logits(logits, None, tp_group=tp_group, temperature=temperature,
                                                   logit_scale=float(logit_scale),
                                                   softcap=None if softcap is None else float(softcap),
                                                   invariant=tp_invariant)
    return dispatch("entropy_from_logits", ENTROPY_FROM_LOGITS, logits.device, logits, temperature=temperature,
                    logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap))
