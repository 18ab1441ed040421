"""Plain-PyTorch versions of every ppo_fast op: the specification and the baseline.

Written the way a user would write them (fp32 log_softmax + gather, softmax entropy), with
the same signatures as `ppo_fast.ops`. Inputs are upcast to at least float32, so calling these
on float64 tensors gives the float64 oracle the tests compare every backend against.
No input validation here: the public ops validate before dispatching.

NaN rule, which every backend follows: a NaN or inf at a valid position (mask = 1) gives NaN
in the outputs that depend on it; an input at a masked position is read as 0, so it never
reaches a sum, a statistic or a gradient.

Numeric contract, which every backend follows (tests/ops/test_numeric_contract.py checks it
against float64 on logits over the whole finite range, in fp32 and bf16):

- Accumulation is fp32 whatever the input dtype; gradients come back in the input's dtype (one
  rounding), the LM head's weight and bias gradients accumulated in fp32.
- Logits. x = z * fp32(logit_scale / T) is one fp32 product on every backend (this module
  included: `transformed_logits`), or with a softcap c, c tanh(logit_scale z / c) / T. Given
  that x, log-probs, entropy and their gradient are exact to fp32 rounding of the differences
  x_v - max x: each row keeps its max m and log d = log sum exp(x - m) apart (lse = m + log d
  would round to m at |m| = 1e8), so a row at -1e8 or +-1e30 gets the log-probs of its offsets.
  Errors: |log p| eps plus a few eps log V on log p, the entropy and log sum p^2; gradient
  entries to a few eps (log V) |upstream| / T, then one rounding to the input dtype. Kernels
  never fuse a product into an add where that would change x (C++ -ffp-contract=off, Triton
  enable_fp_fusion=False, CUDA __fmul_rn).
- Where x itself rounds coarsely (|x| ~ 1e8 with T != 1: a unit of x is then 8), the
  distribution is that of the rounded x; float64 on z would differ, and no fp32 code can do
  better. A 1 / T or logit_scale that underflows fp32 makes every x 0 (uniform); one that
  overflows is refused, and so is a softcap past fp32's range.
- Masks. finfo.min (transformers' logits processors) and -inf are probability 0: log-probs of
  other labels, entropy and gradients finite and exact; the log-prob of a masked label is its
  x - lse (about finfo.min, or -inf past fp32's range). A row of only -inf has NaN log-probs
  and entropy (as log_softmax) and mean_logit -inf. x = +inf (a +inf or NaN logit, or z / T
  overflowing) makes its row NaN.
- Statistics: log sum p^2 as log-probs; mean_logit is an fp32 sum of x / V (a few eps sum |x|
  / V; -inf or +inf where the row sums past fp32's range); is_top1 exact (the first maximum).
- Weights. is_weights are checked >= 0 at valid positions even when some weight is NaN; a NaN
  weight at a valid position makes the loss NaN, at a masked one is never read. A weight
  multiplies its token's derivative only where the surrogate has one: +inf on a clipped token
  (or past the log-ratio clamp) gives gradient 0, as autograd of this module does; +inf times
  a zero derivative elsewhere (A = 0) is NaN, likewise.

Batch invariance, which every backend follows: a row's outputs (and its gradients, for given
global counts) are bitwise the same whatever the other rows, the batch size, the chunk size
and the masked padding after it. Two things would break it and are done in fixed shapes here:
the LM-head GEMMs (BLAS picks its kernel and reduction order by shape: blocked_linear) and the
sums over a row (row_sums).
"""
from __future__ import annotations

import math

import torch

