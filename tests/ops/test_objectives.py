"""The policy objectives of ppo_policy_loss and fused_linear_ppo_loss (surrogates clip / cispo /
gpg / sapo, ratio levels token / sequence / sequence-token, importance weights per token or per
sequence) on every backend, against float64 and against closed forms; rollout_correction."""
import math

import pytest
import torch
from support import DEVICE, assert_close_f64, backends_for, check_loss, on_backend, ragged_mask, randn

from ppo_fast.ops import (fused_linear_ppo_loss, objectives, ppo_policy_loss, reference, rollout_correction,
                          rollout_rejection)

OP = "ppo_policy_loss"
STATS = ("clipfrac", "approx_kl", "clipfrac_lower")
COMPILED = [name for name, definition in objectives.REGISTRY.items() if definition.kernel]
MODES = [(s, level) for s in COMPILED for level in reference.RATIO_LEVELS if not (s == "gpg" and level != "token")]
WEIGHTS = ["none", "token", "sequence"]
AGGS = reference.AGG_MODES


def inputs(B, T, dtype=torch.float32, seed=0, adv_per_row=False):
    old = randn(B, T, seed=seed, scale=0.5) - 2.0
    log_prob = (old + randn(B, T, seed=seed + 1, scale=0.3)).to(dtype)
    adv = randn(B, 1, seed=seed + 2).expand(B, T).contiguous() if adv_per_row else randn(B, T, seed=seed + 2)
    mask = ragged_mask(B, T, seed=seed, empty_rows=[1] if B > 2 else [])
    return log_prob, old.to(dtype), adv, mask


def weights_for(kind, B, T, seed=9):
    if kind == "none":
        return None
    return (randn(B, T if kind == "token" else 1, seed=seed).abs() + 0.1)


def objective(name, level, clip_high=0.28):
    """The objective's keywords: each compiled objective with the parameters it takes."""
    return {"clip": dict(clip_low=0.2, clip_high=clip_high, dual_clip=3.0, ratio_level=level),
            "cispo": dict(clip_low=0.2, clip_high=clip_high, ratio_level=level), "gpg": {},
            "sapo": dict(tau_pos=1.0, tau_neg=1.05, ratio_level=level)}[name] | {"objective": name}


def level_of(name, level):
    return {} if name == "gpg" else {"ratio_level": level}


@pytest.mark.parametrize("surrogate, level", MODES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_every_objective_matches_float64(backend, surrogate, level, weights):
    agg = AGGS[(MODES.index((surrogate, level)) + WEIGHTS.index(weights)) % 3]  # every agg mode over the grid
    log_prob, old, adv, mask = inputs(5, 37)
    kwargs = dict(agg=agg, is_weights=weights_for(weights, 5, 37), **objective(surrogate, level))
    check_loss(ppo_policy_loss, reference.ppo_policy_loss, log_prob, (old, adv, mask), kwargs, STATS)


@pytest.mark.parametrize("surrogate, level", MODES)
@pytest.mark.parametrize("shape, dtype", [((3, 1), torch.float32), ((4, 1100), torch.float32),
                                          ((5, 37), torch.bfloat16)])
def test_objectives_at_odd_shapes_and_bf16(backend, surrogate, level, shape, dtype):
    log_prob, old, adv, mask = inputs(*shape, dtype=dtype, seed=3)
    kwargs = dict(agg="seq-mean-token-mean", is_weights=weights_for("token", *shape), **objective(surrogate, level))
    check_loss(ppo_policy_loss, reference.ppo_policy_loss, log_prob, (old, adv, mask), kwargs, STATS)


def closed_form_case(backend, surrogate, level, adv_per_row):
    """On policy (log_prob = old): every ratio is 1, nothing clips. Returns (loss, grad, stats, adv,
    mask, w, n) with w per-token weights and token-mean aggregation."""
    B, T = 4, 9
    log_prob, _, adv, mask = inputs(B, T, seed=5, adv_per_row=adv_per_row)
    w = weights_for("token", B, T, seed=6)
    x = log_prob.detach().clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, log_prob.detach(), adv, mask, is_weights=w, objective=surrogate,
                                  **level_of(surrogate, level))
    (grad,) = torch.autograd.grad(loss, x)
    m = mask.float()
    return loss, grad, stats, adv, m, w, x.detach(), m.sum()


