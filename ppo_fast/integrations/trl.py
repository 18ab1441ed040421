"""TRL (1.16) on ppo_fast's kernels: its per-token helpers (trl.trainer.utils), the fused LM head its
trainers score log-probs with (trl.kernels.ChunkedLogProbFunction), GRPOTrainer's loss through
fused_linear_ppo_loss, and patch() to install them.

    from ppo_fast.integrations import trl as pf_trl
    pf_trl.patch()             # GRPO, RLOO, DPO, SFT, KTO trainers: log-probs and entropy on ppo_fast
    pf_trl.patch(loss=True)    # and GRPOTrainer's loss from the hidden states in one fused op

Where ppo_fast is called: TRL 1.16's trainers compute log-probs through
trl.trainer.utils._ChunkedLogProbFunction (reached from the model forward add_fused_lm_head installs,
looked up as a module global at each call), which patch() replaces with ChunkedLogProbFunction; the
helpers selective_log_softmax, entropy_from_logits and selective_log_softmax_and_entropy are
replaced in every loaded TRL module that has them. patch() returns (and logs) what it replaced, and
warns when a trainer finishes a training step without calling any of it (a TRL that moved its
hooks is noticed, not silently slow).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
import warnings

import torch

from ppo_fast import ops
from ppo_fast.integrations import grpo_loss_types, unsupported
from ppo_fast.ops import objectives, reference
from ppo_fast.ops.fused_linear import compute_dtype_of

IGNORE = -100
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's
CALLS = collections.Counter()  # replacement -> times called since import (patch() watches it)
log = logging.getLogger("ppo_fast.integrations.trl")


# ----------------------------------------------------------------------------- per-token helpers
def _k_index_logprobs(logits, index, temperature):
    """log-probs of K ids per position: one pass for the first id (the kernel's lse, through
    autograd), the others from lse = x_first - logp_first and a gather."""
    first = ops.logprobs_from_logits(logits, index[..., 0].contiguous(), temperature=temperature)
    x = logits.gather(-1, index).float() / temperature
    lse = x[..., :1] - first.unsqueeze(-1)
    return x - lse


def selective_log_softmax(logits, index, temperature: float = 1.0, row_mask=None):
    """trl.trainer.utils.selective_log_softmax: log_softmax(logits / temperature) gathered at `index`
    ([...] ids, or [..., K] for K ids per position), in the logits' dtype (TRL's convention; computed
    in fp32, float64 logits in float64); positions where row_mask == 0 give 0."""
    CALLS["selective_log_softmax"] += 1
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if logits.dtype == torch.float64:  # asked for in float64: the reference, in float64
        logp_all = torch.log_softmax(logits / temperature, dim=-1)
        out = logp_all.gather(-1, index if index.dim() == logits.dim() else index.unsqueeze(-1))
        out = out if index.dim() == logits.dim() else out.squeeze(-1)
    elif index.dim() == logits.dim():
        out = _k_index_logprobs(logits, index, temperature)
    else:
        out = ops.logprobs_from_logits(logits, index, temperature=temperature)
    if row_mask is not None:
        out = out.masked_fill(row_mask == 0, 0.0)
    return out.to(logits.dtype)


def entropy_from_logits(logits, chunk_size: int = 128):
    """trl.trainer.utils.entropy_from_logits: the entropy of softmax(logits), in the logits' dtype
    (chunk_size: one pass needs no chunks)."""
    CALLS["entropy_from_logits"] += 1
    if logits.dtype == torch.float64:
        return reference.entropy_from_logits(logits)
    return ops.entropy_from_logits(logits).to(logits.dtype)


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad: bool = True, temperature: float = 1.0,
                                      row_mask=None):
    """trl.trainer.utils.selective_log_softmax_and_entropy: (log-probs of `index`, entropy) in one pass,
    in the logits' dtype; the entropy detached unless entropy_requires_grad."""
    CALLS["selective_log_softmax_and_entropy"] += 1
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if logits.dtype == torch.float64 or index.dim() == logits.dim():
        logp = selective_log_softmax(logits, index, temperature, row_mask)
        entropy = entropy_from_logits(logits / temperature)
    else:
        labels = index if row_mask is None else index.masked_fill(row_mask == 0, IGNORE)
        logp, entropy = ops.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    entropy = entropy if entropy_requires_grad else entropy.detach()
    return logp.to(logits.dtype), entropy.to(logits.dtype)


