"""verl's signatures and return types, computed by ppo_fast.ops (verl 0.9: verl.trainer.ppo.core_algos,
verl.utils.torch_functional, verl.utils.experimental.torch_functional).

    # nothing to call: with ppo_fast installed, `import verl` loads its `verl.plugins` entry point,
    # this module, which registers ppo_fast's loss modes and advantage estimators in verl's
    # registries (in every process: Ray workers too). A verl config then says
    #   actor_rollout_ref.actor.policy_loss.loss_mode=ppo_fast     (or ppo_fast_gspo, ppo_fast_dro, ...)
    #   algorithm.adv_estimator=ppo_fast_grpo                      (or ppo_fast_rloo)
    # (importing ppo_fast.integrations.verl, or register(), does the same by hand).

Conventions that differ from verl's own code are listed in the README ("Drop-in for verl, ...").
"""
from __future__ import annotations

import numpy as np
import torch

from ppo_fast import ops
from ppo_fast.integrations import unsupported

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """verl's agg_loss: all five modes, with its global-batch / dp-size scaling (each rank's loss is
    multiplied by dp_size, since DDP/FSDP average gradients over ranks)."""
    return ops.agg_loss(loss_mat, loss_mask, **_agg_kwargs(loss_mask, loss_agg_mode, dp_size, batch_num_tokens,
                                                           global_batch_size, loss_scale_factor))


def _agg_kwargs(loss_mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None,
                **_unused):
    """verl's aggregation as ppo_fast's (agg, num_tokens, num_seqs): a denominator D over dp_size
    is ppo_fast's num_tokens / num_seqs = D / dp_size."""
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {AGG_MODES}, got {mode!r}")
    if dp_size > 1 and batch_num_tokens is None and mode == "token-mean":
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and global_batch_size is None and mode.startswith("seq-mean"):
        raise ValueError("global_batch_size is required when dp_size > 1")
    if mode == "token-mean":
        return {"agg": "token-mean", "num_tokens": None if batch_num_tokens is None else float(batch_num_tokens) / dp_size}
    if mode == "token-sum":  # sum * dp_size = token-mean over 1 / dp_size "tokens"
        return {"agg": "token-mean", "num_tokens": 1.0 / dp_size}
    if mode == "seq-mean-token-mean":
        return {"agg": "seq-mean-token-mean",
                "num_seqs": None if global_batch_size is None else float(global_batch_size) / dp_size}
    n_seqs = None if global_batch_size is None else float(global_batch_size) / dp_size
    if mode == "seq-mean-token-sum-norm":  # further divided by loss_scale_factor (default: the horizon)
        scale = loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1]
        if n_seqs is None:
            n_seqs = float(max(int((loss_mask.sum(-1) > 0).sum()), 1))
        n_seqs *= scale
    return {"agg": "seq-mean-token-sum", "num_seqs": n_seqs}


