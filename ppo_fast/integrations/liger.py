"""Liger-Kernel's modules computed by ppo_fast.ops, for users moving from Liger: the cross-entropy
modules (liger_kernel.transformers; the loss is -log p of the target, so `reduction="none"` gives
-logprobs) and the fused linear GRPO loss (liger_kernel.chunked_loss).

    from ppo_fast.integrations.liger import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    from ppo_fast.integrations.liger import LigerFusedLinearGRPOLoss
"""
from __future__ import annotations

import torch

from ppo_fast import ops
from ppo_fast.integrations import grpo_loss_types, unsupported

REDUCTIONS = ("mean", "sum", "none")


def _check_options(weight=None, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                   return_z_loss=False, **flags):
    for name, value, default in (("weight", weight, None), ("lse_square_scale", lse_square_scale, 0.0),
                                 ("label_smoothing", label_smoothing, 0.0), ("return_z_loss", return_z_loss, False)):
        if isinstance(value, torch.Tensor) or value != default:
            raise unsupported("liger", f"{name}={value!r}", "ppo_fast computes the plain cross-entropy")
    for name, value in flags.items():
        if value not in (None, False):
            raise unsupported("liger", f"{name}={value!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected None or a number > 0, got {softcap!r}")
    return None if softcap is None else float(softcap)


def _reduce(nll, target, ignore_index, reduction):
    if reduction == "none":
        return nll
    total = nll.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum().clamp(min=1)


class LigerCrossEntropyLoss(torch.nn.Module):
    """forward(_input [N, V], target [N]) -> -log softmax(x)[target], reduced (ignore_index -> 0); x the
    logits, or softcap tanh(logits / softcap) with softcap."""

    def __init__(self, weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap=None, return_z_loss: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False):
        super().__init__()
        self.softcap = _check_options(weight, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
                                      return_token_accuracy=return_token_accuracy,
                                      return_predicted_tokens=return_predicted_tokens)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, _input, target):
        nll = -ops.logprobs_from_logits(_input, target, ignore_index=self.ignore_index, softcap=self.softcap)
        return _reduce(nll, target, self.ignore_index, self.reduction)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """forward(lin_weight [V, H], _input [N, H], target [N], bias=None): the same from hidden states,
    never holding the [N, V] logits."""

    def __init__(self, ce_weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap=None, return_z_loss: bool = False,
                 accum_dtype=None, use_token_scaling: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False):
        super().__init__()
        self.softcap = _check_options(ce_weight, lse_square_scale, label_smoothing, reduction, softcap,
                                      return_z_loss, use_token_scaling=use_token_scaling,
                                      return_token_accuracy=return_token_accuracy,
                                      return_predicted_tokens=return_predicted_tokens)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        nll = -ops.fused_linear_logprobs(_input, lin_weight, target, bias=bias, ignore_index=self.ignore_index,
                                         softcap=self.softcap)
        return _reduce(nll, target, self.ignore_index, self.reduction)