def kernels_selective_log_softmax_and_entropy(logits, index, temperature: float = 1.0, row_mask=None):
    """trl.kernels.selective_log_softmax_and_entropy (TRL's fused kernel, a different signature from
    trl.trainer.utils's: temperature third, the entropy always differentiable)."""
    return selective_log_softmax_and_entropy(logits, index, True, temperature, row_mask)


# ----------------------------------------------------------------------------- the fused LM head
class _Capture(threading.local):
    """While active, ChunkedLogProbFunction records its inputs instead of scoring them (the loss door
    takes the hidden states the model's forward produced)."""

    def __init__(self):
        self.active, self.calls = False, []


_capture = _Capture()


@contextlib.contextmanager
def capturing_lm_head():
    """The calls the model's fused LM head makes inside the block, recorded, not scored (ours is put
    in TRL's module for the block when patch() has not installed it)."""
    import trl.trainer.utils as trl_utils

    theirs = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = ChunkedLogProbFunction
    _capture.active, _capture.calls = True, []
    try:
        yield _capture.calls
    finally:
        _capture.active = False
        trl_utils._ChunkedLogProbFunction = theirs


class ChunkedLogProbFunction:
    """trl.kernels.ChunkedLogProbFunction's contract on fused_linear_logprobs: apply(hidden [N, H],
    weight [V, H], bias, targets [N], temperature, chunk_size, final_logit_softcapping, logit_scale,
    outputs) -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), float32 (is_top1 bool),
    None for the outputs not asked for; gradients to hidden, weight and bias through log_probs and
    entropy. The GEMM runs in the autocast dtype where autocast is on (TRL's compute dtype); fp32
    inputs get fp32 gradients, accumulated in fp32 (mixed precision inside the op, no cast here).
    chunk_size is TRL's vocabulary tile; ppo_fast chunks rows by its own rule."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=OPTIONAL_OUTPUTS):
        unknown = sorted(set(outputs) - {"log_probs", *OPTIONAL_OUTPUTS})
        if unknown:
            raise unsupported("trl", f"ChunkedLogProbFunction outputs {unknown}", f"expected some of {OPTIONAL_OUTPUTS}")
        if not logit_scale > 0:
            raise unsupported("trl", f"logit_scale={logit_scale}", "ppo_fast takes a logit scale > 0")
        transform = dict(temperature=float(temperature), logit_scale=float(logit_scale),
                         softcap=None if final_logit_softcapping is None else float(final_logit_softcapping))
        if _capture.active:  # the loss door scores these itself: record, and give placeholder log-probs
            _capture.calls.append(dict(hidden=hidden, weight=weight, bias=bias, targets=targets,
                                       compute_dtype=compute_dtype_of(hidden), **transform))
            zeros = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
            return (zeros, zeros if "entropy" in outputs else None, None, None, None)
        CALLS["ChunkedLogProbFunction"] += 1
        want_stats = any(name in outputs for name in OPTIONAL_OUTPUTS[1:])
        # the op runs its GEMMs in autocast's dtype where it is on and keeps fp32 gradients in fp32
        fn = reference.fused_linear_logprobs if hidden.dtype == torch.float64 else ops.fused_linear_logprobs
        out = fn(hidden, weight, targets, bias=bias, return_entropy=True, return_stats=want_stats, **transform)
        logp, entropy = out[0], out[1]
        stats = out[2] if want_stats else {}
        return (logp, entropy if "entropy" in outputs else None,
                stats.get("log_sum_sq_probs") if "log_sum_sq_probs" in outputs else None,
                stats.get("mean_logit") if "mean_logits" in outputs else None,
                stats.get("is_top1") if "is_top1" in outputs else None)


# ----------------------------------------------------------------------------- GRPOTrainer's loss
def _refuse_unsupported(trainer, inputs) -> None:
    """A GRPOTrainer option the fused loss cannot follow is refused, never computed differently."""
    args = trainer.args
    grpo_loss_types.check("trl", trainer.loss_type)
    checks = [
        (trainer.loss_type == "vespo" and _token_masks_on(trainer),
         "top_entropy_quantile / off_policy_mask_threshold with loss_type='vespo'",
         "vespo takes the importance ratios itself; the masks would have to multiply its loss apart from them"),
        (getattr(trainer, "aux_loss_enabled", False), "router auxiliary loss (MoE)", ""),
        (any(inputs.get(k) is not None for k in ("pixel_values", "image_grid_thw", "token_type_ids")),
         "multimodal inputs", "text only"),
    ]
    for bad, option, why in checks:
        if bad:
            raise unsupported("trl", option, why)


def _aggregation(trainer, mask, inputs, train: bool) -> dict:
    """TRL's loss normalisation per loss_type, the gradient-accumulation divisor included (dapo and
    cispo: num_items_in_batch per process, rescaled to one accumulation window in training)."""
    def token_count():
        normalizer = max(float(inputs["num_items_in_batch"]), 1.0) / trainer.accelerator.num_processes
        if train:
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return normalizer

    return grpo_loss_types.aggregation(trainer.loss_type, mask, max_completion_length=trainer.max_completion_length,
                                       token_count=token_count,
                                       accumulation=trainer.current_gradient_accumulation_steps if train else 1.0)


VESPO_PARAMS = ("k_pos", "lambda_pos", "k_neg", "lambda_neg")


def _objective(trainer) -> dict:
    args = trainer.args
    return grpo_loss_types.objective(trainer.loss_type, trainer.importance_sampling_level, trainer.epsilon_low,
                                     trainer.epsilon_high, args.delta, args.sapo_temperature_pos,
                                     args.sapo_temperature_neg,
                                     {key: getattr(args, f"vespo_{key}") for key in VESPO_PARAMS})


def completion_hidden_states(model, input_ids, attention_mask, logits_to_keep):
    """(hidden [B, L, H] of the positions that predict the completion, lm_head weight, bias, transform
    and the compute dtype the head ran in: autocast's inside the model's forward) from the model's own
    fused-head forward (so wrappers such as DDP see a normal forward)."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :-logits_to_keep] = IGNORE
    with capturing_lm_head() as calls:
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    if len(calls) != 1:
        raise unsupported("trl", "the model's fused LM head", f"expected one scoring call, saw {len(calls)}")
    got = calls[0]
    rows, (B, T) = got["hidden"], input_ids.shape
    scored = labels[:, 1:] != IGNORE
    if rows.shape[0] == scored.numel():  # every position was scored (no Triton device)
        hidden = rows.view(B, T - 1, rows.shape[-1])
    else:  # only the scored positions (compact)
        hidden = rows.new_zeros(B, T - 1, rows.shape[-1]).index_put((*scored.nonzero(as_tuple=True),), rows)
    transform = {k: got[k] for k in ("temperature", "logit_scale", "softcap", "compute_dtype")}
    return hidden[:, -logits_to_keep:], got["weight"], got["bias"], transform


