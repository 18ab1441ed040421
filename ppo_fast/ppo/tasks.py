"""The embedded default task, `count`: continue a run of digits.

Prompt: 2-6 consecutive digits mod 10 ("7890"); the right response is the next COUNT_LENGTH
digits and then EOS ("123456"). Score = (digits right at their position - tokens past the
COUNT_LENGTH-th + 1 if the response stops right after them) / (COUNT_LENGTH + 1), floored at 0:
in [0, 1]. Running on past the answer costs as much as a wrong digit per token, so stopping is
worth 1/7 plus the tokens it saves (with a stop bonus alone, worth one digit, a policy that
has become sure of its digits never tries EOS at the right place and runs to max_new_tokens).

Why this task: a random policy scores about 0.1, the rule ("next = previous + 1 mod 10") is one
relation applied at every position, so every token carries signal and a ~0.1M-parameter model
learns it in a few hundred PPO steps; prompts of several lengths exercise left padding, and the
stop bonus makes EOS handling matter. No tokenizer or model is downloaded.
"""
from __future__ import annotations

import torch

COUNT_LENGTH = 6
MIN_PROMPT, MAX_PROMPT = 2, 6


class DigitTokenizer:
    """The digits 0-9 plus pad (0) and EOS (1); the subset of the HF tokenizer API the trainer uses."""

    pad_token_id, eos_token_id = 0, 1
    vocab_size = 12

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text.isdigit():
            raise ValueError(f"DigitTokenizer: expected a string of digits, got {text!r}")
        return [int(c) + 2 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Digits as text; EOS is dropped with skip_special_tokens. A pad token is always shown
        ("_"): the trainer decodes only the tokens up to EOS, so a pad there was generated, and
        hiding it would let a policy pad its way to a "stopped" response (it did)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        names = {self.pad_token_id: "_", self.eos_token_id: "" if skip_special_tokens else "<eos>"}
        return "".join(names.get(i, str(i - 2)) for i in ids)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]


def count_prompts(n: int, generator: torch.Generator) -> list[str]:
    """n random prompts of the counting task, drawn with `generator`."""
    starts = torch.randint(0, 10, (n,), generator=generator).tolist()
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (n,), generator=generator).tolist()
    return ["".join(str((s + i) % 10) for i in range(k)) for s, k in zip(starts, lengths)]


def count_target(prompt: str) -> str:
    last = int(prompt[-1])
    return "".join(str((last + 1 + i) % 10) for i in range(COUNT_LENGTH))


def count_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Score of each response (EOS already stripped) to its prompt, in [0, 1]."""
    scores = []
    for prompt, response in zip(prompts, responses):
        target = count_target(prompt)
        right = sum(a == b for a, b in zip(response, target))
        extra = max(len(response) - COUNT_LENGTH, 0)
        scores.append(max(right - extra + (len(response) == COUNT_LENGTH), 0) / (COUNT_LENGTH + 1))
    return scores


def hf_digit_tokenizer():
    """The digits as a Hugging Face tokenizer (pad 0, EOS 1, unk 2, digit d -> d + 3), for model
    folders that need a tokenizer on disk (the tests, benchmarks/e2e_models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{str(d): d + 3 for d in range(10)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_policy_config(tokenizer: DigitTokenizer):
    """A 2-layer, 64-wide Llama (about 0.1M parameters) for the task, built at random."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
