"""Batched sampling with a KV cache.

Prompts are left-padded so every row's next token lands in one column; position ids count
from each row's first real token. Responses are right-padded with the pad token after EOS.
Sequences are laid out [left pad | prompt | response | right pad], with the prompt block
P columns wide, so response token t of every row sits at column P + t.
"""
from __future__ import annotations

import torch

from ppo_fast.ppo.distributed import head_group
from ppo_fast.ppo.models import backbone, cache_keyword, position_ids, returned_cache


def left_pad(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [B, P], attention mask [B, P]), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top_k, and outside the smallest set whose
    probability reaches top_p (the most likely token always stays). Returns `logits` itself
    when neither applies."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def uniform_rows(generator, rows: tuple, n: int, device) -> torch.Tensor:
    """U(0, 1) numbers for rows start..start+n of a global batch of `total` (one draw for all)."""
    start, total = rows
    return torch.rand(total, generator=generator, device=generator.device if generator else device)[start:start + n]


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u * total (zero-probability
    tokens are never drawn)."""
    cdf = probs.cumsum(-1)
    target = (uniform.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sampled_log_prob(ops, hidden, lm_head, logits, filtered, tokens, temperature: float):
    """(log pi(token) under the distribution the token was drawn from, the entropy at the
    temperature): the LM head's log-prob through `ops.fused_linear_logprobs`, the op the
    experience pass scores with (the same GEMM shape and kernel: a row's value is bitwise the
    experience's given the same hidden state), minus log of the mass top-k / top-p kept (0
    without them); the entropy before top-k / top-p, as the experience's."""
    logp, entropy = ops.fused_linear_logprobs(hidden, lm_head.weight, tokens, bias=lm_head.bias,
                                              temperature=temperature, return_entropy=True, **head_group(lm_head))
    if filtered is not logits:
        logp = logp - (torch.logsumexp(filtered, -1) - torch.logsumexp(logits, -1))
    return logp, entropy


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None, all_ranks=None,
           rows: tuple = None, ops=None):
    """Sample up to max_new_tokens per row, stopping a row at EOS and all rows when all stopped.

    Returns (response ids [B, R], response mask [B, R] bool, True up to and including EOS,
    log-probs [B, R] float32 of each sampled token under the distribution it was drawn from,
    after temperature, top-k and top-p, and the entropy at each step; both 0 after the
    response), R = the longest response. Only
    the last position's logits are computed at each step; `ops` (default ppo_fast.ops) scores
    the sampled tokens (sampled_log_prob). Raises FloatingPointError if the logits are not
    finite (a diverged policy).

    Each row's token is drawn by inverse CDF from one uniform number per row and step, drawn for
    the whole global batch: `rows = (start, total)` says which rows of a global batch of `total`
    these are (data parallelism), so a row's sample does not depend on how the batch is split.
    `all_ranks(flag)` says whether a flag holds on every rank: all ranks stop at the same step
    (their sharded forwards are collectives).
    """
    if ops is None:
        from ppo_fast import ops
    body, lm_head = backbone(model), model.get_output_embeddings()
    cache_arg = cache_keyword(body)
    B = prompt_ids.shape[0]
    attention_mask = prompt_mask.long()
    positions = position_ids(attention_mask)
    tokens, cache = prompt_ids, None
    finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    out_tokens, out_logp, out_entropy = [], [], []
    for _ in range(max_new_tokens):
        out = body(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   **{cache_arg: cache})
        cache = returned_cache(out)
        hidden = out.last_hidden_state[:, -1]
        logits = lm_head(hidden).float() / temperature
        filtered = filter_logits(logits, top_k, top_p)
        probs = filtered.softmax(-1)
        probs = torch.where(torch.isfinite(probs), probs, 1.0)  # checked below
        next_token = inverse_cdf_sample(probs, uniform_rows(generator, rows or (0, B), B, probs.device))
        next_token = next_token.masked_fill(finished, pad_token_id)
        out_tokens.append(next_token)
        logp, entropy = sampled_log_prob(ops, hidden, lm_head, logits, filtered, next_token, temperature)
        out_logp.append(logp)
        out_entropy.append(entropy)
        finished |= next_token == eos_token_id
        all_finished, finite = torch.stack([finished.all(), torch.isfinite(logits).all()]).tolist()  # one sync
        if not finite:
            raise FloatingPointError("the sampling logits are not finite")
        if all_ranks(all_finished) if all_ranks else all_finished:
            break
        tokens = next_token[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        positions = positions[:, -1:] + 1
    response = torch.stack(out_tokens, dim=1)
    is_eos = response == eos_token_id
    # valid = no EOS strictly before this position: sum over earlier positions of is_eos == 0
    response_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    log_prob, entropy = (torch.stack(x, dim=1).masked_fill(~response_mask, 0.0) for x in (out_logp, out_entropy))
    return response.masked_fill(~response_mask, pad_token_id), response_mask, log_prob, entropy
