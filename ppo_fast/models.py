"""The four models of a PPO run and the forwards the loop needs from them.

Every forward stops at the last hidden states of the response positions; log-probs come from
`fused_linear_logprobs` on those and `lm_head.weight`, values and scores from a [1, H] head,
so no [B, T, V] logits tensor is ever built outside generation.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under an HF *ForCausalLM / *ForSequenceClassification head."""
    return getattr(model, model.base_model_prefix, model)


def load_model(path: str, kind: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An HF model from a local directory, never downloading: its weights if the directory has
    them, else built at random from its config.json. kind: "causal-lm" or "reward"."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    if any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES):
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **({"num_labels": 1} if kind == "reward" else {}))
        model = auto.from_config(config, dtype=dtype)
    if kind == "causal-lm":
        check_plain_lm_head(model)
    elif model.config.num_labels != 1:
        raise ValueError(f"reward_model: {path!r} has num_labels={model.config.num_labels}; expected 1 (a scalar score)")
    return model.to(device).eval()


def check_plain_lm_head(model: nn.Module) -> None:
    """The fused log-probs assume logits = h @ lm_head.weight^T (+ bias)."""
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"policy: config.{attr}={getattr(model.config, attr)} transforms the logits; "
                             f"ppo_fast's fused log-probs support logits = lm_head(h) only")
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        raise ValueError(f"policy: expected an nn.Linear lm_head, got {type(model.get_output_embeddings()).__name__}")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy that takes no gradient (the reference policy)."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... from each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden(model: nn.Module, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
    """Last hidden states [B, R, H] at the positions that predict the R response tokens."""
    out = backbone(model)(input_ids=sequences, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state[:, prompt_length - 1:-1]


class ValueModel(nn.Module):
    """An LM backbone and a scalar head: v_t = head(h_t), float32 [B, R]."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body, self.head = body, head

    @classmethod
    def from_model(cls, model: nn.Module, share: bool = False) -> "ValueModel":
        """From a causal LM (a zero head) or a reward model (its score head); `share` reuses
        the model's backbone instead of copying it."""
        body = backbone(model) if share else copy.deepcopy(backbone(model))
        p = next(body.parameters())
        hidden_size = model.config.hidden_size
        score = getattr(model, "score", None)
        head = nn.Linear(hidden_size, 1, bias=False, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if isinstance(score, nn.Linear) and score.weight.shape == (1, hidden_size):
                head.weight.copy_(score.weight)
            else:
                head.weight.zero_()
        return cls(body, head).requires_grad_(True)

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float()

    def forward(self, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
        out = self.body(input_ids=sequences, attention_mask=attention_mask,
                        position_ids=position_ids(attention_mask), use_cache=False)
        return self.values_from_hidden(out.last_hidden_state[:, prompt_length - 1:-1])


@torch.no_grad()
def reward_model_scores(model: nn.Module, sequences, attention_mask) -> torch.Tensor:
    """The sequence-classification score at each row's last real token, float32 [B]."""
    hidden = backbone(model)(input_ids=sequences, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.score(hidden[rows, last]).squeeze(-1).float()
