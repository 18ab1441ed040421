"""Liger-Kernel's cross-entropy modules (liger_kernel.transformers) computed by ppo_fast.ops, for
users moving from Liger: the loss is -log p of the target, so `reduction="none"` gives -logprobs.

    from ppo_fast.integrations.liger import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
"""
from __future__ import annotations

import torch

from ppo_fast import ops
from ppo_fast.integrations import unsupported

REDUCTIONS = ("mean", "sum", "none")


def _check_options(weight=None, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                   return_z_loss=False, **flags):
    for name, value, default in (("weight", weight, None), ("lse_square_scale", lse_square_scale, 0.0),
                                 ("label_smoothing", label_smoothing, 0.0), ("softcap", softcap, None),
                                 ("return_z_loss", return_z_loss, False)):
        if isinstance(value, torch.Tensor) or value != default:
            raise unsupported("liger", f"{name}={value!r}", "ppo_fast computes the plain cross-entropy")
    for name, value in flags.items():
        if value not in (None, False):
            raise unsupported("liger", f"{name}={value!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def _reduce(nll, target, ignore_index, reduction):
    if reduction == "none":
        return nll
    total = nll.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum().clamp(min=1)


class LigerCrossEntropyLoss(torch.nn.Module):
    """forward(_input [N, V], target [N]) -> -log softmax(_input)[target], reduced; ignore_index -> 0."""

    def __init__(self, weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap=None, return_z_loss: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False):
        super().__init__()
        _check_options(weight, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
                       return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, _input, target):
        nll = -ops.logprobs_from_logits(_input, target, ignore_index=self.ignore_index)
        return _reduce(nll, target, self.ignore_index, self.reduction)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """forward(lin_weight [V, H], _input [N, H], target [N], bias=None): the same from hidden states,
    never holding the [N, V] logits."""

    def __init__(self, ce_weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap=None, return_z_loss: bool = False,
                 accum_dtype=None, use_token_scaling: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False):
        super().__init__()
        _check_options(ce_weight, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
                       use_token_scaling=use_token_scaling, return_token_accuracy=return_token_accuracy,
                       return_predicted_tokens=return_predicted_tokens)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        nll = -ops.fused_linear_logprobs(_input, lin_weight, target, bias=bias, ignore_index=self.ignore_index)
        return _reduce(nll, target, self.ignore_index, self.reduction)
