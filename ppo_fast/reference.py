"""Plain-PyTorch versions of every ppo_fast op: the specification and the baseline.

Written the way a user would write them (fp32 log_softmax + gather, softmax entropy), with
the same signatures as `ppo_fast.ops`. Inputs are upcast to at least float32, so calling these
on float64 tensors gives the float64 oracle the tests compare every backend against.
No input validation here: the public ops validate before dispatching.
"""
from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _entropy_from_log_softmax(logp_all: torch.Tensor) -> torch.Tensor:
    # H = -sum_v p_v log p_v; clamp so that p = 0 entries (logit -inf) give 0, not NaN.
    logp_safe = logp_all.clamp(min=torch.finfo(logp_all.dtype).min)
    return -(logp_all.exp() * logp_safe).sum(-1)


def logprobs_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log_softmax(logits / temperature)[label] (0 where label == ignore_index), float32.

    With return_entropy, also the entropy of softmax(logits / temperature) at every position.
    """
    logp_all = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0).long()
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if return_entropy:
        return logp, _entropy_from_log_softmax(logp_all)
    return logp


def entropy_from_logits(logits, *, temperature=1.0):
    """Entropy of softmax(logits / temperature) over the last dim, float32."""
    return _entropy_from_log_softmax(torch.log_softmax(_upcast(logits) / temperature, dim=-1))
