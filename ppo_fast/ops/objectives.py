"""The policy objectives: one definition each, registered by name (the style of verl's core_algos).

An objective is a pure function of per-token [B, T] tensors — the log-probs y (the only input that
carries a gradient), the old log-probs, the advantages A and the mask m, all read as 0 at masked
positions — and of its parameters. It returns the per-token loss L and the per-token indicators
its statistics count (Terms). Every op that takes a policy objective (ppo_policy_loss,
fused_linear_ppo_loss, the trainer's config, the adapters) takes `objective=<name>` plus that
objective's parameters as keywords, and `resolve` checks them in one place: an unknown name, a
parameter the objective does not take, or a value out of its range is one clear error before any
kernel runs. The result, an Objective (the name and its parameter block), crosses op boundaries
whole (`to_op_args` / `from_op_args`), so a new objective's knobs change no op signature.

Two ways an objective runs:

- compiled: the objectives the kernels specialise on (`kernel=` below: clip with its dual clip,
  cispo, gpg, sapo, on every ratio level, with is_weights) have a Triton and a C++ kernel
  (ppo_fast/ops/policy_loss.py, csrc/policy_math.h), tested equal to the definitions here;
- generic: every other objective, on every backend: its definition under autograd on [B, T]
  tensors. In fused_linear_ppo_loss the head kernels give the log-probs and entropy, autograd gives
  the objective's gradient with respect to them, and the head's backward takes it: no [N, V]
  tensor and no objective-specific kernel (the objective is O(N) work, the head O(N V H)).

The loss of a batch is agg(w L) (ppo_fast/ops/rows.py: agg_loss's modes), w the importance weights
(1 without; an objective that weighs by itself declares own_weights). Adding an objective is one
function and its registration; tests/ops/test_objective_registry.py adds one from a test file.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.checks import require_choice, require_dual_clip, require_nonnegative, require_positive
from ppo_fast.ops.constants import LOG_RATIO_CLAMP
from ppo_fast.ops.reference import RATIO_LEVELS, policy_ratio, valid_only


# ----------------------------------------------------------------------------- the registry
@dataclasses.dataclass
class Terms:
    """What a definition returns: the per-token loss L [B, T] (before importance weights and
    aggregation), and 0/1 indicators [B, T] of what the statistics clipfrac and clipfrac_lower count
    (None: 0)."""

    loss: torch.Tensor
    clipped: Optional[torch.Tensor] = None
    lower: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter: its default and a check(name, value) -> value that raises a clear error."""

    default: Any
    check: Callable[[str, Any], Any]


@dataclasses.dataclass(frozen=True)
class Definition:
    name: str
    fn: Callable[..., Terms]
    params: dict
    kernel: Optional[str] = None  # the compiled kernel's surrogate (constants.SURROGATE_CODES), or None
    own_weights: bool = False  # fn takes is_weights itself
    rule: Optional[Callable[[dict], None]] = None  # a check across parameters


REGISTRY: dict[str, Definition] = {}


def register_objective(name: str, *, params: Optional[dict] = None, kernel: Optional[str] = None,
                       own_weights: bool = False, rule: Optional[Callable[[dict], None]] = None):
    """Decorator: register fn(log_prob, old_log_prob, advantages, mask, **params) -> Terms as `name`."""
    def decorator(fn):
        if name in REGISTRY:
            raise ValueError(f"objective {name!r} is registered already")
        REGISTRY[name] = Definition(name, fn, dict(params or {}), kernel, own_weights, rule)
        return fn

    return decorator


