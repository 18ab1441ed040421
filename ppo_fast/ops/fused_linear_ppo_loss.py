"""Fused linear -> PPO loss: the policy objective straight from the last hidden states, its
gradient formed during the forward.

A token's loss depends on the model only through its log-prob y and entropy H; every other
input (old and reference log-probs, advantages, mask, the global counts) is known before the
forward, so dL/dlogits is known inside it. With w_b the aggregation weight of row b
(the row protocol, ppo_fast/ops/rows.py: agg(L) = sum_b w_b sum_t m_bt L_bt),

    L        = sum_bt w_b m_bt (is_bt pg_bt - c_H H_bt + c_KL kl_bt)
    dL/dy_bt = w_b (m_bt is_bt dpg/dy + c_KL m_bt dkl/dy),   dL/dH_bt = -c_H w_b m_bt

with pg the policy objective (ppo_fast.ops.objectives) and is the importance weights (1 without
them; they weigh the policy term only, as in verl, TRL and Liger).

Per chunk of whole rows: logits = h W^T + b (GEMM 1); one pass of the log-probs kernel for y,
H and the row normaliser; the policy-loss kernel for the row sums of pg and m is dpg/dy (a sequence ratio's
extra passes run over the chunk's rows there: no second GEMM); then the log-probs
backward turns dL/dy and dL/dH into dL/dlogits, written into the logits buffer itself, and
grad_h = g W (GEMM 2), grad_W += g^T h (GEMM 3, fp32, in place). The autograd backward only
scales the saved gradients by the upstream scalar: three GEMMs in all (fused_linear_logprobs
followed by ppo_policy_loss recomputes the logits: four), O(chunk x V) extra memory.

That is the path of the compiled objectives (clip, cispo, gpg, sapo). Any other registered
objective takes the generic path, that composition: fused_linear_logprobs's kernels give the
log-probs and entropy, autograd gives the objective's gradient to them (its definition on [B, T]
tensors, which may look at the whole batch), and the head's backward takes it, recomputing the
logits chunk by chunk (four GEMMs; still no [N, V] tensor kept).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ppo_fast.ops import kl as kl_ops
from ppo_fast.ops import policy_loss as policy_ops
from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch
from ppo_fast.ops.checks import (
    any_dtensor,
    contiguous,
    require_choice,
    require_finite,
    require_mask,
    require_per_token,
    require_same_device,
)
from ppo_fast.ops.fused_linear import FUSED_LINEAR_LOGPROBS as FUSED_HEAD
from ppo_fast.ops.fused_linear import (
    accumulate_fp32,
    autocast_off,
    compute_dtype_of,
    in_compute_dtype,
    check_linear_inputs,
    chunk_budget_rows,
    require_chunk_size,
)
from ppo_fast.ops.kl import KLKernels
from ppo_fast.ops.logprobs import KERNELS as HEAD_KERNELS
from ppo_fast.ops.logprobs import LogitTransform, LogprobsKernels, require_logit_transform
from ppo_fast.ops.objectives import Objective, kernel_constants, resolve
from ppo_fast.ops.reference import blocked_linear, masked_max_abs, policy_ratio_vjp, valid_only
from ppo_fast.ops.rows import POLICY_ROW_STATS, ROW_LOSS, agg_row_weights, require_agg, row_token_means

# Per-row sums the forward keeps: the policy loss kernel's columns, then entropy and KL.
ROW_ENTROPY, ROW_KL = len(POLICY_ROW_STATS), len(POLICY_ROW_STATS) + 1
# The op's stats vector: the token means of the row sums after the token column, then the max |logp - old|.
LOSS_STATS = ("clipfrac", "approx_kl", "clipfrac_lower", "entropy", "kl", "max_abs_log_ratio")


# ----------------------------------------------------------------------------- launchers
class LossKernels(NamedTuple):
    """One backend's launchers for the compiled path, each from its own op's table."""
    head: LogprobsKernels  # logprobs.py: y, H and the row normaliser of a chunk's logits; dL/dlogits
    policy_forward: Callable  # policy_loss.py: a chunk's row sums of the objective and m is dpg/dy
    kl: KLKernels  # kl.py: the KL term and its derivative to y


# The backends that have all three parts: triton and cpp. The cuda backend has CUDA kernels for the
# head only, so it does not implement this op (forced, it raises BackendError; auto runs Triton).
KERNELS = {backend: LossKernels(HEAD_KERNELS[backend], policy_ops.KERNELS[backend], kl_ops.KERNELS[backend])
           for backend in HEAD_KERNELS if backend in policy_ops.KERNELS and backend in kl_ops.KERNELS}


def ratio_weighted_kl(kl, dkl, logp, old, mask, level):
    """(rho kl, its derivative to logp) for the KL term weighted by the policy ratio rho at `level`
    (reference.policy_ratio): rho dkl + (d rho / d logp)^T (m kl) (reference.policy_ratio_vjp: no
    autograd inside a custom op)."""
    rho, through_ratio = policy_ratio_vjp(logp, old, mask, level, valid_only(kl, mask))
    return rho * kl, rho * dkl + through_ratio


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("ppo_fast::fused_linear_ppo_loss_forward", mutates_args=())
def fused_ppo_loss_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    old: Optional[torch.Tensor], adv: torch.Tensor, mask: torch.Tensor, ref: Optional[torch.Tensor],
    is_weights: Optional[torch.Tensor], row_weights: torch.Tensor, transform: list[float], ignore_index: int,
    objective: str, objective_params: str, kl_coef: float,
    kl_estimator: str, kl_ratio: Optional[str], entropy_coef: float, chunk_tokens: int, compute_dtype: torch.dtype,
    want_hidden: bool, want_weight: bool, want_bias: bool, return_log_prob: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, policy_loss, stats [len(LOSS_STATS)]: the token means of the row statistics after the
    token column, then max |logp - old| over valid tokens; grad_hidden, grad_weight (fp32),
    grad_bias (fp32): the gradients of the loss itself, empty where not wanted; log_prob [B, T] or
    empty), the chunk loop of the module docstring.

    hidden [B, T, H]; labels [B, T] int64; old (None: the log-probs computed here, detached), adv,
    mask (float 0/1), ref (or None) [B, T] float32 contiguous; is_weights None or [B, T] / [B, 1]
    float32; row_weights [B] float32; chunk_tokens 0 = from the memory budget.
    """
    kernels = KERNELS[backend]
    tr = LogitTransform.from_op_args(transform)
    constants = kernel_constants(Objective.from_op_args(objective, objective_params))
    weight, bias = in_compute_dtype(compute_dtype, weight, bias)
    want = (want_hidden, want_weight, want_bias)
    needs_grad = any(want)
    B, T, H = hidden.shape
    f32 = dict(device=hidden.device, dtype=torch.float32)
    row_stats = torch.zeros(B, ROW_KL + 1, **f32)
    max_abs_log_ratio = torch.zeros((), **f32)
    grad_h = torch.empty_like(hidden) if want_hidden else hidden.new_empty(0)
    grad_w = torch.zeros(weight.shape, **f32) if want_weight else hidden.new_empty(0)
    grad_b = torch.zeros(weight.shape[0], **f32) if want_bias else hidden.new_empty(0)
    log_prob = torch.empty(B, T, **f32) if return_log_prob else hidden.new_empty(0, dtype=torch.float32)
    rows_per_chunk = max(1, (chunk_tokens or chunk_budget_rows(weight.shape[0], hidden.device)) // max(T, 1))
    for start in range(0, B if T else 0, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, B))
        k = rows.stop - rows.start
        h = hidden[rows].reshape(k * T, H).to(compute_dtype)
        chunk_labels = labels[rows].reshape(-1)
        logits = blocked_linear(h, weight, bias)
        logp, entropy, norm, _ = kernels.head.forward(logits, chunk_labels, tr, ignore_index, True)
        logp, entropy = logp.view(k, T), entropy.view(k, T)
        if return_log_prob:
            log_prob[rows] = logp
        m = mask[rows]
        old_rows = logp if old is None else old[rows]
        max_abs_log_ratio = torch.maximum(max_abs_log_ratio, masked_max_abs(logp - old_rows, m))
        policy_rows, dloss = kernels.policy_forward(logp, old_rows, adv[rows], m,
                                                    None if is_weights is None else is_weights[rows], constants,
                                                    needs_grad)
        row_stats[rows, :ROW_ENTROPY] = policy_rows
        row_stats[rows, ROW_ENTROPY] = valid_only(entropy, m).sum(-1)
        w = row_weights[rows, None]
        grad_logp = w * dloss if needs_grad else None  # dloss = m is dpg/dy
        if ref is not None:
            kl, dkl = kl_ops.kl_and_grad(valid_only(logp, m), valid_only(ref[rows], m), kl_estimator, kernels.kl)
            if kl_ratio is not None:
                kl, dkl = ratio_weighted_kl(kl, dkl, logp, old_rows, m, kl_ratio)
            row_stats[rows, ROW_KL] = valid_only(kl, m).sum(-1)
            if needs_grad and kl_coef != 0:
                grad_logp = grad_logp + (kl_coef * w) * valid_only(dkl, m)
        if not needs_grad:
            continue
        grad_entropy = (-entropy_coef * w * m).reshape(-1) if entropy_coef != 0 else None
        # dL/dlogits written into the chunk's logits buffer itself (read before overwritten)
        grad_logits = kernels.head.backward(logits, chunk_labels, norm, entropy.reshape(-1), grad_logp.reshape(-1),
                                            grad_entropy, tr, ignore_index, out=logits)
        if want_hidden:
            grad_h[rows] = blocked_linear(grad_logits, weight.t(), out_dtype=hidden.dtype).view(k, T, H)
        if want_weight:
            accumulate_fp32(grad_w, grad_logits.t(), h)
        if want_bias:
            grad_b += grad_logits.sum(0, dtype=torch.float32)
    # agg(x) = sum_b w_b (row sum of m x): the loss terms from the row sums.
    policy_loss, entropy_agg, kl_agg = (row_weights @ row_stats[:, [ROW_LOSS, ROW_ENTROPY, ROW_KL]]).unbind()
    loss = policy_loss - entropy_coef * entropy_agg + kl_coef * kl_agg
    stats = torch.cat([row_token_means(row_stats), max_abs_log_ratio[None]])
    return loss, policy_loss, stats, grad_h, grad_w, grad_b, log_prob