@pytest.mark.parametrize("surrogate", ["clip", "sapo"])
def test_on_policy_gradients_are_the_policy_gradient(backend, surrogate):
    """At ratio 1 the clip and SAPO surrogates both give d loss / d log_prob = -w A m / n (SAPO's
    gate has slope 1 there), and the token and sequence-token ratios agree with it."""
    for level in ("token", "sequence-token"):
        loss, grad, stats, adv, m, w, _, n = closed_form_case(backend, surrogate, level, adv_per_row=False)
        torch.testing.assert_close(grad, -w * adv * m / n)
        tau = torch.where(adv > 0, 1.0, 1.05)
        scale = 1.0 if surrogate == "clip" else 2.0 / tau  # SAPO: (4 / tau) sigmoid(0) = 2 / tau
        torch.testing.assert_close(loss, -(w * adv * m * scale).sum() / n)
        assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0


def test_sequence_ratio_differentiates_the_mean(backend):
    """GSPO: with s = exp(mean of the row's log-ratios), d loss / d log_prob_t = (s / n_b) sum_t' w A / n
    over the row, the same for every valid token of it; GSPO-token gives each token its own -w A / n."""
    loss, grad, _, adv, m, w, _, n = closed_form_case(backend, "clip", "sequence", adv_per_row=False)
    n_b = m.sum(-1, keepdim=True).clamp(min=1)
    expected = -(w * adv * m).sum(-1, keepdim=True) / n_b * m / n
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, -(w * adv * m).sum() / n)


def test_cispo_and_gpg_closed_forms(backend):
    for surrogate in ("cispo", "gpg"):
        loss, grad, stats, adv, m, w, log_prob, n = closed_form_case(backend, surrogate, "token", adv_per_row=False)
        torch.testing.assert_close(loss, -(w * adv * log_prob * m).sum() / n)  # weight clip(1) = 1
        torch.testing.assert_close(grad, -w * adv * m / n)
        assert stats["clipfrac"] == 0


def test_cispo_clips_the_weight_and_counts_it(backend):
    """Ratios far outside the range: CISPO's weight is the bound, its gradient -c A, and clipfrac counts them."""
    B, T = 2, 4
    old = torch.full((B, T), -2.0, device=DEVICE)
    log_prob = old + torch.tensor([[1.0, -1.0, 0.0, 0.01]] * B, device=DEVICE)
    adv, mask = torch.ones(B, T, device=DEVICE), torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    x = log_prob.clone().requires_grad_()
    loss, stats = ppo_policy_loss(x, old, adv, mask, objective="cispo", clip_low=0.2, clip_high=0.3)
    (grad,) = torch.autograd.grad(loss, x)
    c = torch.tensor([1.3, 0.8, 1.0, math.exp(0.01)], device=DEVICE)
    torch.testing.assert_close(grad, -c.expand(B, T) / (B * T))
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_importance_weights_weigh_losses_not_counts(backend):
    log_prob, old, adv, mask = inputs(5, 37, seed=7)
    for agg in AGGS:
        plain, _ = ppo_policy_loss(log_prob, old, adv, mask, agg=agg)
        doubled, _ = ppo_policy_loss(log_prob, old, adv, mask, agg=agg, is_weights=torch.full((5, 1), 2.0,
                                                                                              device=DEVICE))
        torch.testing.assert_close(doubled, 2 * plain)
        per_row = randn(5, 1, seed=8).abs()
        a, stats_a = ppo_policy_loss(log_prob, old, adv, mask, agg=agg, is_weights=per_row)
        b, stats_b = ppo_policy_loss(log_prob, old, adv, mask, agg=agg, is_weights=per_row.expand(5, 37))
        torch.testing.assert_close(a, b)
        assert stats_a == stats_b


