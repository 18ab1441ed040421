"""TRL's per-token helpers (trl.trainer.utils, TRL 1.x) computed by ppo_fast.ops, and `patch()`
to swap them into TRL's trainers.

    from ppo_fast.integrations import trl as pf_trl
    pf_trl.patch()        # GRPOTrainer, PPOTrainer, ... now call ppo_fast's kernels
"""
from __future__ import annotations

import sys

from ppo_fast import ops
from ppo_fast.integrations import unsupported

IGNORE = -100


def selective_log_softmax(logits, index, temperature: float = 1.0, row_mask=None):
    """log_softmax(logits / temperature) gathered at `index` ([...] ids), in the logits' dtype
    (TRL's convention); positions where row_mask == 0 give 0."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if index.dim() == logits.dim():
        raise unsupported("trl", f"index of shape {tuple(index.shape)} (K ids per position)",
                          "one id per position, index shaped like logits.shape[:-1]")
    labels = index if row_mask is None else index.masked_fill(row_mask == 0, IGNORE)
    return ops.logprobs_from_logits(logits, labels, temperature=temperature).to(logits.dtype)


def entropy_from_logits(logits, chunk_size: int = 128):
    """Entropy of softmax(logits) over the last dim, in the logits' dtype (chunk_size: one pass needs no chunks)."""
    return ops.entropy_from_logits(logits).to(logits.dtype)


def patch() -> list:
    """Replace TRL's selective_log_softmax / entropy_from_logits in trl.trainer.utils and in every
    loaded TRL module that imported them by name. Returns the names replaced ("module.function")."""
    import trl.trainer.utils  # noqa: F401 - TRL must be importable

    replaced = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("trl") or module is None:
            continue
        for fn_name, ours in (("selective_log_softmax", selective_log_softmax),
                              ("entropy_from_logits", entropy_from_logits)):
            if callable(getattr(module, fn_name, None)) and getattr(module, fn_name) is not ours:
                setattr(module, fn_name, ours)
                replaced.append(f"{name}.{fn_name}")
    return replaced


__all__ = ["entropy_from_logits", "patch", "selective_log_softmax"]