def grpo_compute_loss(trainer, model, inputs):
    """GRPOTrainer._compute_loss on fused_linear_ppo_loss: the completion's hidden states and the LM
    head go into one op (its gradient formed in the forward for the compiled objectives, no [B, L, V]
    logits), with TRL's loss_type normalisation, importance_sampling_level, epsilon_low/high, delta
    (the dual clip, or clip_delta below 1 + epsilon_high), beta (TRL's k3 KL to the reference: k3_raw;
    use_bias_correction_kl, TRL's default, as kl_ratio), and its vLLM importance-sampling correction;
    the metrics TRL's own logs, by its formulas (_log_metrics). Refuses what it cannot follow
    (_refuse_unsupported)."""
    _refuse_unsupported(trainer, inputs)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    L = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    with trainer.accelerator.autocast():
        hidden, weight, bias, transform = completion_hidden_states(model, input_ids, attention_mask, L)
    advantages = inputs["advantages"]
    advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand(mask.shape).float()
    is_weights = inputs.get("importance_sampling_ratio") if (trainer.use_vllm and
                                                             trainer.vllm_importance_sampling_correction) else None
    train = model.training
    labels = completion_ids.masked_fill(completion_mask == 0, IGNORE)
    compute_dtype = transform.pop("compute_dtype")  # the head's GEMMs in TRL's dtype; fp32 masters stay fp32
    loss_terms = dict(ref_log_prob=inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None,
                      kl_coef=float(trainer.beta), kl_estimator="k3_raw", kl_ratio=_kl_ratio(trainer),
                      **_objective(trainer), **_aggregation(trainer, mask, inputs, train))
    with torch.autocast(hidden.device.type, dtype=compute_dtype, enabled=compute_dtype != hidden.dtype):
        if _token_masks_on(trainer) or trainer._entropy_bonus_enabled:
            return _loss_from_token_values(trainer, hidden, weight, bias, labels, transform, inputs, advantages, mask,
                                           is_weights, loss_terms, train)
        loss, stats = ops.fused_linear_ppo_loss(hidden, weight, labels, inputs.get("old_per_token_logps"), advantages,
                                                mask, bias=bias, is_weights=is_weights, return_log_prob=True,
                                                **transform, **loss_terms)
    _log_metrics(trainer, stats, inputs, advantages, mask, is_weights, train)
    return loss