from ppo_fast.ops.constants import GROUP_STD_EPS, K3_CLAMP, LOG_RATIO_CLAMP, WHITEN_EPS


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def valid_only(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask != 0, else 0 (where, not a product: 0 * NaN would be NaN)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


GEMM_BLOCK_ROWS = 128  # every LM-head GEMM multiplies blocks of this many rows
ROW_SUM_BLOCK = 128  # row sums reduce blocks of this many entries


def blocked_linear(x, weight, bias=None, out_dtype=None):
    """x [N, K] @ weight.T + bias as GEMMs of one shape, [GEMM_BLOCK_ROWS, K] x [K, M], the last
    block zero-padded: a row's result never depends on N or on the rows beside it. Differentiable
    (blocks concatenated) when autograd records; otherwise written block by block into one output.
    out_dtype (no autograd, no bias): the product accumulated in fp32 and written in that dtype
    (fp32 for fp32 master parameters), not rounded to x's dtype first: one GEMM with an fp32 output
    on CUDA, fp32 copies of the operands on a CPU."""
    N, B = x.shape[0], GEMM_BLOCK_ROWS
    full = N - N % B
    widen = out_dtype is not None and out_dtype != x.dtype
    if widen and not x.is_cuda:
        x, weight, widen = x.to(out_dtype), weight.to(out_dtype), False

    def gemm(rows, out=None):
        if widen:
            return torch.mm(rows, weight.t(), out_dtype=out_dtype, out=out)
        if bias is None:
            return torch.mm(rows, weight.t(), out=out)
        return torch.addmm(bias, rows, weight.t(), out=out)

    def tail():
        padded = x.new_zeros(B, x.shape[1])
        padded[:N - full] = x[full:]
        return gemm(padded)[:N - full]

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        parts = [gemm(x[i:i + B]) for i in range(0, full, B)] + ([tail()] if full < N else [])
        return torch.cat(parts) if parts else gemm(x)  # N = 0: an empty product, still in the graph
    out = x.new_empty(N, weight.shape[0], dtype=out_dtype or x.dtype)
    for i in range(0, full, B):
        gemm(x[i:i + B], out=out[i:i + B])
    if full < N:
        out[full:] = tail()
    return out


def row_sums(x):
    """x summed over its last dim so that trailing zeros (masked padding) never change a row's
    sum: fixed blocks of ROW_SUM_BLOCK entries (zero-padded), each reduced alike, then the block
    sums added left to right (x + 0 = x exactly)."""
    T, B = x.shape[-1], ROW_SUM_BLOCK
    n_blocks = max(1, -(-T // B))
    blocks = torch.nn.functional.pad(x, (0, n_blocks * B - T)).reshape(*x.shape[:-1], n_blocks, B).sum(-1)
    total = blocks[..., 0]
    for j in range(1, n_blocks):
        total = total + blocks[..., j]
    return total


class _ExpandRows(torch.autograd.Function):
    """x [B] -> [B, T], each row's value on its T positions; the backward sums the gradient over
    T with row_sums (autograd's own sum of an expand is not padding-invariant)."""

    @staticmethod
    def forward(ctx, x, T: int):
        return x[:, None].expand(x.shape[0], T)

    @staticmethod
    def backward(ctx, grad):
        return row_sums(grad), None


def expand_rows(x, T: int):
    return _ExpandRows.apply(x, T)


def _entropy_from_log_softmax(logp_all: torch.Tensor) -> torch.Tensor:
    # H = -sum_v p_v log p_v, with p log p = 0 where p = 0 (a logit of -inf): the where keeps
    # both the value and the gradient finite there.
    p = logp_all.exp()
    return -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)


def transformed_logits(logits, temperature=1.0, logit_scale=1.0, softcap=None):
    """x = z (logit_scale / T), or softcap tanh(logit_scale z / softcap) / T (final-logit softcapping).
    Without a softcap one factor multiplies z, as in the kernels: x is then the same fp32 number on
    every backend (z / T and z * (1 / T) differ by a rounding, which at |x| ~ 1e8 is a unit of x)."""
    z = _upcast(logits)
    if softcap is None:
        return z * (logit_scale / temperature)
    return softcap * torch.tanh(z * logit_scale / softcap) / temperature


def row_stats(x, labels, ignore_index=-100):
    """The statistics of logprobs_from_logits(return_stats=True) from the transformed logits x."""
    logp_all = torch.log_softmax(x, dim=-1)
    y = labels.masked_fill(labels == ignore_index, 0).long().unsqueeze(-1)
    x_y = x.gather(-1, y).squeeze(-1)
    before = torch.where(torch.arange(x.shape[-1], device=x.device) < y, x, -torch.inf).amax(-1)
    return {"log_sum_sq_probs": torch.logsumexp(2 * logp_all, dim=-1), "mean_logit": x.mean(-1),
            "is_top1": (x_y >= x.amax(-1)) & (x_y > before) & (labels != ignore_index)}


def logprobs_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, logit_scale=1.0,
                         softcap=None, return_stats=False):
    """log_softmax(x)[label] (0 where label == ignore_index), float32, x = transformed_logits(...).

    With return_entropy, also the entropy of softmax(x) at every position; with return_stats,
    (logp, entropy, row_stats) with the statistics detached.
    """
    x = transformed_logits(logits, temperature, logit_scale, softcap)
    logp_all = torch.log_softmax(x, dim=-1)
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0).long()
    logp = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if return_stats:
        with torch.no_grad():
            stats = row_stats(x.detach(), labels, ignore_index)
        return logp, _entropy_from_log_softmax(logp_all), stats
    if return_entropy:
        return logp, _entropy_from_log_softmax(logp_all)
    return logp