@fused_ppo_loss_forward.register_fake
def _(hidden, weight, bias, labels, old, adv, mask, ref, is_weights, row_weights, transform, ignore_index, objective,
      objective_params, kl_coef, kl_estimator, kl_ratio, entropy_coef, chunk_tokens, compute_dtype, want_hidden,
      want_weight, want_bias, return_log_prob, backend):
    def f32(*shape):
        return hidden.new_empty(shape, dtype=torch.float32)

    return (f32(), f32(), f32(len(LOSS_STATS)), torch.empty_like(hidden) if want_hidden else hidden.new_empty(0),
            f32(*weight.shape) if want_weight else hidden.new_empty(0),
            f32(weight.shape[0]) if want_bias else hidden.new_empty(0), f32(*labels.shape) if return_log_prob else f32(0))


def _scaled(grad, factor):
    """grad * factor, in place on an eager tensor (this node's own buffer: no second [V, H] fp32
    tensor at the peak); out of place on the fake/functional tensors of a trace, whose graph may
    not mutate a forward output."""
    return grad.mul_(factor) if type(grad) is torch.Tensor else grad.mul(factor)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:6])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, inputs[1].dtype if inputs[2] is None else inputs[2].dtype)
    ctx.n_inputs, ctx.scaled = len(inputs), False


