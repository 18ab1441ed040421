"""DPO loss over sequence log-probs: a number per pair, so plain torch on every backend (the
reference is the implementation). The sequence log-probs come from `fused_linear_logprobs`
summed over response tokens, so RL (PPO, GRPO) and direct preference optimisation can be
compared on the same model and the same kernels."""
from __future__ import annotations

from ppo_fast.ops import reference
from ppo_fast.ops.backend import dispatch
from ppo_fast.ops.checks import require_float, require_nonnegative, require_positive, require_same_device, require_shape

DPO_LOSS = {"torch": reference.dpo_loss}  # the reference only: runs under any backend
IMPLEMENTATIONS = {"dpo_loss": DPO_LOSS}


def dpo_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, beta=0.1, *,
             label_smoothing=0.0):
    """(loss, stats) of DPO over [B] pairs (see ppo_fast.ops.reference.dpo_loss); gradients flow
    to the policy's log-probs only."""
    named = {"policy_chosen_logp": policy_chosen_logp, "policy_rejected_logp": policy_rejected_logp,
             "ref_chosen_logp": ref_chosen_logp, "ref_rejected_logp": ref_rejected_logp}
    for name, x in named.items():
        require_float(name, x)
        if x.dim() != 1:
            raise ValueError(f"{name}: expected a [B] tensor of sequence log-probs, got shape {tuple(x.shape)}")
        require_shape(name, x, policy_chosen_logp.shape, "the shape of policy_chosen_logp")
    require_same_device(**named)
    beta = require_positive("beta", beta)
    label_smoothing = require_nonnegative("label_smoothing", label_smoothing)
    if label_smoothing >= 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing}")
    return dispatch("dpo_loss", DPO_LOSS, policy_chosen_logp.device, policy_chosen_logp, policy_rejected_logp,
                    ref_chosen_logp, ref_rejected_logp, beta, label_smoothing=label_smoothing)
