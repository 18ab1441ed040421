"""Fused PPO ops. Each has the signature of its plain-PyTorch twin in `ppo_fast.ops.reference`
and runs on the backend chosen by `ppo_fast.use_backend` / PPO_FAST_BACKEND.

One file per op family, in reading order, with the same names in every file: Triton kernel(s) ->
launchers, gathered in `KERNELS` {backend: launcher, or a NamedTuple of them} -> custom op with its
registered autograd -> `_<op>_on_kernels(..., backend)`, the op on one backend's kernels -> the
public function `<op>`, which validates its inputs and calls its table of implementations
`<OP>` {backend: `_<op>_on_kernels` with that backend bound, "torch": the reference} through
`backend.dispatch`. Four layers from the public function to a kernel: the implementation, the
custom op, the launcher. IMPLEMENTATIONS gathers the tables: {op: {backend: implementation}}. The
row-statistics protocol the losses share is ppo_fast/ops/rows.py.
"""
import importlib

# The functions gae, group_advantages and value_loss shadow their modules' names here on
# purpose (users call ppo_fast.ops.gae(...)); the modules stay importable by full name.
from ppo_fast.ops.dpo import dpo_loss
from ppo_fast.ops.fused_linear import fused_linear_logprobs
from ppo_fast.ops.fused_linear_ppo_loss import fused_linear_ppo_loss
from ppo_fast.ops.gae import gae
from ppo_fast.ops.group_advantages import group_advantages
from ppo_fast.ops.kl import compute_rewards, kl_penalty
from ppo_fast.ops.logprobs import entropy_from_logits, logprobs_from_logits
from ppo_fast.ops.masked import agg_loss, masked_mean, masked_whiten
from ppo_fast.ops.policy_loss import ppo_policy_loss
from ppo_fast.ops.rollout_correction import rollout_correction, rollout_rejection
from ppo_fast.ops.value_loss import value_loss

FAMILIES = ("logprobs", "fused_linear", "fused_linear_ppo_loss", "policy_loss", "value_loss", "kl", "masked", "gae",
            "group_advantages", "dpo", "rollout_correction")
IMPLEMENTATIONS = {op: table for family in FAMILIES
                   for op, table in importlib.import_module(f"ppo_fast.ops.{family}").IMPLEMENTATIONS.items()}

__all__ = [
    "FAMILIES",
    "IMPLEMENTATIONS",
    "agg_loss",
    "compute_rewards",
    "dpo_loss",
    "entropy_from_logits",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "gae",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "rollout_correction",
    "rollout_rejection",
    "value_loss",
]