def test_fully_masked_and_empty_batches(backend):
    for surrogate, level in MODES:
        log_prob, old, adv, _ = inputs(3, 9)
        mask = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
        x = log_prob.clone().requires_grad_()
        loss, stats = ppo_policy_loss(x, old, adv, mask, is_weights=weights_for("sequence", 3, 9),
                                      objective=surrogate, **level_of(surrogate, level))
        loss.backward()
        assert loss.item() == 0 and all(v.item() == 0 for v in stats.values()) and torch.all(x.grad == 0)
        empty = torch.zeros(0, 9, device=DEVICE)
        loss, _ = ppo_policy_loss(empty, empty, empty, empty.bool(), objective=surrogate, **level_of(surrogate, level))
        assert loss.item() == 0


def test_bad_objectives_give_clear_errors():
    log_prob, old, adv, mask = inputs(3, 5)
    cases = [
        (dict(objective="ppo2"), ValueError, r"objective: expected one of \('clip', 'cispo', 'gpg', 'sapo', .*\), got 'ppo2'"),
        (dict(ratio_level="seq"), ValueError, r"ratio_level: expected one of \('token', 'sequence', 'sequence-token'\)"),
        (dict(objective="gpg", ratio_level="sequence"), ValueError,
         r"ratio_level: objective 'gpg' takes no parameter 'ratio_level' \(it takes: none\)"),
        (dict(objective="cispo", dual_clip=3.0), ValueError,
         r"dual_clip: objective 'cispo' takes no parameter 'dual_clip' \(it takes: clip_low, clip_high, ratio_level\)"),
        (dict(objective="sapo", tau_neg=0.0), ValueError, r"tau_neg: expected a finite value > 0, got 0.0"),
        (dict(surrogate="cispo"), TypeError, r"surrogate: renamed `objective`"),
        (dict(is_weights=torch.ones(3, 4, device=DEVICE)), ValueError,
         r"is_weights: expected shape \(3, 5\) \(per token\) or \(3, 1\) \(per sequence\), got \(3, 4\)"),
        (dict(is_weights=torch.ones(3, 5, dtype=torch.long, device=DEVICE)), TypeError, r"is_weights: expected dtype"),
    ]
    if DEVICE.type == "cpu":  # value checks (see ppo_fast.ops.checks)
        negative = torch.ones(3, 5, device=DEVICE)
        negative[0, mask[0].nonzero()[0, 0]] = -1.0
        cases.append((dict(is_weights=negative), ValueError, r"is_weights: expected importance weights >= 0"))
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ppo_policy_loss(log_prob, old, adv, mask, **kwargs)


