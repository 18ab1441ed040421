"""What moves between the phases of a PPO step: a Rollout (sampled sequences) and the
Experience built from it (log-probs, values, advantages), and the step's statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from ppo_fast.ops.reference import masked_max_abs

IGNORE_INDEX = -100


@dataclass
class Rollout:
    """Sampled and scored sequences laid out [left pad | prompt | response | right pad]: the prompt
    block is `prompt_length` columns wide, so response token t of every row sits at column P + t.
    `log_prob` and `entropy` [B, R] are the sampler's own (the distribution each token was drawn
    from; 0 after the response), `scores` [B] the rewards, `stats` the rollout phase's statistics."""

    prompts: list
    sequences: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R], 0 on padding
    labels: torch.Tensor  # [B, R] response ids, IGNORE_INDEX after EOS
    prompt_length: int
    log_prob: torch.Tensor  # [B, R] float32
    entropy: torch.Tensor  # [B, R] float32
    scores: Optional[torch.Tensor] = None  # [B], set by scoring
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_sampling(cls, prompts, prompt_ids, prompt_mask, response, response_mask, log_prob,
                      entropy) -> "Rollout":
        return cls(prompts, torch.cat([prompt_ids, response], dim=1),
                   torch.cat([prompt_mask, response_mask.long()], dim=1),
                   response.masked_fill(~response_mask, IGNORE_INDEX), prompt_ids.shape[1], log_prob, entropy)

    @property
    def response(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def mask(self) -> torch.Tensor:
        """bool [B, R]: True on response tokens, EOS included."""
        return self.labels != IGNORE_INDEX

    @property
    def prompt_mask(self) -> torch.Tensor:
        return self.attention_mask[:, :self.prompt_length]

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rows at the indices `rows` (a 1-d long tensor), in that order."""
        index = rows.tolist()
        return Rollout([self.prompts[i] for i in index], self.sequences[rows], self.attention_mask[rows],
                       self.labels[rows], self.prompt_length, self.log_prob[rows], self.entropy[rows],
                       None if self.scores is None else self.scores[rows], dict(self.stats))

    @classmethod
    def concat(cls, parts: list, pad_token_id: int) -> "Rollout":
        """The rows of several rollouts in one, re-padded to the widest prompt block (on the left) and
        the longest response (on the right)."""
        P = max(p.prompt_length for p in parts)
        R = max(p.labels.shape[1] for p in parts)

        def widen(x, left, right, value):
            return torch.nn.functional.pad(x, (left, right), value=value)

        pieces = []
        for p in parts:
            left, right = P - p.prompt_length, R - p.labels.shape[1]
            pieces.append((widen(torch.cat([widen(p.sequences[:, :p.prompt_length], left, 0, pad_token_id),
                                            p.response], 1), 0, right, pad_token_id),
                           widen(widen(p.attention_mask, left, 0, 0), 0, right, 0),
                           widen(p.labels, 0, right, IGNORE_INDEX), widen(p.log_prob, 0, right, 0.0),
                           widen(p.entropy, 0, right, 0.0)))
        sequences, attention_mask, labels, log_prob, entropy = (torch.cat(x) for x in zip(*pieces))
        scores = None if any(p.scores is None for p in parts) else torch.cat([p.scores for p in parts])
        return cls([q for p in parts for q in p.prompts], sequences, attention_mask, labels, P, log_prob, entropy,
                   scores)


@dataclass
class Experience:
    """One rollout batch ready for the update: sequences [B, P + R], per-response-token tensors [B, R]."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    is_weights: Optional[torch.Tensor] = None  # [B, R] or [B, 1]: rollout correction, constants
    # The row order of the update's first epoch: the order the old log-probs were computed in, so the
    # first epoch's first forwards see exactly those micro-batches (None: the update draws one).
    first_epoch_order: Optional[torch.Tensor] = None

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.labels.shape[1]

    @property
    def response(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    def select(self, rows) -> "Experience":
        """These rows (the per-row tensors; a selection has no epoch order of its own)."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                             for f in fields(self) if f.name != "first_epoch_order"})


def rows_in_chunks(fn, size: int, *tensors, order=None):
    """fn over consecutive row chunks of `tensors` (taken in `order`, a permutation of the rows,
    when given), outputs concatenated (a tensor or a tuple) in the rows' own order."""
    if order is not None:
        tensors = tuple(t[order] for t in tensors)
    outs = [fn(*(t[i:i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    outs = tuple(torch.cat(parts) for parts in zip(*outs)) if isinstance(outs[0], tuple) else (torch.cat(outs),)
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        outs = tuple(o[inverse] for o in outs)
    return outs if len(outs) > 1 else outs[0]


@torch.no_grad()
def experience_stats(scores, old_logp, ref_logp, entropy, values, advantages, returns, mask, prompt_mask, ops) -> dict:
    """Per-step statistics of a rollout batch (advantages before whitening)."""
    m = mask.float()
    kl_tokens = torch.where(mask, old_logp - ref_logp, 0.0)  # k1 per token
    adv, ret = advantages[mask], returns[mask]
    return {
        "reward_mean": scores.mean(), "reward_std": scores.std() if len(scores) > 1 else scores.new_zeros(()),
        "kl": kl_tokens.sum(-1).mean(), "kl_per_token": ops.masked_mean(kl_tokens, mask),
        "entropy": ops.masked_mean(entropy, mask),
        "advantage_mean": adv.mean(), "advantage_std": adv.std(), "return_mean": ret.mean(), "return_std": ret.std(),
        "value_mean": ops.masked_mean(values, mask),
        "response_length": m.sum(-1).mean(), "prompt_length": prompt_mask.float().sum(-1).mean(),
    }


@torch.no_grad()
def mismatch_stats(old_logp, rollout_logp, mask, ops) -> tuple[dict, dict]:
    """How far the sampler's log-probs are from the experience pass's for the same tokens, as
    (means, maxima): mismatch_k3 = mean k3 KL(rollout || old) per token (exp(d) - d - 1, d = old -
    rollout), mismatch_frac = the fraction of tokens whose ratio pi_rollout / pi_old lies outside
    [0.5, 2]; mismatch_max_abs = max |d| over valid tokens (0: bitwise the same log-probs)."""
    d = old_logp - rollout_logp
    return ({"mismatch_k3": ops.masked_mean(ops.kl_penalty(rollout_logp, old_logp, estimator="k3_raw"), mask),
             "mismatch_frac": ops.masked_mean((d.abs() > math.log(2.0)).float(), mask)},
            {"mismatch_max_abs": masked_max_abs(d, mask)})