def unregister_objective(name: str) -> None:
    REGISTRY.pop(name, None)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A resolved objective: its registered name and its complete parameter block (every parameter,
    defaults filled in, in the definition's order)."""

    name: str
    params: tuple = ()

    @property
    def definition(self) -> Definition:
        return REGISTRY[self.name]

    @property
    def compiled(self) -> bool:
        """Whether the kernels specialise on this objective (else the generic path runs it)."""
        return self.definition.kernel is not None

    def __getitem__(self, key):
        return dict(self.params)[key]

    def get(self, key, default=None):
        return dict(self.params).get(key, default)

    def to_op_args(self) -> tuple[str, str]:
        """(name, parameters as one string): how a custom op takes it."""
        return self.name, _encode(self.params)

    @classmethod
    def from_op_args(cls, name: str, encoded: str) -> "Objective":
        return _decode(name, encoded)


def _encode(params: tuple) -> str:
    """repr of the (name, value) pairs: Python literals (resolve admits str, finite numbers, bool and
    None), which torch.compile folds to a constant (it traces repr of constants, not json)."""
    return repr(params)


@functools.lru_cache(maxsize=256)  # the op side decodes per call: cached, microseconds
def _decode(name: str, encoded: str) -> Objective:
    return Objective(name, ast.literal_eval(encoded))


def resolve(objective="clip", **params) -> Objective:
    """The Objective for a name and keyword parameters, every one checked; an Objective passes
    through (with no further keywords)."""
    if "surrogate" in params:
        raise TypeError("surrogate: renamed `objective` (objective='cispo', say); its constants are the objective's "
                        "parameters")
    if isinstance(objective, Objective):
        if params:
            raise TypeError(f"objective: given as an Objective, so no parameters besides it, got {sorted(params)}")
        return objective
    require_choice("objective", objective, tuple(REGISTRY))
    definition = REGISTRY[objective]
    unknown = sorted(set(params) - set(definition.params))
    if unknown:
        takes = ", ".join(definition.params) or "none"
        raise ValueError(f"{unknown[0]}: objective {objective!r} takes no parameter {unknown[0]!r} (it takes: "
                         f"{takes})")
    values = {key: spec.check(key, params[key]) if key in params else spec.default
              for key, spec in definition.params.items()}
    if definition.rule is not None:
        definition.rule(values)
    for key, value in values.items():  # what crosses an op boundary as a literal (Objective.to_op_args)
        if not (value is None or isinstance(value, (str, bool)) or (isinstance(value, (int, float))
                                                                   and math.isfinite(value))):
            raise TypeError(f"{key}: a parameter's check must give a str, a finite number, a bool or None, "
                            f"got {value!r}")
    return Objective(objective, tuple(values.items()))


def token_terms(objective: Objective, log_prob, old_log_prob, advantages, mask, is_weights=None) -> Terms:
    """The definition on inputs read as 0 at masked positions (log_prob upcast to at least fp32,
    old_log_prob and advantages detached), the loss times the importance weights."""
    log_prob = valid_only(reference._upcast(log_prob), mask)
    old_log_prob = valid_only(reference._upcast(old_log_prob).detach(), mask)
    advantages = valid_only(reference._upcast(advantages).detach(), mask)
    definition = objective.definition
    params = dict(objective.params)
    if definition.own_weights:
        weights = None if is_weights is None else reference._upcast(is_weights).detach()
        return definition.fn(log_prob, old_log_prob, advantages, mask, is_weights=weights, **params)
    terms = definition.fn(log_prob, old_log_prob, advantages, mask, **params)
    if is_weights is not None:
        terms.loss = terms.loss * valid_only(reference._upcast(is_weights).detach().expand_as(terms.loss), mask)
    return terms


# ----------------------------------------------------------------------------- parameter checks
def _choice(options):
    def check(name, value):
        require_choice(name, value, options)
        return value

    return check


def _finite(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _clip_range(values):
    """1 - clip_low <= 1 + clip_high: the clamp's range is not empty."""
    if values["clip_low"] + values["clip_high"] < 0:
        raise ValueError(f"clip_high: the range [1 - clip_low, 1 + clip_high] is empty (clip_low="
                         f"{values['clip_low']}, clip_high={values['clip_high']})")


RATIO_LEVEL = Param("token", _choice(RATIO_LEVELS))
CLIP_LOW, CLIP_HIGH = Param(0.2, require_nonnegative), Param(0.2, require_nonnegative)


def _clamp(x, low, high):
    return torch.clamp(x, 1.0 - low, 1.0 + high)


# ----------------------------------------------------------------------------- compiled objectives
@register_objective("clip", kernel="clip", params=dict(
    clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=Param(None, lambda name, v: require_dual_clip(v)),
    ratio_level=RATIO_LEVEL))
def clip(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, dual_clip, ratio_level):
    """PPO: L = max(-A rho, -A c(rho)), c(x) = clamp(x, 1 - clip_low, 1 + clip_high), and for A < 0 at
    most -A dual_clip (dual clip); rho the ratio of `ratio_level` (reference.policy_ratio: sequence
    is GSPO). clipfrac: the clipped term won; clipfrac_lower: the dual clip bit."""
    ratio, _ = policy_ratio(log_prob, old_log_prob, mask, ratio_level)
    loss_unclipped, loss_clipped = -advantages * ratio, -advantages * _clamp(ratio, clip_low, clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    lower = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        loss_dual = -advantages * dual_clip
        lower = (loss > loss_dual) & (advantages < 0)
        loss = torch.where(advantages < 0, torch.minimum(loss_dual, loss), loss)
    return Terms(loss, loss_clipped > loss_unclipped, lower)


@register_objective("cispo", kernel="cispo", params=dict(
    clip_low=Param(0.2, _finite), clip_high=Param(0.2, _finite), ratio_level=RATIO_LEVEL), rule=_clip_range)
def cispo(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, ratio_level):
    """CISPO: L = -sg[c(rho)] A log_prob (the clipped weight carries no gradient). clip_low = 1,
    clip_high = C - 1 is TRL's and Liger's absolute cap C (which may be below 1: clip_high < 0).
    clipfrac: rho outside the range."""
    ratio, _ = policy_ratio(log_prob, old_log_prob, mask, ratio_level)
    weight = _clamp(ratio, clip_low, clip_high).detach()
    return Terms(-weight * advantages * log_prob, ratio.detach() != weight)


@register_objective("gpg", kernel="gpg")
def gpg(log_prob, old_log_prob, advantages, mask):
    """GPG / REINFORCE: L = -A log_prob (no ratio)."""
    return Terms(-advantages * log_prob)


@register_objective("sapo", kernel="sapo", params=dict(
    tau_pos=Param(1.0, require_positive), tau_neg=Param(1.05, require_positive), ratio_level=RATIO_LEVEL))
def sapo(log_prob, old_log_prob, advantages, mask, *, tau_pos, tau_neg, ratio_level):
    """SAPO: L = -A (4 / tau) sigmoid(tau (rho - 1)), tau = tau_pos where A > 0, else tau_neg."""
    ratio, _ = policy_ratio(log_prob, old_log_prob, mask, ratio_level)
    tau = torch.where(advantages > 0, advantages.new_tensor(tau_pos), advantages.new_tensor(tau_neg))
    return Terms(-advantages * torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau))


def kernel_constants(objective: Objective) -> tuple:
    """(surrogate, ratio_level, clip_low, clip_high, dual_clip, tau_pos, tau_neg) for the compiled
    kernels, the constants an objective does not have at their neutral values."""
    get = objective.get
    return (objective.definition.kernel, get("ratio_level", "token"), get("clip_low", 0.0), get("clip_high", 0.0),
            get("dual_clip"), get("tau_pos", 1.0), get("tau_neg", 1.0))


# ----------------------------------------------------------------------------- generic objectives
def log_ratio(log_prob, old_log_prob):
    """log_prob - old, clamped to +-LOG_RATIO_CLAMP (exp never overflows)."""
    return torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _peer_mean(x, mask):
    """sum(m x) / (sum(m) + 1e-8): verl's masked_mean, kept where an objective copies verl's selection
    rules (a token's fate must not change with the denominator's rounding)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / (m.sum() + 1e-8)


@register_objective("dro", params=dict(beta=Param(1.0, require_positive)))
def dro(log_prob, old_log_prob, advantages, mask, *, beta):
    """Direct Reward Optimization (verl's `dro`): L = -(A log_prob - beta/2 (log_prob - old)^2)."""
    return Terms(-(log_prob * advantages - 0.5 * beta * (log_prob - old_log_prob).square()))


def _dppo(log_prob, old_log_prob, advantages, ratio_cap, inside_positive, inside_negative):
    """DPPO's shape (arXiv 2602.04879): L = -A sg[min(rho, ratio_cap)] log_prob on the tokens whose
    divergence from the old policy is inside the bound on their advantage's side, 0 elsewhere."""
    ratio = torch.exp(log_ratio(log_prob, old_log_prob))
    inside = torch.where(advantages > 0, inside_positive, inside_negative).detach()
    loss = -advantages * torch.clamp(ratio, max=ratio_cap).detach() * log_prob * inside
    return Terms(loss, ~inside, (ratio > ratio_cap) & inside)


DPPO_PARAMS = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ratio_cap=Param(20.0, require_positive))


@register_objective("dppo_tv", params=DPPO_PARAMS)
def dppo_tv(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, ratio_cap):
    """DPPO-Binary-TV (verl's `dppo_tv`): inside where p - p_old <= clip_high (A > 0) or >= -clip_low
    (A <= 0), p = exp(log_prob); clip_low / clip_high are total-variation bounds, ratio_cap the
    truncation of the detached ratio (verl's clip_ratio_c). clipfrac: outside; clipfrac_lower:
    inside with the ratio past the cap."""
    p, p_old = torch.exp(log_prob), torch.exp(old_log_prob)
    return _dppo(log_prob, old_log_prob, advantages, ratio_cap, (p - p_old) <= clip_high, (p - p_old) >= -clip_low)


@register_objective("dppo_kl", params=DPPO_PARAMS)
def dppo_kl(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, ratio_cap):
    """DPPO-Binary-KL (verl's `dppo_kl`): the binary KL of the token's probability,
    b = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8)); inside where
    b <= clip_high or p <= p_old (A > 0), b <= clip_low or p >= p_old (A <= 0)."""
    p, p_old = torch.exp(log_prob), torch.exp(old_log_prob)
    binary_kl = p_old * (old_log_prob - log_prob) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
    return _dppo(log_prob, old_log_prob, advantages, ratio_cap, (binary_kl <= clip_high) | (p <= p_old),
                 (binary_kl <= clip_low) | (p >= p_old))


@register_objective("geo_mean", params=dict(clip_low=Param(0.4, require_nonnegative),
                                            clip_high=Param(0.4, require_nonnegative)), own_weights=True)
def geo_mean(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, is_weights=None):
    """GMPO (verl's `geo_mean`): a sequence's loss -A_b exp(mean_t clip_A(log_prob - old)), A_b the
    row's mean advantage, clip_A the log-ratio clamped to [-clip_low, clip_high] on the side that
    the advantage's sign makes pessimistic; is_weights enter as their geometric mean per row. The
    sequence's loss is spread over its tokens (each holds it / n_b), so agg seq-mean-token-sum with
    num_seqs = B is GMPO's mean over sequences. clipfrac / clipfrac_lower: the clamp bit where A > 0
    / A < 0."""
    m = mask.to(log_prob.dtype)
    n = m.sum(-1)
    delta = log_prob - old_log_prob
    sign = torch.sign(advantages)
    clamped = torch.clamp(delta, -clip_low, clip_high)
    pessimistic = sign * torch.minimum(sign * delta, sign * clamped)
    ratio = torch.exp((pessimistic * m).sum(-1) / (n + 1e-8))
    row_advantage = (advantages * m).sum(-1) / (n + 1e-8)
    row_loss = -row_advantage * ratio
    if is_weights is not None:
        log_w = torch.log(is_weights.expand_as(delta) + 1e-10)
        row_loss = row_loss * torch.exp((valid_only(log_w, mask) * m).sum(-1) / (n + 1e-8))
    clipped = delta != clamped
    return Terms(row_loss[:, None] / n.clamp(min=1)[:, None] * m, clipped & (advantages > 0),
                 clipped & (advantages < 0))


@register_objective("clip_cov", params=dict(
    clip_low=CLIP_LOW, clip_high=CLIP_HIGH, cov_ratio=Param(0.0002, require_positive),
    cov_lower=Param(1.0, _finite), cov_upper=Param(5.0, _finite)))
def clip_cov(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, cov_ratio, cov_lower, cov_upper):
    """Clip-Cov (verl's `clip_cov`, arXiv 2505.22617): PPO's clipped surrogate, unclamped ratio, with
    the gradient cut on a random max(1, int(cov_ratio n)) of the unclipped tokens whose
    covariance (A - mean A)(log_prob - mean log_prob) lies in (cov_lower, cov_upper) (means over
    the batch's valid tokens; the draw from torch's global generator, as verl's). clipfrac: the
    cut tokens. A batch-level objective: the generic path runs it."""
    valid = mask != 0
    ratio = torch.exp(log_prob - old_log_prob)
    loss_unclipped, loss_clipped = -advantages * ratio, -advantages * _clamp(ratio, clip_low, clip_high)
    with torch.no_grad():
        cov = (advantages - _peer_mean(advantages, mask)) * (log_prob - _peer_mean(log_prob, mask))
        cov = cov.masked_fill(~valid | ((loss_clipped > loss_unclipped) & valid), -torch.inf)
        candidates = torch.nonzero((cov < cov_upper) & (cov > cov_lower) & valid)
        n_cut = max(int(cov_ratio * valid.sum().item()), 1)
        candidates = candidates[torch.randperm(len(candidates))[:min(n_cut, len(candidates))]]
        keep = torch.ones_like(ratio)
        keep[candidates[:, 0], candidates[:, 1]] = 0
    return Terms(torch.maximum(loss_unclipped, loss_clipped) * keep, keep == 0)


@register_objective("kl_cov", params=dict(cov_ratio=Param(0.0002, require_positive), kl_coef=Param(1.0, _finite)))
def kl_cov(log_prob, old_log_prob, advantages, mask, *, cov_ratio, kl_coef):
    """KL-Cov (verl's `kl_cov`, arXiv 2505.22617): L = -A rho (unclamped ratio), plus kl_coef |log_prob -
    old| on the max(1, int(cov_ratio n)) valid tokens of largest covariance (A - mean A)(log_prob -
    mean log_prob) over the batch. clipfrac: those tokens. A batch-level objective: the generic path
    runs it."""
    delta = log_prob - old_log_prob
    loss = -advantages * torch.exp(delta)
    penalised = torch.zeros_like(loss, dtype=torch.bool)
    flat_valid = torch.nonzero((mask != 0).reshape(-1), as_tuple=True)[0]
    if len(flat_valid):
        with torch.no_grad():
            adv = advantages.reshape(-1)[flat_valid].cpu()
            logp = log_prob.detach().reshape(-1)[flat_valid].cpu()
            cov = (adv - adv.mean()) * (logp - logp.mean())
            top = flat_valid[torch.topk(cov, max(1, int(len(cov) * cov_ratio)), largest=True).indices.to(
                flat_valid.device)]
            penalised.view(-1)[top] = True
        loss = torch.where(penalised, loss + kl_coef * delta.abs(), loss)
    return Terms(loss, penalised)


@register_objective("clip_delta", params=dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                              delta=Param(None, lambda name, v: None if v is None
                                                          else require_positive(name, v)),
                                              ratio_level=RATIO_LEVEL))
def clip_delta(log_prob, old_log_prob, advantages, mask, *, clip_low, clip_high, delta, ratio_level):
    """TRL's and Liger's two-sided clipping: L = -min(min(rho, delta) A, c(rho) A). For delta >= 1 +
    clip_high it is clip with dual_clip = delta (the compiled path; use that); below, delta also caps
    rho where A > 0. clipfrac: rho past the bound on its advantage's side (TRL's and Liger's region
    flags; for delta = None, clip's "the clipped term won")."""
    ratio, _ = policy_ratio(log_prob, old_log_prob, mask, ratio_level)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss_capped, loss_clipped = -advantages * capped, -advantages * _clamp(ratio, clip_low, clip_high)
    past = ((ratio > 1.0 + clip_high) & (advantages > 0)) | ((ratio < 1.0 - clip_low) & (advantages < 0))
    return Terms(torch.maximum(loss_capped, loss_clipped), past)


@register_objective("vespo", params=dict(k_pos=Param(2.0, _finite), lambda_pos=Param(3.0, _finite),
                                         k_neg=Param(3.0, _finite), lambda_neg=Param(2.0, _finite)),
                    own_weights=True)
def vespo(log_prob, old_log_prob, advantages, mask, *, k_pos, lambda_pos, k_neg, lambda_neg, is_weights=None):
    """VESPO (TRL's and Liger's `vespo`): L = -sg[phi_b] A log_prob with the gamma weight of the
    sequence's ratio w_b = exp(clamp(sum_t clamp(log_prob - old, +-20) + sum_t log is_t, log 1e-8, 20)),
    phi(w) = exp(lambda + k log w - lambda w) (k, lambda by the sign of A, lambda >= 1e-4; phi(1) = 1;
    non-finite phi -> 0). is_weights (the sampler's importance ratios) enter w in log space, each
    clamped to [log 1e-8, 20]: per token summed over the valid tokens (TRL also reads them at padding,
    where its ratios are 1), per sequence [B, 1] once."""
    phi = vespo_weights(log_prob, old_log_prob, advantages, mask, is_weights, k_pos, lambda_pos, k_neg, lambda_neg)
    return Terms(-phi * advantages * log_prob)


@torch.no_grad()
def vespo_weights(log_prob, old_log_prob, advantages, mask, is_weights, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's gamma weights phi [B, T] (constant along a row; the docstring of vespo)."""
    m = mask.to(log_prob.dtype)
    floor = math.log(1e-8)
    seq_log_ratio = (log_ratio(log_prob, old_log_prob) * m).sum(-1, keepdim=True)
    if is_weights is not None:  # per token: summed over the valid ones; per sequence [B, 1]: once
        log_is = torch.clamp(torch.log(is_weights), floor, LOG_RATIO_CLAMP)
        per_token = log_is.shape[-1] != 1 or log_prob.shape[-1] == 1
        seq_log_ratio = seq_log_ratio + (valid_only(log_is, mask).sum(-1, keepdim=True) if per_token else log_is)
    log_w = torch.clamp(seq_log_ratio, floor, LOG_RATIO_CLAMP)
    nonneg = advantages >= 0  # A is per sequence in these trainers; per token here, as theirs broadcast
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
