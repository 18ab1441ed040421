"""What moves between the phases of a PPO step: a Rollout (sampled sequences) and the
Experience built from it (log-probs, values, advantages), and the step's statistics."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class Rollout:
    """Sampled sequences laid out [left pad | prompt | response | right pad]: the prompt block is
    `prompt_length` columns wide, so response token t of every row sits at column P + t."""

    prompts: list
    sequences: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R], 0 on padding
    labels: torch.Tensor  # [B, R] response ids, IGNORE_INDEX after EOS
    prompt_length: int

    @classmethod
    def from_sampling(cls, prompts, prompt_ids, prompt_mask, response, response_mask) -> "Rollout":
        return cls(prompts, torch.cat([prompt_ids, response], dim=1),
                   torch.cat([prompt_mask, response_mask.long()], dim=1),
                   response.masked_fill(~response_mask, IGNORE_INDEX), prompt_ids.shape[1])

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
        return Experience(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def rows_in_chunks(fn, size: int, *tensors):
    """fn over consecutive row chunks of `tensors`, outputs concatenated (a tensor or a tuple)."""
    outs = [fn(*(t[i:i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


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
