"""Group-relative advantages for the critic-free variants (GRPO, RLOO): a handful of numbers
per prompt, so plain torch on every backend (the reference is the implementation)."""
from __future__ import annotations

from ppo_fast.ops import reference
from ppo_fast.ops.backend import dispatch
from ppo_fast.ops.checks import require_choice, require_float

GROUP_MODES = reference.GROUP_MODES
GROUP_ADVANTAGES = {"torch": reference.group_advantages}  # the reference only: runs under any backend
IMPLEMENTATIONS = {"group_advantages": GROUP_ADVANTAGES}


def group_advantages(scores, group_size, *, mode="grpo"):
    """Per-sequence advantages [B] from groups of `group_size` consecutive samples of a prompt:
    grpo, rloo or none (see ppo_fast.ops.reference.group_advantages)."""
    require_float("scores", scores)
    require_choice("mode", mode, GROUP_MODES)
    if scores.dim() != 1:
        raise ValueError(f"scores: expected shape [B], got {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch of {scores.shape[0]} scores")
    return dispatch("group_advantages", GROUP_ADVANTAGES, scores.device, scores, group_size, mode=mode)