def entropy_from_logits(logits, *, temperature=1.0, logit_scale=1.0, softcap=None):
    """Entropy of softmax(x) over the last dim, float32 (x as in logprobs_from_logits)."""
    return _entropy_from_log_softmax(torch.log_softmax(transformed_logits(logits, temperature, logit_scale, softcap),
                                                       dim=-1))


# ----------------------------------------------------------------------------- aggregation
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def masked_mean(x, mask):
    """sum(mask * x) / sum(mask); 0 where the mask is empty."""
    x = valid_only(_upcast(x), mask)
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def agg_loss(loss, mask, agg="token-mean", *, num_tokens=None, num_seqs=None):
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: sum(m L) / sum(m); seq-mean-token-sum: mean over sequences with a valid token of
    sum_t(m L); seq-mean-token-mean: the same mean of sum_t(m L) / sum_t m. `num_tokens` /
    `num_seqs` replace the local denominators (global batch under accumulation or data parallel).
    """
    loss = valid_only(_upcast(loss), mask)
    m = mask.to(loss.dtype)
    if agg == "token-mean":
        den = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return (loss * m).sum() / den
    seq_sum = (loss * m).sum(-1)
    seq_tokens = m.sum(-1)
    has_tokens = seq_tokens > 0
    if agg == "seq-mean-token-mean":
        seq_sum = seq_sum / seq_tokens.clamp(min=1)
    den = has_tokens.sum().clamp(min=1) if num_seqs is None else num_seqs
    return seq_sum[has_tokens].sum() / den


@torch.no_grad()
def masked_max_abs(x, mask):
    """max |x| over the valid positions (0 for an empty mask; NaN if a valid entry is NaN)."""
    x = valid_only(_upcast(x).abs(), mask)
    return x.amax() if x.numel() else x.new_zeros(())


@torch.no_grad()
def masked_whiten(x, mask, *, shift_mean=True):
    """(x - mu) * rsqrt(var + 1e-8) with the masked mean and unbiased masked variance
    (statistics over valid tokens, applied everywhere); shift_mean=False adds mu back.
    The statistics are two-pass sums in float64, exact for a large mean and a small spread."""
    x = _upcast(x)
    x64 = x.double()
    m = mask.double()
    n = m.sum()
    mean = (valid_only(x64, mask) * m).sum() / n.clamp(min=1)
    var = (valid_only(x64 - mean, mask) ** 2 * m).sum() / (n - 1).clamp(min=1)
    whitened = (x64 - mean) * torch.rsqrt(var + WHITEN_EPS)
    return (whitened if shift_mean else whitened + mean).to(x.dtype)


# ----------------------------------------------------------------------------- losses
RATIO_LEVELS = ("token", "sequence", "sequence-token")


def policy_ratio(log_prob, old_log_prob, mask, ratio_level="token"):
    """(ratio rho [B, T], clamped token log-ratio delta [B, T]) with rho's gradient to log_prob.

    token: rho_t = exp(delta_t), delta_t = clamp(log_prob_t - old_t, -20, 20).
    sequence (GSPO): rho_t = s = exp(clamp(mean over the row's valid tokens of log_prob - old, +-20)),
        differentiated through the mean: d s / d log_prob_t = s / n.
    sequence-token (GSPO-token): the value s, with the gradient of each token's own ratio:
        d rho_t / d log_prob_t = s (sg[s] pi_t / sg[pi_t]; verl's gspo).
    Outside the clamp the ratio has no gradient.
    """
    delta = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if ratio_level == "token":
        return torch.exp(delta), delta
    m = mask.to(log_prob.dtype)
    mean = row_sums((log_prob - old_log_prob) * m) / m.sum(-1).clamp(min=1)
    log_s = expand_rows(torch.clamp(mean, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), log_prob.shape[-1])
    if ratio_level == "sequence-token":
        inside = ((mean >= -LOG_RATIO_CLAMP) & (mean <= LOG_RATIO_CLAMP))[:, None].to(log_prob.dtype)
        log_s = log_s.detach() + inside * (log_prob - log_prob.detach())
    return torch.exp(log_s), delta


def policy_ratio_vjp(log_prob, old_log_prob, mask, ratio_level, v):
    """(rho, v^T d rho / d log_prob) for policy_ratio's rho, where autograd cannot run (inside a custom
    op): token: v rho [inside]; sequence: (s / n) sum_t' m v [mean inside] at every valid token;
    sequence-token: v s [mean inside]. tests/ops/test_fused_linear_ppo_loss.py checks it against
    autograd of policy_ratio."""
    m = mask.to(log_prob.dtype)
    if ratio_level == "token":
        raw = log_prob - old_log_prob
        rho = torch.exp(torch.clamp(raw, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        inside = (raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP)
        return rho, torch.where(inside, v * rho, 0.0)
    n = m.sum(-1).clamp(min=1)
    mean = row_sums((log_prob - old_log_prob) * m) / n
    inside = ((mean >= -LOG_RATIO_CLAMP) & (mean <= LOG_RATIO_CLAMP))[:, None]
    s = torch.exp(torch.clamp(mean, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))[:, None].expand_as(log_prob)
    if ratio_level == "sequence-token":
        return s, torch.where(inside, v * s, 0.0)
    return s, torch.where(inside, s / n[:, None] * row_sums(valid_only(v, mask) * m)[:, None] * m, 0.0)


def ppo_policy_loss(log_prob, old_log_prob, advantages, mask, *, objective="clip", agg="token-mean", num_tokens=None,
                    num_seqs=None, is_weights=None, **params):
    """The policy objective per token, aggregated by `agg`; gradient to log_prob only.

    `objective` names a definition of ppo_fast.ops.objectives (clip: PPO's clipped surrogate with an
    optional dual clip, on a token, sequence (GSPO) or sequence-token ratio; cispo; gpg; sapo; and
    the peers' objectives), `params` its parameters (e.g. clip_low, clip_high, dual_clip,
    ratio_level), or it is an Objective already resolved. `is_weights` ([B, T] or [B, 1],
    constants: rollout importance weights) multiply each token's loss, never the counts of the
    aggregation. Returns (loss, stats): clipfrac and clipfrac_lower (what the objective counts;
    0 where it counts nothing) and approx_kl (mean -delta, delta the clamped token log-ratio),
    masked token means over the local valid tokens.
    """
    from ppo_fast.ops.objectives import resolve, token_terms  # the registry's definitions import this module

    terms = token_terms(resolve(objective, **params), log_prob, old_log_prob, advantages, mask, is_weights)
    loss = agg_loss(terms.loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        delta = torch.clamp(valid_only(_upcast(log_prob) - _upcast(old_log_prob), mask), -LOG_RATIO_CLAMP,
                            LOG_RATIO_CLAMP)
        zero = torch.zeros_like(delta)
        stats = {
            "clipfrac": masked_mean(zero if terms.clipped is None else terms.clipped.to(loss.dtype), mask),
            "approx_kl": masked_mean(-delta, mask),
            "clipfrac_lower": masked_mean(zero if terms.lower is None else terms.lower.to(loss.dtype), mask),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", num_tokens=None, num_seqs=None):
    """Clipped value loss 0.5 * agg(max((v - R)^2, (v_clipped - R)^2)) and its clip fraction,
    v_clipped = clamp(v, old - clip, old + clip) (equal to v, to the bit, inside the range)."""
    values = valid_only(_upcast(values), mask)
    old_values = valid_only(_upcast(old_values).detach(), mask)
    returns = valid_only(_upcast(returns).detach(), mask)
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(loss_unclipped, loss_clipped), mask, agg,
                          num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).to(loss.dtype), mask)
    return loss, clipfrac


# ----------------------------------------------------------------------------- KL
KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3_raw")
# Each also with a '+' suffix: the value of the named estimator with the gradient of k2.
KL_ESTIMATOR_CHOICES = KL_ESTIMATORS + tuple(e + "+" for e in KL_ESTIMATORS)


def _kl_value(log_prob, ref_log_prob, estimator):
    diff = log_prob - ref_log_prob
    if estimator in ("k1", "kl"):
        return diff
    if estimator == "abs":
        return diff.abs()
    if estimator in ("k2", "mse"):
        return 0.5 * diff * diff
    kappa = torch.clamp(ref_log_prob - log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    value = torch.exp(kappa) - kappa - 1.0
    return value if estimator == "k3_raw" else torch.clamp(value, -K3_CLAMP, K3_CLAMP)  # k3 / low_var_kl: clamped


def kl_penalty(log_prob, ref_log_prob, *, estimator="k1"):
    """Per-token KL estimate between the policy and the reference.

    k1/kl: d; abs: |d|; k2/mse: d^2/2; k3/low_var_kl: exp(k) - k - 1 with k = ref - log_prob
    clamped to +-20, the value clamped to +-10 (verl's); k3_raw: the same without the value clamp
    (TRL's and Liger's k3); d = log_prob - ref. A '+' suffix keeps the value and takes the gradient of k2.
    """
    log_prob, ref_log_prob = _upcast(log_prob), _upcast(ref_log_prob)
    value = _kl_value(log_prob, ref_log_prob, estimator.rstrip("+"))
    if estimator.endswith("+"):
        k2 = _kl_value(log_prob, ref_log_prob, "k2")
        return k2 + (value - k2).detach()
    return value


@torch.no_grad()
def compute_rewards(scores, log_prob, ref_log_prob, mask, *, kl_coef, estimator="k1"):
    """Token rewards: -kl_coef * KL on every valid token, plus the sequence score [B] on the
    last valid token of its row."""
    kl = kl_penalty(valid_only(log_prob, mask), valid_only(ref_log_prob, mask), estimator=estimator)
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    T = m.shape[-1]
    if T == 0:
        return rewards
    last = T - 1 - m.flip(-1).argmax(-1)
    has_tokens = m.sum(-1) > 0
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows[has_tokens], last[has_tokens]] += _upcast(scores)[has_tokens].to(rewards.dtype)
    return rewards


# ----------------------------------------------------------------------------- advantages
@torch.no_grad()
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation, the per-step loop other trainers use.

    Masked positions inside a response (tool or observation tokens) are skipped: the next
    value and the running advantage are carried across them. Rewards and values at masked
    positions are read as 0, so there returns = the carried advantage.
    """
    rewards, values = valid_only(_upcast(rewards), mask), valid_only(_upcast(values), mask)
    m = mask.to(rewards.dtype)
    next_value = rewards.new_zeros(rewards.shape[0])
    last = rewards.new_zeros(rewards.shape[0])
    advantages = torch.empty_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        valid = m[:, t] != 0
        next_value = torch.where(valid, values[:, t], next_value)
        last = torch.where(valid, delta + gamma * lam * last, last)
        advantages[:, t] = last
    return advantages, advantages + values


GROUP_MODES = ("grpo", "rloo", "none")


@torch.no_grad()
def group_advantages(scores, group_size, *, mode="grpo"):
    """Per-sequence advantages from groups of consecutive samples of one prompt: `group_size` an
    int (every group that size) or a list of the groups' sizes, in order.

    grpo: (s - mean) / (std + 1e-6), unbiased std; rloo: s minus the mean of the others;
    none: s - mean. A group of one gets advantage 0. Each group's sums run in fixed blocks
    (row_sums), so a group's advantages never depend on the other groups.
    """
    scores = _upcast(scores)
    sizes = [group_size] * (len(scores) // group_size) if isinstance(group_size, int) else list(group_size)
    if not sizes:
        return scores.clone()
    n = torch.tensor(sizes, device=scores.device)
    cols = torch.arange(max(sizes), device=scores.device)
    valid = cols[None] < n[:, None]  # [groups, largest group]
    index = ((n.cumsum(0) - n)[:, None] + cols[None]).clamp(max=len(scores) - 1)
    grouped = torch.where(valid, scores[index], 0.0)
    n = n.to(scores.dtype)[:, None]
    centred = torch.where(valid, grouped - row_sums(grouped)[:, None] / n, 0.0)
    if mode == "grpo":
        std = torch.sqrt(row_sums(centred * centred)[:, None] / (n - 1).clamp(min=1))
        advantages = centred / (std + GROUP_STD_EPS)
    elif mode == "rloo":  # s_i - (sum - s_i) / (g - 1) = g (s_i - mean) / (g - 1)
        advantages = centred * n / (n - 1).clamp(min=1)
    else:
        advantages = centred
    return torch.where(n > 1, advantages, 0.0)[valid]


# ----------------------------------------------------------------------------- rollout correction
CORRECTION_LEVELS = ("token", "sequence", "geometric")
CORRECTION_MODES = ("truncate", "mask")


def _rollout_log_ratio(old_log_prob, rollout_log_prob, mask):
    """(log(pi_old / pi_rollout) in fp32 or fp64, 0 at masked positions and where the rollout
    log-prob is NaN (a token the sampler could not score: ratio 1, as TRL maps it), the mask as
    old's dtype)."""
    old_log_prob = valid_only(_upcast(old_log_prob), mask)
    rollout_log_prob = valid_only(_upcast(rollout_log_prob), mask)
    rollout_log_prob = torch.where(torch.isnan(rollout_log_prob), old_log_prob, rollout_log_prob)
    return old_log_prob - rollout_log_prob, mask.to(old_log_prob.dtype)


@torch.no_grad()
def rollout_correction(old_log_prob, rollout_log_prob, mask, *, level="token", mode="truncate", low=None, high=2.0,
                       batch_normalize=False):
    """Importance weights pi_old / pi_rollout that correct for the sampler's distribution, as
    constants for the loss's `is_weights`, with the tokens they keep and their statistics.

    The ratio of a unit: token: r_t = exp(old_t - rollout_t); sequence: the product of its valid
    tokens' ratios exp(sum_t (old_t - rollout_t)) (verl's and TRL's sequence level); geometric:
    their geometric mean exp(mean_t (old_t - rollout_t)) (OpenRLHF's seq gate). Log-ratios are
    clamped to +-20 before exp. truncate (TIS): weight = clamp(ratio, low, high) (no lower bound when
    low is None); mask (MIS / IcePop): weight = ratio where low <= ratio <= high, else 0.

    Returns (is_weights [B, T] (token) or [B, 1] (sequence, geometric), keep_mask bool [B, T]: the
    valid tokens whose unit was not masked, stats): mean and max weight over valid tokens, the
    fraction of valid tokens whose unit's ratio fell outside [low, high] (truncated or masked),
    k1 = mean(rollout - old) and k3 = mean(exp(old - rollout) - (old - rollout) - 1) (the KL from
    the rollout policy to the old one, per token), ppl_ratio = exp(mean(rollout - old)) (the old
    policy's perplexity over the rollout's, per token). Masked positions are read as 0 and get weight 0.
    A NaN rollout log-prob (a token the sampler could not score: vLLM's convention) counts as a
    log-ratio of 0, ratio 1, as TRL maps it; a NaN old log-prob stays NaN (the NaN rule).

    batch_normalize (verl's rollout_is_batch_normalize): the weights divided by their mean over
    the batch's units — valid tokens (token level) or sequences with a valid token (the other
    levels) — after truncation or masking, when that mean exceeds 1e-8; stats["is_batch_norm_factor"]
    is the divisor (1 when none applied). The other stats are of the weights before it.
    """
    diff, m = _rollout_log_ratio(old_log_prob, rollout_log_prob, mask)  # 0 at masked positions
    if level == "token":
        log_ratio = diff
    else:
        log_ratio = row_sums(diff)[:, None]
        if level == "geometric":
            log_ratio = log_ratio / m.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo = -float("inf") if low is None else low
    outside = (ratio < lo) | (ratio > high)
    if mode == "truncate":
        weights = torch.clamp(ratio, min=low, max=high)
    else:
        weights = torch.where(outside, torch.zeros((), dtype=ratio.dtype, device=ratio.device), ratio)
    valid = mask != 0
    keep = valid & ~outside.expand_as(diff) if mode == "mask" else valid
    per_token = weights.expand_as(diff)
    n = m.sum().clamp(min=1)
    stats = {
        "is_weight_mean": (valid_only(per_token, mask) * m).sum() / n,
        "is_weight_max": torch.where(valid, per_token, torch.zeros((), dtype=ratio.dtype, device=ratio.device)).amax()
        if diff.numel() else diff.new_zeros(()),
        "is_outside_frac": (valid_only(outside.expand_as(diff).to(m.dtype), mask) * m).sum() / n,
        "rollout_k1": (-diff * m).sum() / n,
        "rollout_k3": ((torch.exp(diff) - diff - 1.0) * m).sum() / n,
        "rollout_ppl_ratio": torch.exp((-diff * m).sum() / n),
    }
    weights = weights * (m.sum(-1, keepdim=True) > 0) if level != "token" else weights * m
    if batch_normalize:
        unit = m if level == "token" else (m.sum(-1, keepdim=True) > 0).to(m.dtype)
        mean = (weights * unit).sum() / unit.sum().clamp(min=1e-8)
        factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        weights, stats["is_batch_norm_factor"] = weights / factor, factor
    return weights, keep, stats


# The rejection statistics of a token's log-ratio r = log(pi_old / pi_rollout), clamped to +-20:
# k1 = -r, k2 = r^2 / 2, k3 = exp(r) - 1 - r (Schulman's estimators of KL(rollout || old)).
REJECTION_ESTIMATORS = {"k1": lambda r: -r, "k2": lambda r: 0.5 * r * r, "k3": lambda r: torch.expm1(r) - r}
REJECTION_LEVELS = ("token", "seq_sum", "seq_mean", "seq_max")


@torch.no_grad()
def rollout_rejection(old_log_prob, rollout_log_prob, mask, *, criteria):
    """The tokens to keep when the sampler's policy strays too far from the old one (a hard trust
    region; verl's rollout_rs): each criterion "<level>_<k>" reads a divergence statistic of the
    log-ratio r_t = log(pi_old / pi_rollout) (clamped to +-20; NaN rollout log-prob: r = 0) —
    k1 = -r, k2 = r^2 / 2, k3 = e^r - 1 - r — per token (level "token") or per sequence over its
    valid tokens ("seq_sum", "seq_mean", "seq_max"; max of an empty row: 0), and keeps a unit when
    the statistic is at most its bound; k1 criteria take ratio bounds (low, high) and keep
    log(low) <= k1 <= log(high). A token is kept when every criterion keeps it.

    criteria: {name: bound} (bound a float, or (low, high) for k1). Returns (keep [B, T] bool: the
    valid tokens kept, stats): per criterion "<name>_masked_fraction" (valid tokens it rejects)
    and "<name>_seq_masked_fraction" (sequences with a valid token where it rejects one, over those
    sequences), "masked_fraction" and "seq_masked_fraction" (over all of them: every sequence counts
    in the last), detached scalars.
    """
    r, m = _rollout_log_ratio(old_log_prob, rollout_log_prob, mask)
    r = torch.clamp(r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    valid = mask != 0
    n, seqs = m.sum().clamp(min=1), valid.any(-1)
    keep, stats = valid.clone(), {}
    for name, bound in criteria.items():
        level, estimator = name.rsplit("_", 1)
        stat = valid_only(REJECTION_ESTIMATORS[estimator](r), mask)
        if level == "seq_sum":
            stat = row_sums(stat)[:, None]
        elif level == "seq_mean":
            stat = row_sums(stat)[:, None] / m.sum(-1, keepdim=True).clamp(min=1)
        elif level == "seq_max":
            stat = torch.where(valid, stat, torch.full_like(stat, -float("inf"))).amax(-1, keepdim=True)
            stat = torch.where(seqs[:, None], stat, torch.zeros_like(stat))
        if estimator == "k1":
            kept = (stat >= math.log(bound[0])) & (stat <= math.log(bound[1]))
        else:
            kept = stat <= bound
        rejected = valid & ~kept.expand_as(valid)
        stats[f"{name}_masked_fraction"] = rejected.to(m.dtype).sum() / n
        stats[f"{name}_seq_masked_fraction"] = rejected.any(-1).to(m.dtype).sum() / seqs.sum().clamp(min=1)
        keep &= ~rejected
    stats["masked_fraction"] = (valid & ~keep).to(m.dtype).sum() / n
    stats["seq_masked_fraction"] = (valid & ~keep).any(-1).to(m.dtype).mean() if keep.numel() else m.new_zeros(())
    return keep, stats


# ----------------------------------------------------------------------------- fused linear
def fused_linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None, logit_scale=1.0, softcap=None, return_stats=False):
    """logprobs_from_logits(hidden @ weight.T + bias, labels, ...), materialising the logits in
    hidden's dtype (weight and bias cast to it, as autocast would; `chunk_size` is accepted for the
    signature and ignored)."""
    weight, bias = weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    logits = blocked_linear(hidden.reshape(labels.numel(), hidden.shape[-1]), weight, bias)
    logits = logits.view(*labels.shape, weight.shape[0])
    return logprobs_from_logits(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                return_entropy=return_entropy, logit_scale=logit_scale, softcap=softcap,
                                return_stats=return_stats)


def fused_linear_ppo_loss(hidden, weight, labels, old_log_prob, advantages, mask, *, bias=None, temperature=1.0,
                          ignore_index=-100, ref_log_prob=None, kl_coef=0.0, kl_estimator="low_var_kl", kl_ratio=None,
                          entropy_coef=0.0, agg="token-mean", num_tokens=None, num_seqs=None, is_weights=None,
                          objective="clip", chunk_size=None, logit_scale=1.0, softcap=None, return_log_prob=False,
                          **params):
    """The PPO policy objective from hidden states, composed of the ops above:

        loss = ppo_policy_loss(logp, ...) - entropy_coef * agg(entropy) + kl_coef * agg(kl_penalty(logp, ref))

    with logp, entropy = fused_linear_logprobs(hidden, weight, labels). Returns (loss, stats):
    ppo_policy_loss's stats plus `policy_loss` (its loss alone), `entropy` and, with
    ref_log_prob, `kl` (masked token means), and `max_abs_log_ratio` = max |logp - old| over
    the valid tokens (0 on-policy: exactly 0 before the first update of a rollout), all detached.
    """
    logp, entropy = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                          ignore_index=ignore_index, return_entropy=True, logit_scale=logit_scale,
                                          softcap=softcap)
    loss, stats = ppo_loss_of_logprobs(logp, entropy, old_log_prob, advantages, mask, ref_log_prob=ref_log_prob,
                                       kl_coef=kl_coef, kl_estimator=kl_estimator, kl_ratio=kl_ratio,
                                       entropy_coef=entropy_coef, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                       is_weights=is_weights, objective=objective, **params)
    if return_log_prob:
        stats["log_prob"] = logp.detach()
    return loss, stats


def ppo_loss_of_logprobs(logp, entropy, old_log_prob, advantages, mask, *, ref_log_prob=None, kl_coef=0.0,
                         kl_estimator="low_var_kl", kl_ratio=None, entropy_coef=0.0, agg="token-mean",
                         num_tokens=None, num_seqs=None, is_weights=None, objective="clip", **params):
    """fused_linear_ppo_loss after its head: (loss, stats) from the log-probs and entropy [B, T]
    (differentiable), as that docstring says. The generic path of the fused op calls it on the
    fused head's outputs."""
    agg_args = dict(agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    old_log_prob = logp.detach() if old_log_prob is None else old_log_prob  # on-policy: ratio 1
    policy_loss, stats = ppo_policy_loss(logp, old_log_prob, advantages, mask, is_weights=is_weights,
                                         objective=objective, **params, **agg_args)
    loss = policy_loss - entropy_coef * agg_loss(entropy, mask, **agg_args)
    stats = {**stats, "policy_loss": policy_loss.detach(), "entropy": masked_mean(entropy.detach(), mask),
             "max_abs_log_ratio": masked_max_abs(logp.detach() - old_log_prob, mask)}
    if ref_log_prob is not None:
        kl = kl_penalty(valid_only(logp, mask), valid_only(ref_log_prob.detach(), mask), estimator=kl_estimator)
        if kl_ratio is not None:  # the importance-sampling-corrected KL: rho kl, rho's gradient included
            kl = kl * policy_ratio(valid_only(_upcast(logp), mask), valid_only(_upcast(old_log_prob).detach(), mask),
                                   mask, kl_ratio)[0]
        loss = loss + kl_coef * agg_loss(kl, mask, **agg_args)
        stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats


# ----------------------------------------------------------------------------- preferences
def dpo_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, beta=0.1, *,
             label_smoothing=0.0):
    """Direct preference optimisation over [B] sequence log-probs (sums over response tokens):

        z = beta ((pi_c - ref_c) - (pi_r - ref_r)),  loss = mean(-(1 - eps) log sigmoid(z) - eps log sigmoid(-z))

    eps = label_smoothing (conservative DPO; 0 is the paper's loss). Returns (loss, stats) with
    the implicit rewards beta (pi - ref) of chosen and rejected, their margin, and the fraction
    of pairs whose chosen reward is higher, all detached means.
    """
    chosen = beta * (_upcast(policy_chosen_logp) - _upcast(ref_chosen_logp).detach())
    rejected = beta * (_upcast(policy_rejected_logp) - _upcast(ref_rejected_logp).detach())
    z = chosen - rejected
    logsigmoid = torch.nn.functional.logsigmoid
    losses = -(1 - label_smoothing) * logsigmoid(z) - label_smoothing * logsigmoid(-z)
    with torch.no_grad():
        stats = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(), "margin": z.mean(),
                 "accuracy": (z > 0).to(z.dtype).mean()}
    return losses.mean(), stats