def _token_masks_on(trainer) -> bool:
    """TRL's masks that read the current log-probs or entropies (before the loss can be formed)."""
    return trainer.top_entropy_quantile < 1.0 or getattr(trainer, "off_policy_mask_threshold", None) is not None


def _loss_from_token_values(trainer, hidden, weight, bias, labels, transform, inputs, advantages, mask, is_weights,
                            loss_terms, train: bool):
    """The loss when a term needs the batch's current log-probs or entropies first: TRL's high-entropy
    token mask (top_entropy_quantile < 1: a quantile over every rank's tokens), its off-policy
    sequence mask (off_policy_mask_threshold) and its entropy bonus. The head's kernels give the
    log-probs and entropy [B, T] (differentiable, no [N, V] tensor kept: fused_linear_logprobs), TRL's
    own methods make the masks from them, detached, and the masks weigh the policy term as TRL's do
    (with the vLLM importance ratios; the KL term unmasked); then the loss of those log-probs
    (reference.ppo_loss_of_logprobs: the fused op's generic path) and the bonus by TRL's rule:

        loss -= c_H * sum(H m') / max(sum m', 1) / accumulation,   m' = mask * entropy mask

    c_H TRL's entropy_coef, gated by its adaptive controller (_adaptive_entropy_step). One more GEMM than
    the fused loss (the head's backward recomputes the logits)."""
    logp, entropy = ops.fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **transform)
    old = inputs.get("old_per_token_logps")
    old = logp.detach() if old is None else old
    entropy_mask, policy_weights = None, is_weights
    if trainer.top_entropy_quantile < 1.0:
        entropy_mask = trainer.get_high_entropy_mask(entropy.detach(), mask, 1 - trainer.top_entropy_quantile).float()
        policy_weights = entropy_mask if policy_weights is None else policy_weights * entropy_mask
    if trainer.off_policy_mask_threshold is not None:  # TRL's rule: the sampler's log-probs where it has them
        given = inputs["advantages"]  # [B] or [B, T], as TRL reads it
        kept = trainer.get_off_policy_mask(given.unsqueeze(1) if given.dim() == 1 else given, logp.detach(),
                                           inputs.get("sampling_per_token_logps", old), mask,
                                           trainer.off_policy_mask_threshold).float()
        policy_weights = kept if policy_weights is None else policy_weights * kept
    loss, stats = reference.ppo_loss_of_logprobs(logp, entropy, old, advantages, mask, is_weights=policy_weights,
                                                 **loss_terms)
    stats["log_prob"] = logp.detach()
    if trainer._entropy_bonus_enabled:
        loss = _with_entropy_bonus(trainer, loss, entropy, mask if entropy_mask is None else mask * entropy_mask, train)
    _log_metrics(trainer, stats, inputs, advantages, mask, is_weights, train)
    return loss