def _config_get(config, key, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    return getter(key, default) if callable(getter) else getattr(config, key, default)


def _clip_range(config) -> dict:
    """verl's clip_ratio / clip_ratio_low / clip_ratio_high as ppo_fast's clip_low / clip_high."""
    clip = _config_get(config, "clip_ratio", 0.2)
    low, high = _config_get(config, "clip_ratio_low"), _config_get(config, "clip_ratio_high")
    return dict(clip_low=clip if low is None else low, clip_high=clip if high is None else high)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 metrics=("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), objective="clip",
                 aggregation=None, **params):
    """One of verl's policy losses on ppo_policy_loss: (pg_loss, metrics as Python floats, one sync);
    metrics names clipfrac, approx_kl, clipfrac_lower (None: not reported); aggregation, where given,
    replaces verl's loss_agg_mode and global batch info."""
    if config is None:
        raise ValueError("config: verl's policy loss needs the actor config (clip_ratio, clip_ratio_low/high/c)")
    info = dict(_config_get(config, "global_batch_info", None) or {})
    loss, stats = ops.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, objective=objective,
                                      is_weights=rollout_is_weights, **params,
                                      **(aggregation or _agg_kwargs(response_mask, loss_agg_mode, **info)))
    if not metrics:
        return loss, {}
    values = torch.stack([stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]]).tolist()
    return loss, {name: value for name, value in zip(metrics, values) if name is not None}


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                        rollout_is_weights=None):
    """verl's `vanilla` policy loss (dual clip always on, clip_ratio_c default 3): (pg_loss, metrics)
    with metrics actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower as Python floats;
    rollout_is_weights (verl's rollout correction, [B, T]) multiply each token's loss."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        dual_clip=_config_get(config, "clip_ratio_c", 3.0), **_clip_range(config))


compute_policy_loss_vanilla = compute_policy_loss


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's `gspo`: the GSPO-token ratio sg[s] pi_t / sg[pi_t] (ratio_level="sequence-token"), clipped,
    no dual clip; pg_clipfrac_lower is 0."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        ratio_level="sequence-token", **_clip_range(config))


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """verl's `cispo`: -sg[clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)] A log_prob; pg_clipfrac
    counts r != its clamp."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        objective="cispo", **_clip_range(config))


def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's `gpg`: -A log_prob; no metrics (verl returns none)."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        metrics=(), objective="gpg")


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's `sapo`: the soft gate with config.tau_pos / tau_neg, aggregated seq-mean-token-mean
    whatever loss_agg_mode says (as verl does); pg_clipfrac and pg_clipfrac_lower are 0."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                        rollout_is_weights, objective="sapo", tau_pos=float(_config_get(config, "tau_pos", 1.0)),
                        tau_neg=float(_config_get(config, "tau_neg", 1.05)))


def _policy_loss_config(config, key, default):
    """config.policy_loss.<key>, or `default` where it is absent or None (as verl reads them)."""
    value = _config_get(_config_get(config, "policy_loss"), key)
    return default if value is None else value


