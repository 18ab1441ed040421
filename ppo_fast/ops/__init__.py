"""Fused PPO ops. Each has the signature of its plain-PyTorch twin in `ppo_fast.reference`
and runs on the backend chosen by `ppo_fast.use_backend` / PPO_FAST_BACKEND."""
from ppo_fast.ops.advantages import gae, group_advantages
from ppo_fast.ops.fused_linear import fused_linear_logprobs
from ppo_fast.ops.kl import compute_rewards, kl_penalty
from ppo_fast.ops.logprobs import entropy_from_logits, logprobs_from_logits
from ppo_fast.ops.masked import agg_loss, masked_mean, masked_whiten
from ppo_fast.ops.policy_loss import ppo_policy_loss
from ppo_fast.ops.value_loss import value_loss

__all__ = [
    "agg_loss",
    "compute_rewards",
    "entropy_from_logits",
    "fused_linear_logprobs",
    "gae",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "value_loss",
]