def _with_entropy_bonus(trainer, loss, entropy, effective_mask, train: bool):
    """TRL's entropy bonus on top of the loss (see _loss_from_token_values), its policy_loss and
    entropy_coef metrics, and its adaptive controller's step (trainer state, as TRL keeps it)."""
    mode = "train" if train else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    effective_mask = effective_mask.float()
    bonus = (entropy * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
    coef = trainer.entropy_coef
    if trainer.use_adaptive_entropy and trainer._last_world_entropy > trainer.args.entropy_target:
        coef = 0.0  # the controller's gate from the end of the previous optimizer step
    per_step = 1.0 if trainer.loss_type in grpo_loss_types.TOKEN_COUNT_TYPES else accumulation
    policy_loss = loss.detach() * per_step  # TRL logs it before the accumulation divisor
    trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    if trainer.use_adaptive_entropy and train:
        _adaptive_entropy_step(trainer, entropy.detach(), effective_mask)
    if train and trainer.accelerator.sync_gradients:
        trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
    return loss - coef * bonus


def _adaptive_entropy_step(trainer, entropy, effective_mask) -> None:
    """TRL's adaptive entropy controller: the window's token-weighted entropy over every rank, at each
    optimizer step, moves entropy_coef by entropy_coef_delta toward keeping it above entropy_target
    (within [entropy_coef_min, entropy_coef_max])."""
    args = trainer.args
    stats = torch.stack([(entropy * effective_mask).sum(), effective_mask.sum()])
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None


def _kl_ratio(trainer):
    """TRL's use_bias_correction_kl: the KL term times the importance ratio at its level (its default)."""
    if trainer.beta == 0.0 or not getattr(trainer.args, "use_bias_correction_kl", False):
        return None
    return trainer.importance_sampling_level


def _log_metrics(trainer, stats, inputs, advantages, mask, is_weights, train: bool) -> None:
    """The metrics TRL's _compute_loss logs, by TRL's formulas, from the log-probs the op returned:
    kl (weighted as TRL's loss weighs it), entropy, and per loss type the clip ratios (low / high /
    region means, the low min and high max over sequences), cispo_clip_ratio or vespo/phi_seq_mean."""
    from trl.trainer.utils import nanmax, nanmin

    metrics = trainer._metrics["train" if train else "eval"]
    accelerator = trainer.accelerator
    mask = mask.float()
    logp = stats["log_prob"]
    old = inputs.get("old_per_token_logps")
    old = logp if old is None else old
    log_ratio = logp - old
    if trainer.importance_sampling_level == "token":
        coef = torch.exp(log_ratio)
    else:
        coef = torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum()])
        totals = accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if trainer.beta != 0.0:
        ref = inputs["ref_per_token_logps"]
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        metrics["kl"].append(global_masked_mean(kl * coef if _kl_ratio(trainer) else kl))
    n = mask.sum()
    totals = accelerator.reduce(torch.stack([stats["entropy"] * n, n]), reduction="sum")
    metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
    adv = advantages[:, :1] if coef.shape[1] == 1 else advantages
    if trainer.loss_type in grpo_loss_types.CLIP_TYPES:
        if trainer.args.delta is not None:  # TRL's metrics read the ratio after delta's clamp
            coef = torch.clamp(coef, max=trainer.args.delta)
        low = ((coef < 1 - trainer.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + trainer.epsilon_high) & (adv > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(accelerator.gather(masked_seq_mean(high))).item())
    elif trainer.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_masked_mean(((coef > trainer.epsilon_high) & (adv > 0)).float()))
    elif trainer.loss_type == "vespo":
        phi = objectives.vespo_weights(logp, old, advantages, mask, is_weights,
                                       *(float(getattr(trainer.args, f"vespo_{k}")) for k in VESPO_PARAMS))
        metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi[:, :1]))


