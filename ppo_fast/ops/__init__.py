"""Fused PPO ops. Each has the signature of its plain-PyTorch twin in `ppo_fast.reference`
and runs on the backend chosen by `ppo_fast.use_backend` / PPO_FAST_BACKEND."""
from ppo_fast.ops.logprobs import entropy_from_logits, logprobs_from_logits

__all__ = ["entropy_from_logits", "logprobs_from_logits"]
