"""Group-relative advantages for the critic-free variants (GRPO, RLOO): a handful of numbers
per prompt, so plain torch on every backend (the reference is the implementation)."""
from __future__ import annotations

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import dispatch
from ppo_fast.ops.checks import require_choice, require_float

GROUP_MODES = reference.GROUP_MODES
GROUP_ADVANTAGES = {"torch": reference.group_advantages}  # the reference only: runs under any backend
IMPLEMENTATIONS = {"group_advantages": GROUP_ADVANTAGES}


def _require_sizes(group_size, batch: int):
    """group_size as the op takes it: an int >= 1 dividing the batch, or the sizes (ints >= 1, a list
    or a 1-d integer tensor) of consecutive groups adding up to it."""
    if isinstance(group_size, int) and not isinstance(group_size, bool):
        if group_size < 1:
            raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
        if batch % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the batch of {batch} scores")
        return group_size
    if isinstance(group_size, torch.Tensor) and group_size.dim() == 1 and not group_size.is_floating_point():
        group_size = group_size.tolist()
    if not isinstance(group_size, (list, tuple)) or not all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in group_size):
        raise ValueError(f"group_size: expected an int >= 1 or a list of group sizes >= 1, got {group_size!r}")
    if sum(group_size) != batch:
        raise ValueError(f"group_size: the group sizes add up to {sum(group_size)}, expected the batch of "
                         f"{batch} scores")
    return list(group_size)


def group_advantages(scores, group_size, *, mode="grpo"):
    """Per-sequence advantages [B] from groups of consecutive samples of a prompt, all of
    `group_size` (an int) or of the sizes listed: grpo, rloo or none (see
    ppo_fast.ops.reference.group_advantages; a group of one gets 0)."""
    require_float("scores", scores)
    require_choice("mode", mode, GROUP_MODES)
    if scores.dim() != 1:
        raise ValueError(f"scores: expected shape [B], got {tuple(scores.shape)}")
    group_size = _require_sizes(group_size, scores.shape[0])
    return dispatch("group_advantages", GROUP_ADVANTAGES, scores.device, scores, group_size, mode=mode)