# ----------------------------------------------------------------------------- fused linear GRPO loss
LUSPO_PADDING = ("Liger's luspo sums its per-token losses over padding positions too once they are per token "
                 "(token level, a KL term or an importance ratio)")


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss (Liger 0.8) on fused_linear_ppo_loss: the same
    constructor and call, forward(_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T],
    attention_mask [B, T], advantages [B], bias, ref_per_token_logps, old_per_token_logps, ref_input,
    ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch) -> (loss, (kl mean if beta, clip fraction)).

    loss_type grpo / sapo (mean over the batch's sequences of their token means), bnpo (over the
    batch's tokens), dr_grpo (over B x max_completion_length), luspo (sequence level: mean of the
    sequences' token sums), dapo / cispo / vespo (over num_items_in_batch, else the batch's tokens); importance_sampling_level token / sequence; epsilon_low / high (cispo:
    epsilon_high is the weight's absolute cap, as Liger and TRL, below 1 too); delta (two-sided
    clipping) as the dual clip where delta >= 1 + epsilon_high, else the objective clip_delta; beta with ref_per_token_logps, or the reference's log-probs from ref_input / ref_weight;
    vllm_is_ratio as the importance weights (the policy term only, before the KL);
    use_bias_correction_kl (the KL times the importance ratio: kl_ratio); use_ref_model=False: the
    KL's reference is the policy itself, detached (Liger's rule), so the KL term and its metric are 0
    whatever reference is passed. chunk_size (sequences per chunk) becomes the fused op's chunk of
    chunk_size x T tokens; compiled (torch.compile of Liger's loss math) has nothing to compile here,
    the kernels being compiled already — neither changes a result, in Liger or here (tested). The
    clip fraction counts the tokens whose clipped term won (Liger's definition) except for cispo,
    where it counts the capped weights of either advantage sign (Liger: positive ones only). Refused:
    luspo at token level, with beta or with vllm_is_ratio (Liger sums it over padding positions then)."""

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length=None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta=None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0):
        super().__init__()
        if sapo_temperature_pos <= 0 or sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_pos / neg must be positive, got {sapo_temperature_pos}, "
                             f"{sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}")
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'")
        grpo_loss_types.check("liger", loss_type)
        if loss_type == "luspo" and importance_sampling_level == "token":
            raise unsupported("liger", "loss_type='luspo' at importance_sampling_level='token'", LUSPO_PADDING)
        if loss_type == "luspo" and beta != 0.0:
            raise unsupported("liger", "luspo with beta != 0", LUSPO_PADDING)
        self.vespo = dict(k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        self.beta, self.use_ref_model, self.loss_type = beta, use_ref_model, loss_type
        self.epsilon_low, self.epsilon_high, self.delta = epsilon_low, epsilon_high, delta
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.use_bias_correction_kl = temperature, use_bias_correction_kl
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size: expected an int >= 1 (sequences per chunk), got {chunk_size!r}")
        self.chunk_size, self.compiled = chunk_size, compiled

    def _objective(self) -> dict:
        return grpo_loss_types.objective(self.loss_type, self.importance_sampling_level, self.epsilon_low,
                                         self.epsilon_high, self.delta, self.sapo_temperature_pos,
                                         self.sapo_temperature_neg, self.vespo)

    def _aggregation(self, mask, num_items_in_batch) -> dict:
        def token_count():  # num_items_in_batch (else every rank's valid tokens) per rank, as Liger
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            total = num_items_in_batch
            if total is None:
                total = mask.sum().float()
                if distributed:
                    torch.distributed.all_reduce(total)
            return max(float(total) / (torch.distributed.get_world_size() if distributed else 1), 1.0)

        return grpo_loss_types.aggregation(self.loss_type, mask, max_completion_length=self.max_completion_length,
                                           token_count=token_count)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        mask = attention_mask.bool()
        with_kl = self.beta != 0.0 and self.use_ref_model  # without a reference model: KL to sg[policy] = 0
        if with_kl and ref_per_token_logps is None:
            if ref_input is None or ref_weight is None:
                raise ValueError("If use_ref_model is True, ref_per_token_logps or ref_input must be provided")
            with torch.no_grad():
                ref_per_token_logps = ops.fused_linear_logprobs(ref_input, ref_weight, selected_token_ids,
                                                                bias=ref_bias, temperature=self.temperature)
        if vllm_is_ratio is not None and self.loss_type == "luspo":
            raise unsupported("liger", "luspo with vllm_is_ratio", LUSPO_PADDING)
        if vllm_is_ratio is not None and vllm_is_ratio.dim() == 1:
            vllm_is_ratio = vllm_is_ratio.unsqueeze(-1)
        loss, stats = ops.fused_linear_ppo_loss(
            _input, lin_weight, selected_token_ids, old_per_token_logps, advantages[:, None].expand(mask.shape).float(),
            mask, bias=bias, temperature=self.temperature, ref_log_prob=ref_per_token_logps if with_kl else None,
            kl_coef=float(self.beta) if with_kl else 0.0, kl_estimator="k3_raw",
            kl_ratio=self.importance_sampling_level if with_kl and self.use_bias_correction_kl else None,
            is_weights=vllm_is_ratio, chunk_size=self.chunk_size * max(mask.shape[1], 1), **self._objective(),
            **self._aggregation(mask, num_items_in_batch))
        clip_fraction = torch.zeros_like(stats["clipfrac"]) if self.loss_type == "sapo" else stats["clipfrac"]
        kl = stats["kl"] if with_kl else torch.zeros_like(stats["clipfrac"])
        return loss, ((kl,) if self.beta != 0.0 else ()) + (clip_fraction,)