def compute_policy_loss_dro(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's `dro`: -(A log_prob - dro_beta / 2 (log_prob - old)^2), config.policy_loss.dro_beta > 0;
    metric actor/ppo_kl."""
    beta = _policy_loss_config(config, "dro_beta", None)
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        metrics=(None, "actor/ppo_kl", None), objective="dro", beta=float(beta))


def _dppo(objective):
    def compute(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights, objective=objective, **_clip_range(config),
                            ratio_cap=float(_config_get(config, "clip_ratio_c", 20.0)))

    compute.__doc__ = (f"verl's `{objective}`: clip_ratio_low / high are the divergence bounds, clip_ratio_c the "
                       f"truncation of the detached ratio; metrics as verl's.")
    return compute


compute_policy_loss_dppo_tv, compute_policy_loss_dppo_kl = _dppo("dppo_tv"), _dppo("dppo_kl")


def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's `geo_mean` (GMPO): the mean over the micro-batch's sequences whatever loss_agg_mode says
    (as verl); rollout_is_weights enter as each row's geometric mean."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        objective="geo_mean", **_clip_range(config),
                        aggregation=dict(agg="seq-mean-token-sum", num_seqs=float(response_mask.shape[0])))


def compute_policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's `clip_cov`: policy_loss.clip_cov_ratio / clip_cov_lb / clip_cov_ub; the same random cut as
    verl's under the same torch seed; metrics actor/pg_clipfrac, actor/ppo_kl."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                        metrics=("actor/pg_clipfrac", "actor/ppo_kl", None), objective="clip_cov",
                        **_clip_range(config), cov_ratio=float(_policy_loss_config(config, "clip_cov_ratio", 0.0002)),
                        cov_lower=float(_policy_loss_config(config, "clip_cov_lb", 1.0)),
                        cov_upper=float(_policy_loss_config(config, "clip_cov_ub", 5.0)))


def compute_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                               config=None, rollout_is_weights=None):
    """verl's `kl_cov`: policy_loss.kl_cov_ratio / ppo_kl_coef; metric actor/ppo_kl = mean |log-ratio|
    (verl's, for this loss)."""
    loss, _ = _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                           rollout_is_weights, metrics=(), objective="kl_cov",
                           cov_ratio=float(_policy_loss_config(config, "kl_cov_ratio", 0.0002)),
                           kl_coef=float(_policy_loss_config(config, "ppo_kl_coef", 1.0)))
    abs_kl = ops.masked_mean((log_prob - old_log_prob).detach().abs(), response_mask)
    return loss, {"actor/ppo_kl": abs_kl.item()}


def compute_policy_loss_bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
    """verl's `bypass_mode` (the trainer passes the rollout's log-probs as old_log_prob): verl's own
    rollout correction from config.policy_loss.rollout_correction — importance weights pi / pi_rollout
    of the current log-probs (rollout_is token / sequence, rollout_is_threshold TIS or IcePop,
    rollout_is_batch_normalize), the rejection mask (rollout_rs, rollout_rs_threshold) and its
    rollout_corr/* diagnostics, by verl's rollout_corr_helper as verl's bypass_mode calls it (the
    trainer's side, not the loss's) — then ppo_fast's loss on the tokens kept: loss_type ppo_clip,
    the `vanilla` loss against the rollout policy without the weights (its clip is the correction);
    reinforce, -w A log_prob (objective gpg with the weights), metric actor/ppo_kl. rollout_is_weights
    given by the caller are ignored, as verl ignores them here."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    correction = _policy_loss_config(config, "rollout_correction", None)
    if correction is None:
        raise ValueError("rollout_correction config not found in policy_loss. When using loss_mode='bypass_mode', "
                         "ensure rollout_correction config is passed.")
    loss_type = _config_get(correction, "loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    with torch.no_grad():
        weights, kept_mask, correction_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob, rollout_log_prob=old_log_prob, response_mask=response_mask,
            rollout_is=_config_get(correction, "rollout_is"),
            rollout_is_threshold=_config_get(correction, "rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=_config_get(correction, "rollout_is_batch_normalize", False),
            rollout_rs=_config_get(correction, "rollout_rs"),
            rollout_rs_threshold=_config_get(correction, "rollout_rs_threshold"))
    if loss_type == "reinforce":
        weights = weights.batch["rollout_is_weights"] if weights is not None else None
        loss, metrics = _policy_loss(old_log_prob, log_prob, advantages, kept_mask, loss_agg_mode, config, weights,
                                     metrics=(None, "actor/ppo_kl", None), objective="gpg")
    else:
        loss, metrics = compute_policy_loss(old_log_prob, log_prob, advantages, kept_mask, loss_agg_mode, config)
    return loss, {**metrics, **correction_metrics}


# loss_mode -> verl policy loss, as register() adds them to verl's registry
POLICY_LOSSES = {"ppo_fast": compute_policy_loss, "ppo_fast_gspo": compute_policy_loss_gspo,
                 "ppo_fast_cispo": compute_policy_loss_cispo, "ppo_fast_gpg": compute_policy_loss_gpg,
                 "ppo_fast_sapo": compute_policy_loss_sapo, "ppo_fast_dro": compute_policy_loss_dro,
                 "ppo_fast_dppo_tv": compute_policy_loss_dppo_tv, "ppo_fast_dppo_kl": compute_policy_loss_dppo_kl,
                 "ppo_fast_geo_mean": compute_policy_loss_geo_mean, "ppo_fast_clip_cov": compute_policy_loss_clip_cov,
                 "ppo_fast_kl_cov": compute_policy_loss_kl_cov, "ppo_fast_bypass_mode": compute_policy_loss_bypass_mode}


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", dp_size=1,
                       batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's clipped value loss: (vf_loss, vf_clipfrac tensor)."""
    return ops.value_loss(vpreds, values, returns, response_mask, clip=cliprange_value,
                          **_agg_kwargs(response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                                        loss_scale_factor))


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's estimators by name: kl/k1, abs, mse/k2, low_var_kl/k3, each optionally with '+'."""
    if kl_penalty.rstrip("+") == "full":
        raise unsupported("verl", "kl_penalty='full'", "it needs the full distributions, not token log-probs")
    return ops.kl_penalty(logprob, ref_logprob, estimator=kl_penalty)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: (whitened advantages, returns = unwhitened advantages + values)."""
    advantages, _ = ops.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
    returns = advantages + values  # verl adds the raw values at every position, masked ones included
    return ops.masked_whiten(advantages, response_mask), returns


def _grouped_outcome_advantage(token_level_rewards, response_mask, index, mode):
    """verl's outcome advantages for samples grouped by `index` (one id per sample): the groups are
    gathered, given ppo_fast's group_advantages, and put back in the samples' order."""
    ids = np.asarray(index)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise unsupported("verl", "groups of one sample", "verl gives them score / (1 + epsilon), ppo_fast 0")
    order = torch.as_tensor(np.argsort(inverse, kind="stable"), device=token_level_rewards.device)
    scores = token_level_rewards.sum(-1)
    grouped = ops.group_advantages(scores[order], counts.tolist(), mode=mode)  # groups of any sizes
    advantages = torch.empty_like(grouped).index_copy_(0, order, grouped)
    advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    if epsilon != 1e-6:
        raise unsupported("verl", f"epsilon={epsilon}", "ppo_fast's GRPO divides by std + 1e-6")
    return _grouped_outcome_advantage(token_level_rewards, response_mask, index,
                                      "grpo" if norm_adv_by_std_in_grpo else "none")


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None):
    return _grouped_outcome_advantage(token_level_rewards, response_mask, index, "rloo")


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl.utils.torch_functional.logprobs_from_logits (the gradient is never written in place)."""
    return ops.logprobs_from_logits(logits, labels)


def entropy_from_logits(logits):
    return ops.entropy_from_logits(logits)


def _whole(weight):
    """The LM head's weight whole: an FSDP2 / tensor-parallel DTensor is gathered once per call
    (full_tensor: an all-gather whose backward reduce-scatters the gradient back to the shards)."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class FusedLinearForPPO(torch.nn.Module):
    """verl.utils.experimental.torch_functional.FusedLinearForPPO: (log_probs, entropy) of
    input_ids from hidden states and the LM head, never holding the logits. impl_backend "torch" and
    "liger" (verl's two implementations, the same values) both run ppo_fast's kernels; another name is
    refused, as verl refuses it. chunk_size: rows per chunk. A DTensor weight (FSDP2-sharded) is
    gathered once per call."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return ops.fused_linear_logprobs(hidden_states, _whole(vocab_weights), input_ids.to(torch.int64),
                                         temperature=float(temperature), return_entropy=True,
                                         chunk_size=self.chunk_size)


def use_fused_head() -> None:
    """Make verl's fused LM head ppo_fast's in this process: verl's models, with
    actor_rollout_ref.model.use_fused_kernels=True and fused_kernel_options.impl_backend torch or liger,
    build verl.utils.experimental.torch_functional.FusedLinearForPPO at each forward; it becomes
    FusedLinearForPPO above. In verl's Ray workers, through verl's own switch:
    actor_rollout_ref.model.external_lib=ppo_fast.integrations.verl_fused_head (that module calls this).
    The triton impl_backend (verl's linear_cross_entropy kernel) is left as it is."""
    import verl.utils.experimental.torch_functional as verl_experimental

    verl_experimental.FusedLinearForPPO = FusedLinearForPPO


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl.utils.kernel.linear_cross_entropy (its Triton fused head): (log_probs, entropy) of labels from
    hidden [..., H] and weight [V, H], flattened to [N] as verl returns them; reduction "none" (per
    token), "sum" or "mean" (over the N tokens) of the log-probs, the entropy always per token; both
    differentiable. A DTensor weight is gathered once per call. dist_process_group: verl's
    vocabulary-parallel head, weight this rank's rows (ppo_fast's tp_group)."""
    if not isinstance(temperature, float):
        raise TypeError(f"temperature: expected a float (as verl asserts), got {type(temperature).__name__}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    weight = weight if dist_process_group is not None else _whole(weight)  # a vocabulary shard stays one
    logp, entropy = ops.fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight,
                                              labels.reshape(-1).to(torch.int64), temperature=temperature,
                                              return_entropy=True, tp_group=dist_process_group)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


def register() -> None:
    """Make ppo_fast's implementations nameable in verl configs: the policy losses of POLICY_LOSSES
    (actor.policy_loss.loss_mode: ppo_fast, ppo_fast_gspo, ppo_fast_cispo, ppo_fast_gpg, ppo_fast_sapo,
    ppo_fast_dro, ppo_fast_dppo_tv, ppo_fast_dppo_kl, ppo_fast_geo_mean, ppo_fast_clip_cov,
    ppo_fast_kl_cov, ppo_fast_bypass_mode; each takes verl's rollout_is_weights) and the advantage estimators
    "ppo_fast_grpo", "ppo_fast_rloo" (verl must be importable; its GAE has a path of its own, with
    the values, so use compute_gae_advantage_return directly)."""
    from verl.trainer.ppo import core_algos

    for name, fn in POLICY_LOSSES.items():
        core_algos.POLICY_LOSS_REGISTRY.setdefault(name, fn)
    core_algos.ADV_ESTIMATOR_REGISTRY.setdefault("ppo_fast_grpo", _registered_grpo)
    core_algos.ADV_ESTIMATOR_REGISTRY.setdefault("ppo_fast_rloo", _registered_rloo)


def _tensor_parallel_group(tp_group):
    """The group given, else Megatron's tensor-parallel group (as verl's own functions read it)."""
    if tp_group is not None:
        return tp_group
    try:
        from megatron.core import parallel_state as mpu
    except ImportError:
        raise unsupported("verl", "vocab_parallel_* without megatron.core",
                          "install megatron-core, or pass tp_group=<the tensor-parallel process group>") from None
    return mpu.get_tensor_model_parallel_group()


def vocab_parallel_log_probs_from_logits(logits, labels, tp_group=None):
    """verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits: log-probs of global
    labels from this rank's vocabulary shard of the logits [..., V / tp] (Megatron's tensor-parallel
    group, or tp_group), on ppo_fast's vocabulary-parallel head."""
    return ops.logprobs_from_logits(logits, labels, tp_group=_tensor_parallel_group(tp_group))


