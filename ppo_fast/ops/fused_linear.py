"""Fused linear -> log-probs + entropy: chosen-token log-probs straight from the last hidden
states and the LM head, never holding the [N, V] logits.

Rows go through in chunks. Forward, per chunk: logits_c = h_c W^T + b (GEMMs in the input
dtype, as `hidden @ weight.T` would give, on blocks of one shape so that a row's logits never
depend on N or the chunk: reference.blocked_linear), then the log-probs kernel of the active backend,
which keeps per-row normaliser and entropy. Backward, per chunk: the logits are recomputed, the
log-probs backward gives grad_logits_c, and

    grad_h_c = grad_logits_c W,   grad_W += grad_logits_c^T h_c,   grad_b += sum_n grad_logits_c

with grad_W and grad_b accumulated in fp32, in place (grad_W += on CUDA is one GEMM with an
fp32 output into the accumulator, no [V, H] temporary per chunk).

Mixed precision: the GEMMs run in the compute dtype, hidden's, or under autocast the autocast
dtype (as autocast would run `hidden @ weight.T`); inputs of another dtype (fp32 master weights
beside bf16 activations, fp32 hidden states under autocast) are cast to it inside the op, chunk by
chunk or once per pass, and their gradients, accumulated in fp32 (the hidden states' with an fp32
GEMM output), come back in their own dtype: an fp32 input's gradient is never rounded through
bf16 (a cast by the caller, `weight.to(bf16)`, would round it in the cast's backward). Extra memory is O(chunk x V)
in both passes: forward chunks make a chunk of logits about the size of the hidden states,
backward chunks are as large as the memory budget allows, so the weight gradient is read and
written as few times as possible.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.checks import (
    any_dtensor,
    require_float,
    require_integer,
    require_labels_in_range,
    require_same_device,
    require_shape,
)
from ppo_fast.ops.logprobs import KERNELS, LogitTransform, require_logit_transform, split_stats
from ppo_fast.ops.reference import GEMM_BLOCK_ROWS, blocked_linear

# ----------------------------------------------------------------------------- chunking
MIN_CHUNK_ROWS = 128
CPU_BUDGET_BYTES = 64 * 2**20
BYTES_PER_LOGIT = 12  # a chunk's logits and their gradient (input dtype) and fp32 temporaries


def whole_blocks(rows: int) -> int:
    """rows rounded down to a multiple of GEMM_BLOCK_ROWS, at least one block (no padded GEMM
    rows inside a chunk)."""
    return max(GEMM_BLOCK_ROWS, rows - rows % GEMM_BLOCK_ROWS)


def chunk_budget_rows(vocab: int, device: torch.device) -> int:
    """The most rows (whole GEMM blocks) whose logits, gradient and fp32 temporaries fit in the
    budget: 1/8 of free memory on CUDA, CPU_BUDGET_BYTES on CPU."""
    budget = torch.cuda.mem_get_info(device)[0] // 8 if device.type == "cuda" else CPU_BUDGET_BYTES
    return whole_blocks(budget // (vocab * BYTES_PER_LOGIT))


def default_chunk_size(n_rows: int, vocab: int, hidden_size: int, budget_rows: int) -> int:
    """Forward rows per chunk: a chunk of logits about the size of the hidden states (V / H
    chunks), at least MIN_CHUNK_ROWS rows so each GEMM stays efficient, at most budget_rows,
    in whole GEMM blocks. (The chunking never changes a row's result: blocked_linear.)"""
    rows = max(-(-n_rows // max(1, -(-vocab // max(hidden_size, 1)))), MIN_CHUNK_ROWS)
    return whole_blocks(min(rows, budget_rows))


def in_compute_dtype(dtype, weight, bias):
    """(weight, bias) in the dtype the GEMMs run in (no copy where they have it)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def compute_dtype_of(hidden) -> torch.dtype:
    """The dtype the head's GEMMs run in: autocast's where it is on for hidden's device, else hidden's."""
    kind = hidden.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


@contextlib.contextmanager
def autocast_off(device: torch.device):
    """Autocast disabled for the block where it is on (the ops choose their GEMMs' dtype themselves)."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            yield
    else:
        yield


def accumulate_fp32(acc, a, b):
    """acc += a @ b in place, acc float32, whatever the dtype of a and b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # bf16/fp16 GEMM accumulating into fp32
    else:
        acc.addmm_(a.float(), b.float())  # CPU: fp32 copies of the chunk only


# ----------------------------------------------------------------------------- custom ops
# hidden flattened to [N, H], labels to [N]; chunk_size 0 = the defaults above; the logit transform
# whole, as LogitTransform.to_op_args() (ppo_fast.ops.logprobs).
@torch.library.custom_op("ppo_fast::fused_linear_logprobs_forward", mutates_args=())
def fused_linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, transform: list[float], ignore_index: int, with_entropy: bool,
                         with_stats: bool, chunk_size: int,
                         compute_dtype: torch.dtype,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N] or empty, norm [N, 2] (logprobs.py), stats [N, 3] or empty), float32."""
    launch_forward = KERNELS[backend].forward
    tr = LogitTransform.from_op_args(transform)
    weight, bias = in_compute_dtype(compute_dtype, weight, bias)
    (N, H), V = hidden.shape, weight.shape[0]
    chunk = chunk_size or default_chunk_size(N, V, H, chunk_budget_rows(V, hidden.device))
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, norm = torch.empty(N, **f32), torch.empty(N, 2, **f32)
    entropy = torch.empty(N if with_entropy else 0, **f32)
    stats = torch.empty((N, 3) if with_stats else (0,), **f32)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        logits = blocked_linear(hidden[rows].to(compute_dtype), weight, bias)
        logp[rows], entropy_c, norm[rows], stats_c = launch_forward(logits, labels[rows], tr, ignore_index,
                                                                   with_entropy, with_stats)
        if with_entropy:
            entropy[rows] = entropy_c
        if with_stats:
            stats[rows] = stats_c
    return logp, entropy, norm, stats


@fused_linear_forward.register_fake
def _(hidden, weight, bias, labels, transform, ignore_index, with_entropy, with_stats, chunk_size, compute_dtype,
      backend):
    N = hidden.shape[0]
    return (*(hidden.new_empty(n, dtype=torch.float32) for n in (N, N if with_entropy else 0)),
            hidden.new_empty(N, 2, dtype=torch.float32),
            hidden.new_empty((N, 3) if with_stats else (0,), dtype=torch.float32))


@torch.library.custom_op("ppo_fast::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          labels: torch.Tensor, norm: torch.Tensor, entropy: Optional[torch.Tensor],
                          grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                          transform: list[float], ignore_index: int,
                          chunk_size: int, compute_dtype: torch.dtype, want_hidden: bool, want_weight: bool,
                          want_bias: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias), each empty where not wanted; chunks recompute the logits."""
    launch_backward = KERNELS[backend].backward
    tr = LogitTransform.from_op_args(transform)
    weight_dtype, bias_dtype = weight.dtype, None if bias is None else bias.dtype
    weight, bias = in_compute_dtype(compute_dtype, weight, bias)
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or chunk_budget_rows(V, hidden.device)
    grad_h = torch.empty_like(hidden) if want_hidden else hidden.new_empty(0)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_weight else None
    grad_b = torch.zeros(V, device=weight.device, dtype=torch.float32) if want_bias else None
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        h = hidden[rows].to(compute_dtype)
        grad_logits = launch_backward(
            blocked_linear(h, weight, bias), labels[rows], norm[rows], None if entropy is None else entropy[rows],
            None if grad_logp is None else grad_logp[rows], None if grad_entropy is None else grad_entropy[rows],
            tr, ignore_index,
        )
        if want_hidden:
            grad_h[rows] = blocked_linear(grad_logits, weight.t(), out_dtype=hidden.dtype)
        if want_weight:
            accumulate_fp32(grad_w, grad_logits.t(), h)
        if want_bias:
            grad_b += grad_logits.sum(0, dtype=torch.float32)
    grad_w = weight.new_empty(0) if grad_w is None else grad_w.to(weight_dtype)
    grad_b = weight.new_empty(0) if grad_b is None else grad_b.to(bias_dtype)
    return grad_h, grad_w, grad_b


@fused_linear_backward.register_fake
def _(hidden, weight, bias, labels, norm, entropy, grad_logp, grad_entropy, transform, ignore_index, chunk_size,
      compute_dtype, want_hidden, want_weight, want_bias, backend):
    return (torch.empty_like(hidden) if want_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if want_weight else weight.new_empty(0),
            bias.new_empty(weight.shape[0]) if want_bias else weight.new_empty(0))


def _fused_linear_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, transform, ignore_index, with_entropy, with_stats, chunk_size, compute_dtype,
     backend) = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[2], output[1] if with_entropy else None)
    ctx.args = (transform, ignore_index, chunk_size, compute_dtype)
    ctx.backend, ctx.n_inputs = backend, len(inputs)
    ctx.set_materialize_grads(False)


def _fused_linear_backward(ctx, grad_logp, grad_entropy, _grad_norm, _grad_stats):
    hidden, weight, bias, labels, norm, entropy = ctx.saved_tensors
    grad_entropy = grad_entropy if entropy is not None else None
    want = ctx.needs_input_grad[:3]
    if (grad_logp is None and grad_entropy is None) or not any(want):
        return (None,) * ctx.n_inputs
    with autocast_off(hidden.device):  # the backward may run where autocast is on: the op picks its dtypes
        grads = fused_linear_backward(hidden, weight, bias, labels, norm, entropy, grad_logp, grad_entropy,
                                      *ctx.args, *want, ctx.backend)
    return (*(g if w else None for g, w in zip(grads, want)),) + (None,) * (ctx.n_inputs - 3)


fused_linear_forward.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)


# ----------------------------------------------------------------------------- public
def _fused_linear_logprobs_on_kernels(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                                      return_entropy=False, chunk_size=None, logit_scale=1.0, softcap=None,
                                      return_stats=False, backend):
    """The custom op on hidden flattened to [N, H] and labels to [N] (int64, contiguous), its GEMMs in
    the compute dtype (compute_dtype_of), autocast off inside (the op casts what it needs)."""
    tr = LogitTransform.of(temperature, logit_scale, softcap)
    flat_labels = labels.reshape(-1).long().contiguous()  # chunks index it by flat row
    flat_hidden = hidden.reshape(flat_labels.numel(), hidden.shape[-1])  # explicit N: H may be 0
    compute_dtype = compute_dtype_of(hidden)
    with autocast_off(hidden.device):
        logp, entropy, _, stats = fused_linear_forward(flat_hidden, weight, bias, flat_labels, tr.to_op_args(),
                                                       ignore_index, return_entropy or return_stats, return_stats,
                                                       chunk_size or 0, compute_dtype, backend)
    logp = logp.view(labels.shape)
    if return_stats:
        return logp, entropy.view(labels.shape), split_stats(stats.view(*labels.shape, 3))
    return (logp, entropy.view(labels.shape)) if return_entropy else logp


# {backend: implementation with the public signature}; dispatch calls these.
FUSED_LINEAR_LOGPROBS = backend_table(_fused_linear_logprobs_on_kernels, KERNELS, reference.fused_linear_logprobs)
IMPLEMENTATIONS = {"fused_linear_logprobs": FUSED_LINEAR_LOGPROBS}


def check_linear_inputs(hidden, weight, bias, labels, ignore_index, shard=False) -> int:
    """hidden [..., H], weight [V, H] and bias [V] of float dtypes (the weight's and bias's may differ
    from hidden's: see the module docstring), integer labels shaped hidden.shape[:-1] in [0, V) or
    ignore_index, all on one device. Returns V. H = 0 is defined (the logits are the bias, or 0: a
    uniform distribution); V = 0 is refused (no distribution). shard: weight is one rank's vocabulary
    shard (tp_group), which may be empty; the labels are global ids, checked against the whole
    vocabulary by the group."""
    require_float("hidden", hidden)
    require_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected shape [..., H] (at least one dimension), got {tuple(hidden.shape)}")
    if weight.dim() == 2 and weight.shape[0] == 0 and not shard:
        raise ValueError(f"weight: expected shape [V, H] with V >= 1 (log-probs need at least one token), got "
                         f"{tuple(weight.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None:
        require_float("bias", bias)
        require_shape("bias", bias, (V,), "[V] = [weight.shape[0]]")
    require_integer("labels", labels)
    require_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    require_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if not shard:
        require_labels_in_range(labels, V, ignore_index)
    return V


def require_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")


def fused_linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None, logit_scale=1.0, softcap=None, return_stats=False,
                          tp_group=None, tp_invariant=False):
    """Log-probs of `labels` (and the entropy) under softmax(x), x the logits hidden @ weight.T + bias
    over the temperature (optionally scaled and softcapped, as in logprobs_from_logits), equal to
    `logprobs_from_logits(hidden @ weight.T + bias, labels, ...)` without the logits.

    Args:
        hidden: [..., H] float32/bfloat16/float16 (the last hidden states); the GEMMs run in its dtype
            (under autocast, autocast's).
        weight: [V, H], the `lm_head.weight` layout; bias: [V] or None. Of hidden's dtype, or another
            (fp32 master weights): cast inside, their gradients accumulated in fp32 and returned in
            their own dtype.
        labels: [...] integer ids (`ignore_index` positions give logp 0, no gradient via logp).
        chunk_size: tokens (rows of the flattened [N, H]) per chunk in both passes; default from V, H and
            free memory.
        logit_scale, softcap, return_stats: as in logprobs_from_logits (the statistics from the
            same pass over each chunk's logits).
        tp_group: a process group over which the LM head is split by vocabulary
            (ppo_fast/ops/vocab_parallel.py): weight / bias are this rank's rows [V_local, H] / [V_local]
            (contiguous shards in rank order), hidden the same on every rank, labels global ids;
            d_hidden is summed over the group, d_weight stays local. Or weight (and bias) a DTensor
            sharded on dim 0 over one mesh dimension with hidden a DTensor replicated on its mesh
            (a plain hidden beside it is refused: FSDP's sharded weight or a TP shard?).
            tp_invariant as in logprobs_from_logits.

    Returns float32 logp shaped like labels, (logp, entropy), or (logp, entropy, stats). Gradients
    flow to hidden, weight and bias through logp and entropy; weight and bias gradients are
    accumulated in fp32.
    """
    if any_dtensor(hidden, weight, bias, labels):  # the LM head sharded on the vocabulary: its mesh's group
        from ppo_fast.ops import vocab_parallel

        tp_group, local = vocab_parallel.from_dtensors(tp_group, {"weight": (weight, 0), "bias": (bias, 0)},
                                                       {"hidden": hidden, "labels": labels})
        hidden, weight, bias, labels = (local[k] for k in ("hidden", "weight", "bias", "labels"))
    if tp_group is not None:  # labels are global ids: checked against the whole vocabulary there
        from ppo_fast.ops import vocab_parallel

        check_linear_inputs(hidden, weight, bias, labels, ignore_index, shard=True)
        require_logit_transform(temperature, logit_scale, softcap)
        require_chunk_size(chunk_size)
        return vocab_parallel.fused_linear_logprobs(
            hidden, weight, labels, tp_group=tp_group, bias=bias, temperature=float(temperature),
            ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size,
            logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
            return_stats=return_stats, invariant=tp_invariant)
    check_linear_inputs(hidden, weight, bias, labels, ignore_index)
    require_logit_transform(temperature, logit_scale, softcap)
    require_chunk_size(chunk_size)
    return dispatch("fused_linear_logprobs", FUSED_LINEAR_LOGPROBS, hidden.device, hidden, weight, labels, bias=bias,
                    temperature=float(temperature), ignore_index=ignore_index, return_entropy=return_entropy,
                    chunk_size=chunk_size, logit_scale=float(logit_scale),
                    softcap=None if softcap is None else float(softcap), return_stats=return_stats)