def _backward(ctx, grad_loss, *_grad_outputs):
    """The forward formed the gradients; the backward scales them by the upstream scalar (in place
    in eager), so a second backward through the same loss is refused rather than scaled twice."""
    if ctx.scaled:
        raise RuntimeError("fused_linear_ppo_loss: backward through the same loss twice (retain_graph=True) is "
                           "not supported: its gradients are formed in the forward and scaled in place")
    ctx.scaled = True
    grads = tuple(_scaled(g, grad_loss).to(dtype) if want else None
                  for g, dtype, want in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad))
    return grads + (None,) * (ctx.n_inputs - 3)


fused_ppo_loss_forward.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public
def _fused_linear_ppo_loss_on_kernels(hidden, weight, labels, old_log_prob, advantages, mask, *, bias=None,
                                      temperature=1.0, ignore_index=-100, ref_log_prob=None, kl_coef=0.0,
                                      kl_estimator="low_var_kl", kl_ratio=None, entropy_coef=0.0, agg="token-mean",
                                      num_tokens=None, num_seqs=None, is_weights=None, objective: Objective,
                                      chunk_size=None, logit_scale=1.0, softcap=None, return_log_prob=False, backend):
    if not objective.compiled:
        return _generic_loss(hidden, weight, labels, old_log_prob, advantages, mask, bias=bias, temperature=temperature,
                             ignore_index=ignore_index, ref_log_prob=ref_log_prob, kl_coef=kl_coef,
                             kl_estimator=kl_estimator, kl_ratio=kl_ratio, entropy_coef=entropy_coef, agg=agg,
                             num_tokens=num_tokens, num_seqs=num_seqs, is_weights=is_weights, objective=objective,
                             chunk_size=chunk_size, logit_scale=logit_scale, softcap=softcap,
                             return_log_prob=return_log_prob, backend=backend)
    mask = mask.to(torch.float32)
    old, adv, ref, is_w = (None if t is None else t.detach().float()
                           for t in (old_log_prob, advantages, ref_log_prob, is_weights))
    hidden, labels, old, adv, mask, ref, is_w = contiguous(hidden, labels.long(), old, adv, mask, ref, is_w)
    row_weights = agg_row_weights(mask.sum(-1), agg, num_tokens, num_seqs)
    grad_on = torch.is_grad_enabled()
    want = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    tr = LogitTransform.of(temperature, logit_scale, softcap)
    compute_dtype = compute_dtype_of(hidden)
    with autocast_off(hidden.device):
        loss, policy_loss, stats, *_, log_prob = fused_ppo_loss_forward(
            hidden, weight, bias, labels, old, adv, mask, ref, is_w, row_weights, tr.to_op_args(), ignore_index,
            *objective.to_op_args(), kl_coef, kl_estimator, kl_ratio, entropy_coef, chunk_size or 0,
            compute_dtype, *want, return_log_prob, backend)
    named = dict(zip(LOSS_STATS, stats.detach().unbind()))
    kl = named.pop("kl")  # the reference's order: ppo_policy_loss's stats, policy_loss, the rest, kl
    stats = {**{k: named.pop(k) for k in LOSS_STATS[:3]}, "policy_loss": policy_loss.detach(), **named}
    if ref_log_prob is not None:
        stats["kl"] = kl
    if return_log_prob:
        stats["log_prob"] = log_prob.detach()
    return loss, stats


