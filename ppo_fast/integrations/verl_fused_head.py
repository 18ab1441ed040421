"""Importing this module makes verl's fused LM head ppo_fast's (ppo_fast.integrations.verl.use_fused_head):
verl's external_lib switch runs it in every worker process,

    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.external_lib=ppo_fast.integrations.verl_fused_head
"""
from ppo_fast.integrations.verl import use_fused_head

use_fused_head()