# ----------------------------------------------------------------------------- fused linear -> PPO loss
def fused_inputs(B, T, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / H**0.5 * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = reference.fused_linear_logprobs(hidden, weight, labels)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    return [t.to(DEVICE) for t in (hidden, weight, labels, old, adv)] + [ragged_mask(B, T, seed=seed), ref.to(DEVICE)]


@pytest.mark.op("fused_linear_ppo_loss")
@pytest.mark.parametrize("surrogate, level", MODES)
@pytest.mark.parametrize("weights", ["token", "sequence"])
def test_fused_loss_equals_the_composition_for_every_objective(backend, surrogate, level, weights):
    """fused_linear_ppo_loss == ppo_policy_loss(fused_linear_logprobs(...)) + entropy + KL terms, in
    float64, for each objective; whole rows per chunk (chunk_size smaller than a row's tokens too)."""
    B, T, H, V = 4, 13, 8, 67
    hidden, weight, labels, old, adv, mask, ref = fused_inputs(B, T, H, V, seed=11)
    kwargs = dict(ref_log_prob=ref, kl_coef=0.05, entropy_coef=0.01, agg="seq-mean-token-mean",
                  is_weights=weights_for(weights, B, T), **objective(surrogate, level))

    def run(fn, h, w, **extra):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss, stats = fn(h, w, labels, old, adv, mask, **kwargs, **extra)
        return loss, stats, torch.autograd.grad(loss * 1.7, (h, w))

    got = run(fused_linear_ppo_loss, hidden, weight, chunk_size=5)
    want = run(reference.fused_linear_ppo_loss, hidden.double(), weight.double())
    assert_close_f64(got[0], want[0], "loss")
    for name in want[1]:
        assert_close_f64(got[1][name], want[1][name], name)
    for name, g, g64 in zip(("hidden", "weight"), got[2], want[2]):
        assert_close_f64(g, g64, f"grad {name}", magnitude=10.0)


@pytest.mark.op("fused_linear_ppo_loss")
def test_fused_micro_batches_add_up_with_an_objective(backend):
    """GSPO + SAPO + per-token importance weights: micro-batches with the global counts give the big
    batch's loss and gradients."""
    B, T, H, V = 6, 11, 8, 53
    hidden, weight, labels, old, adv, mask, ref = fused_inputs(B, T, H, V, seed=13)
    w = weights_for("token", B, T)
    n_tokens, n_seqs = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    kwargs = dict(ratio_level="sequence", objective="sapo", agg="seq-mean-token-mean", num_tokens=n_tokens,
                  num_seqs=n_seqs, ref_log_prob=ref, kl_coef=0.1)

    def grads(rows):
        h, wt = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, _ = fused_linear_ppo_loss(h[rows], wt, labels[rows], old[rows], adv[rows], mask[rows],
                                        is_weights=w[rows], **{**kwargs, "ref_log_prob": ref[rows]})
        return loss, torch.autograd.grad(loss, (h, wt))

    big_loss, big = grads(slice(0, B))
    parts = [grads(slice(i, i + 2)) for i in range(0, B, 2)]
    torch.testing.assert_close(sum(p[0] for p in parts), big_loss, rtol=1e-5, atol=1e-6)
    for i in range(2):
        torch.testing.assert_close(sum(p[1][i] for p in parts), big[i], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- rollout correction
def correction_inputs(B=4, T=17, seed=20, spread=0.4):
    old = randn(B, T, seed=seed, scale=0.5) - 2.0
    rollout = old + randn(B, T, seed=seed + 1, scale=spread)
    return old, rollout, ragged_mask(B, T, seed=seed, empty_rows=[2])


@pytest.mark.op("rollout_correction")
def test_rollout_correction_closed_forms(backend):
    old, rollout, mask = correction_inputs()
    m = mask.float()
    r = torch.exp(old - rollout) * m
    w, keep, stats = rollout_correction(old, rollout, mask, level="token", mode="truncate", high=1.5)
    torch.testing.assert_close(w, r.clamp(max=1.5) * m)
    assert torch.equal(keep, mask)
    w, keep, stats = rollout_correction(old, rollout, mask, level="token", mode="mask", low=0.8, high=1.25)
    inside = (r >= 0.8) & (r <= 1.25)
    torch.testing.assert_close(w, torch.where(inside, r, 0.0) * m)
    assert torch.equal(keep, mask & inside)
    torch.testing.assert_close(stats["is_outside_frac"], ((~inside) & mask).float().sum() / m.sum())
    log_seq = ((old - rollout) * m).sum(-1, keepdim=True)
    w, _, _ = rollout_correction(old, rollout, mask, level="sequence", mode="truncate", low=0.5, high=2.0)
    has_tokens = (m.sum(-1, keepdim=True) > 0).float()
    torch.testing.assert_close(w, log_seq.exp().clamp(0.5, 2.0) * has_tokens)
    w, keep, _ = rollout_correction(old, rollout, mask, level="geometric", mode="mask", low=0.9, high=1.1)
    geo = (log_seq / m.sum(-1, keepdim=True).clamp(min=1)).exp()
    torch.testing.assert_close(w, torch.where((geo >= 0.9) & (geo <= 1.1), geo, 0.0) * has_tokens)
    assert w.shape == (4, 1) and keep.shape == mask.shape
    torch.testing.assert_close(stats["rollout_k1"], ((rollout - old) * m).sum() / m.sum())
    torch.testing.assert_close(stats["rollout_ppl_ratio"], stats["rollout_k1"].exp())


@pytest.mark.op("rollout_correction")
def test_rollout_correction_matches_float64_and_feeds_the_loss(backend):
    old, rollout, mask = correction_inputs(seed=23)
    for level in reference.CORRECTION_LEVELS:
        for mode in reference.CORRECTION_MODES:
            w, keep, stats = rollout_correction(old, rollout, mask, level=level, mode=mode, low=0.7, high=1.4)
            w64, keep64, stats64 = reference.rollout_correction(old.double(), rollout.double(), mask, level=level,
                                                                mode=mode, low=0.7, high=1.4)
            assert_close_f64(w, w64, f"{level} {mode} weights")
            assert torch.equal(keep, keep64) and not w.requires_grad
            for name in stats64:
                assert_close_f64(stats[name], stats64[name], name)
    log_prob = old + randn(*old.shape, seed=24, scale=0.1)
    w, _, _ = rollout_correction(old, rollout, mask, level="sequence", high=2.0)
    loss, _ = ppo_policy_loss(log_prob, old, randn(*old.shape, seed=25), mask, is_weights=w)
    assert torch.isfinite(loss)


def test_a_nan_rollout_log_prob_is_ratio_one_as_trls_mapping(backend):
    """vLLM gives NaN for a token it could not score; TRL's correction maps its log-ratio to 0
    (nan_to_num of the masked difference): ratio 1, at token and sequence level alike."""
    old = randn(3, 6, seed=70, scale=0.3) - 2
    rollout = old + randn(3, 6, seed=71, scale=0.1)
    rollout[0, 2] = rollout[2, 0] = float("nan")
    mask = torch.ones(3, 6, dtype=torch.bool, device=DEVICE)
    mask[1, 4:] = False
    trl_diff = torch.nan_to_num((old - rollout) * mask, nan=0.0)  # TRL's own lines
    for level, trl_log_ratio in (("token", trl_diff), ("sequence", trl_diff.sum(-1, keepdim=True))):
        with on_backend(backend):
            weights, _, _ = rollout_correction(old, rollout, mask, level=level, mode="truncate", high=2.0)
        want = torch.clamp(torch.exp(trl_log_ratio), max=2.0)
        torch.testing.assert_close(weights, want * (mask if level == "token" else 1.0))


@pytest.mark.op("rollout_rejection")
def test_rollout_rejection_closed_forms(backend):
    """Each level and estimator against its formula on the valid tokens (verl's own function is the
    oracle in tests/integrations/test_verl.py); a NaN rollout log-prob is r = 0 (kept); bf16 inputs
    decide as their fp32 values; an empty batch keeps nothing and reports 0."""
    old, rollout, mask = correction_inputs(seed=26)
    rollout[0, 1] = float("nan")
    m, valid = mask.double(), mask.bool()
    r = torch.nan_to_num((old - rollout).double(), nan=0.0) * m
    k1, k2, k3 = -r, 0.5 * r * r, torch.expm1(r) - r
    cases = {
        "token_k2": (k2 <= 0.05),
        "token_k1": (k1 >= math.log(0.8)) & (k1 <= math.log(1.25)),
        "seq_sum_k3": ((k3 * m).sum(-1, keepdim=True) <= 0.3).expand_as(r),
        "seq_mean_k1": (lambda s: (s >= math.log(0.9)) & (s <= math.log(1.1)))(
            (k1 * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(r),
        "seq_max_k2": (torch.where(valid, k2, -math.inf).amax(-1, keepdim=True).nan_to_num(neginf=0.0) <= 0.1).expand_as(r),
    }
    bounds = {"token_k2": 0.05, "token_k1": (0.8, 1.25), "seq_sum_k3": 0.3, "seq_mean_k1": (0.9, 1.1), "seq_max_k2": 0.1}
    for name, kept in cases.items():
        keep, stats = rollout_rejection(old, rollout, mask, criteria={name: bounds[name]})
        assert torch.equal(keep, valid & kept), name
        assert keep[0, 1] == (valid[0, 1] and kept[0, 1])
        torch.testing.assert_close(stats["masked_fraction"].double(), ((valid & ~kept).sum() / m.sum()), msg=name)
    keep, stats = rollout_rejection(old, rollout, mask, criteria=bounds)
    assert torch.equal(keep, valid & torch.stack(list(cases.values())).all(0))
    assert 0 < stats["masked_fraction"] < 1
    keep16, _ = rollout_rejection(old.bfloat16(), rollout.bfloat16(), mask, criteria=bounds)
    keep32, _ = rollout_rejection(old.bfloat16().float(), rollout.bfloat16().float(), mask, criteria=bounds)
    assert torch.equal(keep16, keep32)
    empty = old[:0]
    keep, stats = rollout_rejection(empty, empty, mask[:0], criteria=bounds)
    assert keep.shape == (0, old.shape[1]) and all(v.item() == 0 for v in stats.values())


def test_rollout_correction_bad_inputs():
    old, rollout, mask = correction_inputs()
    with pytest.raises(ValueError, match=r"level: expected one of \('token', 'sequence', 'geometric'\), got 'seq'"):
        rollout_correction(old, rollout, mask, level="seq")
    with pytest.raises(ValueError, match=r"mode: expected one of \('truncate', 'mask'\), got 'clip'"):
        rollout_correction(old, rollout, mask, mode="clip")
    with pytest.raises(ValueError, match=r"high: expected an upper bound > 0"):
        rollout_correction(old, rollout, mask, high=0.0)
    with pytest.raises(ValueError, match=r"low: expected None or a bound in \[0, high=2.0\], got 3.0"):
        rollout_correction(old, rollout, mask, low=3.0)
    with pytest.raises(ValueError, match=r"rollout_log_prob: expected shape \(4, 17\)"):
        rollout_correction(old, rollout[:, :3], mask)


@pytest.mark.parametrize("backend", backends_for("rollout_correction"))
def test_rollout_correction_runs_on_every_backend_without_a_kernel(backend):
    """A reference-only op: a forced kernel backend runs the reference (nothing to force)."""
    old, rollout, mask = correction_inputs()
    with on_backend(backend):
        w, _, _ = rollout_correction(old, rollout, mask)
    assert w.shape == old.shape


@pytest.mark.op("fused_linear_ppo_loss")
def test_fused_loss_with_a_softcap_and_logit_scale_equals_the_composition(backend):
    B, T, H, V = 3, 9, 8, 41
    hidden, weight, labels, old, adv, mask, ref = fused_inputs(B, T, H, V, seed=17)
    kwargs = dict(ref_log_prob=ref, kl_coef=0.05, entropy_coef=0.01, softcap=4.0, logit_scale=0.7, temperature=0.9)

    def run(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss, stats = fn(h, w, labels, old, adv, mask, **kwargs)
        return loss, stats, torch.autograd.grad(loss, (h, w))

    got, want = run(fused_linear_ppo_loss, hidden, weight), run(reference.fused_linear_ppo_loss, hidden.double(),
                                                               weight.double())
    assert_close_f64(got[0], want[0], "loss")
    for name in want[1]:
        assert_close_f64(got[1][name], want[1][name], name)
    for g, g64 in zip(got[2], want[2]):
        assert_close_f64(g, g64, "grad", magnitude=10.0)


@pytest.mark.op("fused_linear_ppo_loss")
def test_on_policy_without_old_log_probs(backend):
    """old_log_prob=None: the ratio is taken against the op's own log-probs, detached (TRL's and
    Liger's GRPO without old log-probs): the same as passing those log-probs."""
    B, T, H, V = 3, 8, 8, 37
    hidden, weight, labels, _, adv, mask, ref = fused_inputs(B, T, H, V, seed=19)
    with torch.no_grad():
        own = reference.fused_linear_logprobs(hidden.double(), weight.double(), labels).float()
    for level in ("token", "sequence"):
        results = []
        for old in (None, own):
            h = hidden.detach().clone().requires_grad_()
            loss, stats = fused_linear_ppo_loss(h, weight, labels, old, adv, mask, ref_log_prob=ref, kl_coef=0.1,
                                                ratio_level=level)
            results.append((loss, stats["approx_kl"], torch.autograd.grad(loss, h)[0]))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert results[0][1] == 0