def _generic_loss(hidden, weight, labels, old_log_prob, advantages, mask, *, bias, temperature, ignore_index,
                  chunk_size, logit_scale, softcap, backend, return_log_prob, **loss_args):
    """The generic path (module docstring): the backend's fused head, then the objective's definition
    and the loss terms under autograd on the [B, T] log-probs and entropy."""
    logp, entropy = FUSED_HEAD[backend](hidden, weight, labels, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index, return_entropy=True, chunk_size=chunk_size,
                                        logit_scale=logit_scale, softcap=softcap)
    return _loss_of_head(logp, entropy, old_log_prob, advantages, mask, return_log_prob, **loss_args)


def _loss_of_head(logp, entropy, old_log_prob, advantages, mask, return_log_prob, **loss_args):
    """The generic path after its head (the backend's, or the vocabulary-parallel one): the loss terms
    under autograd on the [B, T] log-probs and entropy, and the log-probs in the stats if asked."""
    loss, stats = reference.ppo_loss_of_logprobs(logp, entropy, old_log_prob, advantages, mask, **loss_args)
    if return_log_prob:
        stats["log_prob"] = logp.detach()
    return loss, stats


# {backend: implementation with the public signature}; dispatch calls these.
FUSED_LINEAR_PPO_LOSS = backend_table(_fused_linear_ppo_loss_on_kernels, KERNELS, reference.fused_linear_ppo_loss)
IMPLEMENTATIONS = {"fused_linear_ppo_loss": FUSED_LINEAR_PPO_LOSS}