def vocab_parallel_entropy(vocab_parallel_logits, tp_group=None):
    """verl.utils.megatron.tensor_parallel.vocab_parallel_entropy: the entropy of rows whose logits are
    split over the tensor-parallel group, [N, V / tp] -> [N]."""
    return ops.entropy_from_logits(vocab_parallel_logits, tp_group=_tensor_parallel_group(tp_group))


def _register_if_verl_is_here() -> None:
    """Importing this module registers ppo_fast's loss modes and estimators in verl (so verl's
    `external_lib=ppo_fast.integrations.verl` and the `verl.plugins` entry point both work, in
    every process that imports verl, Ray workers included); nothing where verl is not installed."""
    import importlib.util
    import logging

    if importlib.util.find_spec("verl") is None:
        return
    try:
        register()
    except ImportError as err:  # verl present but its core_algos does not import here
        logging.getLogger(__name__).warning("ppo_fast: verl is installed but its core_algos does not import (%s); "
                                            "ppo_fast's loss modes are not registered", err)


def _registered_grpo(token_level_rewards, response_mask, index, config=None, **_unused):
    norm = _config_get(config, "norm_adv_by_std_in_grpo", True)
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, norm_adv_by_std_in_grpo=norm)


def _registered_rloo(token_level_rewards, response_mask, index, config=None, **_unused):
    return compute_rloo_outcome_advantage(token_level_rewards, response_mask, index)


_register_if_verl_is_here()
