"""Prompts: reading a prompt file, tokenizing, and drawing batches in a reshuffled order."""
from __future__ import annotations

import json

import torch

from ppo_fast.ppo.config import ConfigError


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl file (a "prompt" field per line)."""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in lines] if path.endswith(".jsonl") else lines
    if not prompts:
        raise ConfigError(f"prompts: {path!r} holds no prompts")
    return prompts


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise ValueError(f"prompt {text!r} encodes to no tokens")
    return ids


class PromptCycle:
    """Draws batches from a prompt list, reshuffled (with the run's generator) each pass; `order`
    is the rest of the current pass (checkpointed, so a resumed run draws the same prompts)."""

    def __init__(self, prompts: list[str], generator: torch.Generator):
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        self.prompts, self.generator, self.order = list(prompts), generator, []

    def __call__(self, n: int) -> list[str]:
        batch = []
        while len(batch) < n:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            batch.append(self.prompts[self.order.pop()])
        return batch