def _check_loss_inputs(hidden, labels, old_log_prob, advantages, mask, ref_log_prob):
    if labels.dim() != 2:
        raise ValueError(f"labels: expected a [B, T] tensor (hidden [B, T, H]), got shape {tuple(labels.shape)}")
    per_token = {"advantages": advantages} if old_log_prob is None else {"old_log_prob": old_log_prob,
                                                                          "advantages": advantages}
    if ref_log_prob is not None:
        per_token["ref_log_prob"] = ref_log_prob
    shape = require_per_token(per_token)
    if tuple(shape) != tuple(labels.shape):
        raise ValueError(f"{next(iter(per_token))}: expected the shape of labels {tuple(labels.shape)}, got "
                         f"{tuple(shape)}")
    require_mask("mask", mask, shape)
    require_same_device(hidden=hidden, advantages=advantages, mask=mask)


def fused_linear_ppo_loss(hidden, weight, labels, old_log_prob, advantages, mask, *, bias=None, temperature=1.0,
                          ignore_index=-100, ref_log_prob=None, kl_coef=0.0, kl_estimator="low_var_kl", kl_ratio=None,
                          entropy_coef=0.0, agg="token-mean", num_tokens=None, num_seqs=None, is_weights=None,
                          objective="clip", chunk_size=None, logit_scale=1.0, softcap=None, return_log_prob=False,
                          tp_group=None, tp_invariant=False, **params):
    """PPO policy loss from the last hidden states and the LM head, never holding [N, V] logits:

        ppo_policy_loss(logp, ...) - entropy_coef * agg(entropy) + kl_coef * agg(kl_penalty(logp, ref))

    with logp, entropy = fused_linear_logprobs(hidden, weight, labels), in one pass (see the
    module docstring). Same value, gradients and stats as that composition
    (`ppo_fast.ops.reference.fused_linear_ppo_loss`).

    Args:
        hidden: [B, T, H] float32/bfloat16/float16; weight: [V, H] (lm_head.weight); bias: [V]; of
            hidden's dtype or another (fp32 masters: cast inside, gradients accumulated and returned
            in fp32), as in fused_linear_logprobs (autocast too).
        labels: [B, T] integer ids; old_log_prob, advantages, mask (bool or 0/1), ref_log_prob:
            [B, T]; old_log_prob None: on-policy, the ratio against the log-probs computed here
            (detached), so every ratio is 1 in the forward (TRL's and Liger's GRPO without old
            log-probs). objective and **params (its parameters: clip_low, clip_high, dual_clip,
            ratio_level, ...), is_weights, agg, num_tokens, num_seqs as in ppo_policy_loss (pass the
            global counts when accumulating micro-batches: the gradients then add up to the big
            batch's). A KL term needs ref_log_prob; given without kl_coef its mean is still reported.
        kl_ratio: None, or "token" / "sequence" / "sequence-token": each token's KL times the policy
            ratio at that level (reference.policy_ratio), its gradient included — the
            importance-sampling-corrected KL (DeepSeek-V3.2; TRL's use_bias_correction_kl). The kl
            statistic is then the weighted one.
        return_log_prob: also return the per-token log-probs, detached [B, T], as stats["log_prob"]
            (for a trainer's own metrics).
        tp_group, tp_invariant: the LM head split by vocabulary over a process group, as in
            fused_linear_logprobs (weight / bias this rank's rows): the vocabulary-parallel head gives
            the log-probs and entropy, then the generic path's composition (every objective, ratio
            level, is_weights, entropy bonus, KL term); d_hidden summed over the group.
        chunk_size: tokens per chunk, rounded down to whole sequences (at least one); default from V and
            free memory.
        logit_scale, softcap: the logits' scale and final-logit softcap, as in logprobs_from_logits.

    Returns (loss, stats): a float32 scalar differentiable to hidden, weight and bias, and
    detached float32 scalars clipfrac, approx_kl, clipfrac_lower, policy_loss, entropy,
    max_abs_log_ratio (max |logp - old| over valid tokens: 0 exactly on-policy) and (with
    ref_log_prob) kl. Under no_grad, or when nothing requires grad, no gradient work runs.
    """
    if any_dtensor(hidden, weight, bias, labels, old_log_prob, advantages, mask, ref_log_prob, is_weights):
        from ppo_fast.ops import vocab_parallel

        per_token = ("hidden", "labels", "old_log_prob", "advantages", "mask", "ref_log_prob", "is_weights")
        tp_group, local = vocab_parallel.from_dtensors(
            tp_group, {"weight": (weight, 0), "bias": (bias, 0)},
            dict(zip(per_token, (hidden, labels, old_log_prob, advantages, mask, ref_log_prob, is_weights))))
        hidden, weight, bias = local["hidden"], local["weight"], local["bias"]
        labels, old_log_prob, advantages, mask, ref_log_prob, is_weights = (local[k] for k in per_token[1:])
    check_linear_inputs(hidden, weight, bias, labels, ignore_index, shard=tp_group is not None)
    _check_loss_inputs(hidden, labels, old_log_prob, advantages, mask, ref_log_prob)
    require_logit_transform(temperature, logit_scale, softcap)
    require_chunk_size(chunk_size)
    require_agg(agg, num_tokens, num_seqs)
    require_choice("kl_estimator", kl_estimator, kl_ops.ESTIMATORS)
    if kl_ratio is not None:
        require_choice("kl_ratio", kl_ratio, reference.RATIO_LEVELS)
    kl_coef, entropy_coef = require_finite("kl_coef", kl_coef), require_finite("entropy_coef", entropy_coef)
    if kl_coef != 0 and ref_log_prob is None:
        raise ValueError(f"ref_log_prob: required when kl_coef != 0 (got kl_coef={kl_coef})")
    objective = resolve(objective, **params)
    policy_ops.check_is_weights(is_weights, advantages, mask)
    if tp_group is not None:
        from ppo_fast.ops import vocab_parallel

        logp, entropy = vocab_parallel.fused_linear_logprobs(
            hidden, weight, labels, tp_group=tp_group, bias=bias, temperature=float(temperature),
            ignore_index=ignore_index, return_entropy=True, chunk_size=chunk_size, logit_scale=float(logit_scale),
            softcap=None if softcap is None else float(softcap), invariant=tp_invariant)
        return _loss_of_head(logp, entropy, old_log_prob, advantages, mask, return_log_prob, ref_log_prob=ref_log_prob,
                             kl_coef=kl_coef, kl_estimator=kl_estimator, kl_ratio=kl_ratio, entropy_coef=entropy_coef,
                             agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, is_weights=is_weights,
                             objective=objective)
    return dispatch("fused_linear_ppo_loss", FUSED_LINEAR_PPO_LOSS, hidden.device, hidden, weight, labels, old_log_prob,
                    advantages, mask, bias=bias, temperature=float(temperature), ignore_index=ignore_index,
                    ref_log_prob=ref_log_prob, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_ratio=kl_ratio,
                    entropy_coef=entropy_coef, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, is_weights=is_weights,
                    objective=objective, chunk_size=chunk_size, logit_scale=float(logit_scale),
                    softcap=None if softcap is None else float(softcap), return_log_prob=bool(return_log_prob))