# ----------------------------------------------------------------------------- patch
HELPERS = {"selective_log_softmax": selective_log_softmax, "entropy_from_logits": entropy_from_logits,
           "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy}
# TRL has two functions of that last name: trl.trainer.utils's (entropy_requires_grad third) and
# trl.kernels's (temperature third). Each replacement takes the signature of what it replaces,
# read off the original, so a positional argument keeps its meaning.
SIGNATURE_TWINS = {"selective_log_softmax_and_entropy": (kernels_selective_log_softmax_and_entropy,)}


def _replacement_for(name: str, theirs):
    """The replacement whose parameters (names, order, defaults) are theirs; None if none is."""
    import inspect

    want = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
    for ours in (HELPERS[name], *SIGNATURE_TWINS.get(name, ())):
        if [(p.name, p.default) for p in inspect.signature(ours).parameters.values()] == want:
            return ours
    return None
_REPLACEMENTS = (*HELPERS.values(), *(f for twins in SIGNATURE_TWINS.values() for f in twins))
_ORIGINALS = {}  # (object, attribute) -> what patch() replaced there, for unpatch()
_watched = set()


def _replace(owner, attr: str, ours, label: str, replaced: list) -> None:
    theirs = getattr(owner, attr, None)
    if theirs is not None and theirs is not ours:
        _ORIGINALS.setdefault((owner, attr), theirs)
        setattr(owner, attr, ours)
        replaced.append(label)


def patch(loss: bool = False) -> list:
    """Install ppo_fast into the loaded TRL: trl.trainer.utils._ChunkedLogProbFunction (the fused LM
    head of TRL 1.16's trainers) -> ChunkedLogProbFunction, the per-token helpers in every loaded TRL
    module that has them, and with loss=True GRPOTrainer._compute_loss -> grpo_compute_loss. Returns
    the names replaced ("module.name"), logged at INFO; trainers that then finish a training step
    without calling any of them get a warning. Calling it again replaces nothing more."""
    import trl.trainer.utils as trl_utils  # TRL must be importable

    replaced = []
    _replace(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction,
             "trl.trainer.utils._ChunkedLogProbFunction", replaced)
    for name, module in list(sys.modules.items()):
        if not name.startswith("trl") or module is None:
            continue
        for fn_name in HELPERS:
            theirs = getattr(module, fn_name, None)
            if not callable(theirs) or theirs in _REPLACEMENTS:
                continue
            ours = _replacement_for(fn_name, theirs)
            if ours is None:  # a TRL whose helper changed its signature: left alone, said once
                log.warning("ppo_fast did not replace %s.%s: its signature is not one ppo_fast follows", name, fn_name)
                continue
            _replace(module, fn_name, ours, f"{name}.{fn_name}", replaced)
    if loss:
        from trl import GRPOTrainer

        _replace(GRPOTrainer, "_compute_loss", _grpo_method, "trl.GRPOTrainer._compute_loss", replaced)
    _watch_training_steps()
    for name in replaced:
        log.info("ppo_fast replaced %s", name)
    return replaced


def unpatch() -> None:
    """Put back everything patch() replaced."""
    for (owner, attr), theirs in _ORIGINALS.items():
        setattr(owner, attr, theirs)
    _ORIGINALS.clear()


def _grpo_method(self, model, inputs):
    CALLS["grpo_compute_loss"] += 1
    return grpo_compute_loss(self, model, inputs)


def _is_trls(trainer_class) -> bool:
    """A TRL trainer (or a user's subclass of one): the only trainers patch() speaks to."""
    return any(c.__module__.startswith("trl.") for c in trainer_class.__mro__)


def _watch_training_steps() -> None:
    """After a trainer's first training step, warn if none of the replacements was called."""
    from transformers import Trainer

    if getattr(Trainer.training_step, "_ppo_fast_watch", False):
        return
    original = Trainer.training_step
    _ORIGINALS.setdefault((Trainer, "training_step"), original)

    def training_step(self, *args, **kwargs):
        before = sum(CALLS.values())
        out = original(self, *args, **kwargs)
        if id(self) not in _watched and _is_trls(type(self)):
            _watched.add(id(self))
            if sum(CALLS.values()) == before:
                warnings.warn(f"ppo_fast.integrations.trl.patch(): {type(self).__name__} finished a training step "
                              f"without calling any of ppo_fast's replacements; this TRL computes its log-probs "
                              f"elsewhere, so it runs on its own kernels", RuntimeWarning, stacklevel=2)
        return out

    training_step._ppo_fast_watch = True
    Trainer.training_step = training_step


__all__ = ["CALLS", "ChunkedLogProbFunction", "entropy_from_logits", "grpo_compute_loss",
           "kernels_selective_log_softmax_and_entropy", "patch", "selective_log_softmax",
           "selective_log_softmax_and_entropy", "unpatch"]
