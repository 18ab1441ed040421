"""The numeric contract (ppo_fast/ops/reference.py's docstring) on the inputs real models produce:
logits over the whole finite range — finfo.min masks (transformers' logits processors), rows
whose entries all sit near +-1e4, +-1e8 or +-1e30, -inf mixed in — in fp32 and bf16, forward,
backward (random upstream gradients on logp and entropy) and statistics, on every backend;
weights holding NaN; every option at its range limits.

The oracle is the float64 reference evaluated on the kernels' own transformed logits
x = fp32(z * fp32(1 / T)) (the contract: exact to fp32 rounding of the differences x - max x, on
that x; for T = 1, x = z). Errors are checked per element, since one row's log-prob may be
-3e38 (a masked label) while its neighbour's is -1.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import DEVICE, backends_for, on_backend, randn

from ppo_fast import ops
from ppo_fast.ops import reference

IGNORE = -100
LOGPROB_BACKENDS = backends_for("logprobs_from_logits")
FUSED_BACKENDS = backends_for("fused_linear_ppo_loss")
POLICY_BACKENDS = backends_for("ppo_policy_loss")
MAGNITUDES = (1e4, 1e8, 1e30)


# ----------------------------------------------------------------------------- inputs
def extreme_logits(rows, V, dtype, seed):
    """[rows, V] logits, each row one family: normal (scale 3), a cluster at +-1e4/1e8/1e30 (entries a
    few units of the dtype's spacing apart there), constant, or near-one-hot; then finfo.min masks
    and -inf entries over random subsets (a row may end up with a single unmasked entry)."""
    g = np.random.default_rng(seed)
    lowest = torch.finfo(dtype).min
    out = torch.empty(rows, V, dtype=torch.float64)
    for r in range(rows):
        family = g.integers(0, 4)
        if family == 0:
            row = torch.from_numpy(g.normal(size=V) * 3.0)
        elif family == 1:
            center = float(g.choice(MAGNITUDES)) * float(g.choice((-1.0, 1.0)))
            c = torch.tensor(center, dtype=dtype)
            spacing = (torch.nextafter(c.float(), torch.tensor(math.inf)) - c.float()).item()
            if dtype == torch.bfloat16:
                spacing *= 2 ** 16  # bf16 keeps 8 bits of the fp32 mantissa's 24
            row = c.double() + torch.from_numpy(g.integers(0, 12, size=V).astype(np.float64)) * spacing
        elif family == 2:
            row = torch.full((V,), float(g.choice((0.0, -7.5) + MAGNITUDES)))
        else:
            row = torch.from_numpy(g.normal(size=V))
            row[g.integers(0, V)] += 40.0
        out[r] = row
        masked = torch.from_numpy(g.random(V) < g.choice((0.0, 0.3, 0.9)))
        out[r][masked] = lowest
        out[r][torch.from_numpy(g.random(V) < g.choice((0.0, 0.1)))] = -math.inf
        if bool(torch.isneginf(out[r]).all()):  # keep one entry: an all -inf row is NaN (tested apart)
            out[r][g.integers(0, V)] = 0.0
    labels = torch.from_numpy(g.integers(0, V, size=rows))
    labels[torch.from_numpy(g.random(rows) < 0.15)] = IGNORE
    return out.to(dtype).to(DEVICE), labels.to(DEVICE)


def kernel_x(logits, temperature, logit_scale):
    """The transformed logits as every kernel forms them: fp32(z * fp32(logit_scale / T))."""
    inv_t = torch.tensor(logit_scale / temperature, dtype=torch.float32)
    return logits.float() * inv_t.to(logits.device), inv_t.item()


# ----------------------------------------------------------------------------- per-element checks
def check_close(actual, expected, name, *, rtol, atol):
    """|a - e| <= rtol |e| + atol per element (atol a tensor or a float); non-finite where the
    oracle is, with the same value (NaN, or the same infinity)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(expected)
    finite = torch.isfinite(expected)
    same_special = (torch.isnan(actual) & torch.isnan(expected)) | (actual == expected)
    assert torch.equal(torch.isfinite(actual), finite) and bool(same_special[~finite].all()), \
        f"{name}: non-finite entries differ from the oracle at {(~(finite | same_special)).nonzero()[:5].tolist()}"
    err = (actual - expected).abs()[finite]
    bound = (rtol * expected.abs() + atol)[finite]
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (f"{name}: error {err[worst].item():.3g} > bound {bound[worst].item():.3g} "
                                        f"(expected {expected[finite][worst].item():.6g}, got "
                                        f"{actual[finite][worst].item():.6g})")


def oracle(logits, labels, up_logp, up_entropy, *, temperature, logit_scale, softcap):
    """(logp, entropy, stats, grad_logits) in float64. Without a softcap on the kernels' x (the
    gradient to z is the one to x times fp32(logit_scale / T)); with one on z itself (x is then
    bounded by softcap / T, where fp32's rounding of x is below the tolerance)."""
    if softcap is None:
        x32, inv_t = kernel_x(logits, temperature, logit_scale)
        x = x32.double().requires_grad_()
        logp, entropy, stats = reference.logprobs_from_logits(x, labels, return_stats=True)
        (grad,) = torch.autograd.grad((logp * up_logp).sum() + (entropy * up_entropy).sum(), x)
        return logp, entropy, stats, grad * inv_t, x32.double()
    z = logits.double().requires_grad_()
    kw = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    logp, entropy, stats = reference.logprobs_from_logits(z, labels, return_stats=True, **kw)
    (grad,) = torch.autograd.grad((logp * up_logp).sum() + (entropy * up_entropy).sum(), z)
    return logp, entropy, stats, grad, reference.transformed_logits(z.detach(), **kw)


def check_logprobs(logits, labels, *, temperature=1.0, logit_scale=1.0, softcap=None, seed=0):
    """logprobs_from_logits(return_stats=True) on the active backend: values, statistics and the
    gradient against the oracle, per element."""
    V = logits.shape[-1]
    z = logits.detach().clone().requires_grad_()
    kw = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    logp, entropy, stats = ops.logprobs_from_logits(z, labels, return_stats=True, **kw)
    g = torch.Generator().manual_seed(seed)
    up_logp, up_entropy = (torch.randn(logp.shape, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    (grad,) = torch.autograd.grad((logp * up_logp.float()).sum() + (entropy * up_entropy.float()).sum(), z)
    assert torch.equal(z.detach(), logits), "the op wrote into its input"
    logp64, entropy64, stats64, grad64, x64 = oracle(logits, labels, up_logp, up_entropy, **kw)

    # fp32 error budget: log p = (x_y - m) - log d carries eps |log p| and the error of the sum d
    # (a few eps log V); H, log sum p^2 likewise; the gradient entries are O(|upstream| / T)
    budget = 4e-6 * (1 + math.log(V))
    check_close(logp, logp64, "logp", rtol=3e-5, atol=budget)
    check_close(entropy, entropy64, "entropy", rtol=3e-5, atol=budget)
    check_close(stats["log_sum_sq_probs"], stats64["log_sum_sq_probs"], "log_sum_sq_probs", rtol=3e-5, atol=budget)
    # mean_logit is an fp32 sum of the row's x: error up to a few eps sum |x| / V; a row whose
    # finite entries sum past fp32's range is -inf or +inf there (not checked against float64)
    abs_sum = x64.abs().nan_to_num(posinf=0.0).sum(-1)
    in_range = abs_sum < 1e37
    check_close(stats["mean_logit"][in_range], stats64["mean_logit"][in_range], "mean_logit", rtol=1e-5,
                atol=(1e-5 * abs_sum / V)[in_range])
    assert torch.equal(stats["is_top1"], stats64["is_top1"]), "is_top1"
    rtol = 3e-5 if logits.dtype == torch.float32 else 2.0**-7
    scale = max(abs(logit_scale / temperature), 1e-30) * (up_logp.abs().max() + up_entropy.abs().max()).item()
    check_close(grad, grad64, "grad_logits", rtol=rtol, atol=budget * scale)


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.sampled_from([1, 3, 17, 100, 257, 1500]),
       temperature=st.sampled_from([1.0, 0.7, 1.3]), seed=st.integers(0, 2**31 - 1))
def test_property_extreme_logits_match_float64(backend, dtype, rows, vocab, temperature, seed):
    logits, labels = extreme_logits(rows, vocab, dtype, seed)
    with on_backend(backend):
        check_logprobs(logits, labels, temperature=temperature, seed=seed)


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V, temperature", [(4097, 1.0), (5003, 1.3)])
def test_finfo_min_masks_past_one_block_per_lane(backend, dtype, V, temperature):
    """Many masked entries per lane (C++: V / 16 per lane; Triton: more than one 4096-column block),
    then the real logits: the entropy merge must not form -inf x 0. (T >= 1: below 1, finfo.min / T
    is -inf in fp32, an easier case.)"""
    logits = torch.full((3, V), torch.finfo(dtype).min, dtype=dtype)
    logits[0, -7:] = torch.randn(7).to(dtype)
    logits[1, :5] = torch.randn(5).to(dtype)
    logits[2, ::97] = (torch.randn(len(range(0, V, 97))) * 4).to(dtype)
    labels = torch.tensor([V - 3, 2, 97])
    with on_backend(backend):
        check_logprobs(logits.to(DEVICE), labels.to(DEVICE), temperature=temperature)


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_the_audit_examples(backend):
    """The cases the audit found (issue 35), each with its closed form."""
    lowest = torch.finfo(torch.float32).min
    with on_backend(backend):
        entropy = ops.entropy_from_logits(torch.tensor([[1.0, 2.0, 0.5] + [lowest] * 17], device=DEVICE))
        p = torch.softmax(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 0)
        torch.testing.assert_close(entropy.double(), -(p * p.log()).sum()[None])
        z = torch.full((1, 4), -1e8, device=DEVICE, requires_grad=True)
        logp = ops.logprobs_from_logits(z, torch.tensor([0], device=DEVICE))
        (grad,) = torch.autograd.grad(logp.sum(), z)
        torch.testing.assert_close(logp, torch.tensor([-math.log(4)], device=DEVICE))
        torch.testing.assert_close(grad, torch.tensor([[0.75, -0.25, -0.25, -0.25]], device=DEVICE))
        logp = ops.logprobs_from_logits(torch.full((1, 4), -1e4, device=DEVICE), torch.tensor([0], device=DEVICE))
        assert abs(logp.item() + math.log(4)) < 1e-6
        # bf16 rows at -1e30 with temperature 0.7: uniform, finite gradients
        z = torch.full((2, 5), -1e30, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        logp, entropy = ops.logprobs_from_logits(z, torch.tensor([0, 1], device=DEVICE), temperature=0.7,
                                                 return_entropy=True)
        (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), z)
        torch.testing.assert_close(logp, torch.full((2,), -math.log(5), device=DEVICE))
        torch.testing.assert_close(grad[0].float(), torch.tensor([0.8, -0.2, -0.2, -0.2, -0.2], device=DEVICE) / 0.7,
                                   rtol=2**-7, atol=1e-3)
        # an all -inf row: mean_logit -inf, as the reference (log-probs and entropy NaN, as log_softmax)
        logp, entropy, stats = ops.logprobs_from_logits(torch.full((1, 6), -math.inf, device=DEVICE),
                                                        torch.tensor([1], device=DEVICE), return_stats=True)
        assert stats["mean_logit"].item() == -math.inf and logp.isnan().all() and entropy.isnan().all()


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("V", [5, 1000])  # not a power of two: the Triton kernel's padding columns
def test_underflowing_scale_gives_the_uniform_distribution(backend, V):
    """1 / T or logit_scale below fp32's smallest value: every x is 0, as the reference computes it."""
    logits, labels = torch.randn(2, V, device=DEVICE), torch.tensor([0, 3], device=DEVICE)
    with on_backend(backend):
        for kw in (dict(temperature=1e46), dict(logit_scale=1e-46)):
            logp, entropy = ops.logprobs_from_logits(logits, labels, return_entropy=True, **kw)
            torch.testing.assert_close(logp, torch.full((2,), -math.log(V), device=DEVICE))
            torch.testing.assert_close(entropy, torch.full((2,), math.log(V), device=DEVICE))


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_overflowing_transform_is_nan_as_the_fp32_reference(backend):
    """x = z / T past fp32's range is +inf, which makes its row NaN (the contract: x in fp32)."""
    logits = torch.tensor([[3e38, 0.0, 1.0], [1.0, 2.0, 3.0]], device=DEVICE)
    labels = torch.tensor([1, 1], device=DEVICE)
    want = reference.logprobs_from_logits(logits, labels, temperature=0.5)
    with on_backend(backend):
        got = ops.logprobs_from_logits(logits, labels, temperature=0.5)
    assert got[0].isnan() and want[0].isnan()
    torch.testing.assert_close(got[1:], want[1:])


def test_out_of_range_transforms_are_refused():
    logits, labels = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"softcap: expected a value > 0 that float32 holds \(at most 3.4e\+38\), got 1e\+39"):
        ops.logprobs_from_logits(logits, labels, softcap=1e39)
    with pytest.raises(ValueError, match=r"softcap: 1e\+38 \(over temperature: 1e\+39\) overflows float32"):
        ops.logprobs_from_logits(logits, labels, softcap=1e38, temperature=0.1)
    with pytest.raises(ValueError, match=r"softcap: 1e\+38 \(over temperature: 1e\+39\) overflows float32"):
        ops.fused_linear_logprobs(torch.randn(2, 3), torch.randn(5, 3), labels, softcap=1e38, temperature=0.1)
    with pytest.raises(ValueError, match=r"softcap: 1e-39 \(logit_scale over it: 1e\+39\) overflows float32"):
        ops.entropy_from_logits(logits, softcap=1e-39)


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("softcap, logit_scale", [(30.0, 1.0), (None, 0.0625), (None, 16.0)])
def test_transforms_on_extreme_logits(backend, softcap, logit_scale):
    for seed in range(3):
        logits, labels = extreme_logits(4, 300, torch.float32, seed)
        with on_backend(backend):
            check_logprobs(logits, labels, temperature=0.9, logit_scale=logit_scale, softcap=softcap, seed=seed)


# ----------------------------------------------------------------------------- the fused head
def masked_vocab_head(V=131, H=16, N=(3, 9), dtype=torch.float32):
    """hidden, weight and a bias masking part of the vocabulary with finfo.min (padded vocabulary
    rows), labels in the unmasked part. (With T >= 1 the masked logits stay finite.) Seeded: the
    labels fix which policy ratios lie near the clip bounds, where bf16 logits may put a token on the
    other side of a bound than float64 does (a discrete change of its gradient, not a kernel error)."""
    hidden, weight = randn(*N, H, seed=1, dtype=dtype), randn(V, H, seed=2, scale=0.3, dtype=dtype)
    bias = torch.zeros(V, dtype=dtype, device=DEVICE)
    bias[V // 3:] = torch.finfo(dtype).min
    labels = torch.randint(0, V // 3, N, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", backends_for("fused_linear_logprobs"))
def test_fused_linear_logprobs_with_a_finfo_min_bias(backend):
    hidden, weight, bias, labels = masked_vocab_head()
    args = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    with on_backend(backend):
        logp, entropy = ops.fused_linear_logprobs(*args, labels, bias=bias, return_entropy=True, temperature=1.25)
        grads = torch.autograd.grad(logp.sum() + 0.5 * entropy.sum(), args)
    args64 = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    logp64, entropy64 = reference.fused_linear_logprobs(*args64, labels, bias=bias.double(), return_entropy=True,
                                                        temperature=1.25)
    grads64 = torch.autograd.grad(logp64.sum() + 0.5 * entropy64.sum(), args64)
    for name, a, e in (("logp", logp, logp64), ("entropy", entropy, entropy64), ("grad hidden", grads[0], grads64[0]),
                       ("grad weight", grads[1], grads64[1])):
        check_close(a, e, name, rtol=3e-5, atol=1e-5 * max(e.abs().max().item(), 1.0))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_ppo_loss_with_a_finfo_min_bias_and_entropy_bonus(backend, dtype):
    hidden, weight, bias, labels = masked_vocab_head(dtype=dtype)
    B, T = labels.shape
    old = randn(B, T, seed=3, scale=0.3) - 3.0
    adv, ref = randn(B, T, seed=4), randn(B, T, seed=5, scale=0.3) - 3.0
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    kw = dict(bias=bias, ref_log_prob=ref, kl_coef=0.1, entropy_coef=0.01)  # T = 1: the masks stay finite
    args = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    with on_backend(backend):
        loss, stats = ops.fused_linear_ppo_loss(*args, labels, old, adv, mask, **kw)
        grads = torch.autograd.grad(loss, args)
    args64 = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    loss64, stats64 = reference.fused_linear_ppo_loss(*args64, labels, old, adv, mask, **{**kw, "bias": bias.double()})
    grads64 = torch.autograd.grad(loss64, args64)
    rtol = 3e-5 if dtype == torch.float32 else 2.0**-6
    for name, a, e in (("loss", loss, loss64), ("entropy", stats["entropy"], stats64["entropy"]),
                       ("grad hidden", grads[0], grads64[0]), ("grad weight", grads[1], grads64[1])):
        check_close(a, e, name, rtol=rtol, atol=rtol * max(e.abs().max().item(), 1.0))


# ----------------------------------------------------------------------------- weights and options
def policy_inputs(B=4, T=9):
    old = randn(B, T, seed=10, scale=0.5) - 2.0
    log_prob = old + randn(B, T, seed=11, scale=0.4)
    adv = randn(B, T, seed=12)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[:, -3:] = False
    return log_prob, old, adv, mask


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_nan_does_not_hide_a_negative_importance_weight(backend, fused, monkeypatch):
    """[-1, 1, nan]: min() is NaN, which used to skip the check; a NaN at a masked position too.
    (Value checks run on CUDA tensors on request: PPO_FAST_CHECK_VALUES=1.)"""
    monkeypatch.setenv("PPO_FAST_CHECK_VALUES", "1")
    log_prob, old, adv, mask = policy_inputs()
    for nan_at in ((0, 1), (0, 8)):  # a valid position, a masked one
        weights = torch.ones_like(log_prob)
        weights[0, 0], weights[nan_at] = -1.0, math.nan
        with on_backend(backend), pytest.raises(ValueError, match="is_weights: expected importance weights >= 0"):
            if fused:
                hidden, weight = randn(4, 9, 8, seed=1), randn(11, 8, seed=2)
                ops.fused_linear_ppo_loss(hidden, weight, torch.zeros(4, 9, dtype=torch.long, device=DEVICE), old, adv,
                                          mask, is_weights=weights)
            else:
                ops.ppo_policy_loss(log_prob, old, adv, mask, is_weights=weights)


def policy_case(backend, log_prob, old, adv, mask, **kw):
    """ppo_policy_loss's loss, gradient and stats on `backend` and in float64, per element."""
    x = log_prob.detach().clone().requires_grad_()
    with on_backend(backend):
        loss, stats = ops.ppo_policy_loss(x, old, adv, mask, **kw)
        (grad,) = torch.autograd.grad(loss * 1.7, x)
    x64 = log_prob.detach().double().requires_grad_()
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss64, stats64 = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, **kw64)
    (grad64,) = torch.autograd.grad(loss64 * 1.7, x64)
    check_close(loss, loss64, "loss", rtol=3e-5, atol=1e-6)
    check_close(grad, grad64, "grad", rtol=3e-5, atol=1e-6 * max(grad64.abs().nan_to_num(posinf=0, neginf=0).max().item(), 1))
    for name in stats:
        check_close(stats[name], stats64[name], name, rtol=3e-5, atol=1e-6)


LIMITS = {  # every objective option at the ends of its range
    "clip, no clipping range": dict(clip_low=0.0, clip_high=0.0),
    "clip, ratio bound at 0 and 1e30": dict(clip_low=1.0, clip_high=1e30),
    "clip, dual clip just above 1": dict(dual_clip=1.0 + 2**-20),
    "clip, dual clip 1e30": dict(dual_clip=1e30),
    "cispo, cap range [0, 1e30]": dict(objective="cispo", clip_low=1.0, clip_high=1e30),
    "cispo, no range": dict(objective="cispo", clip_low=0.0, clip_high=0.0),
    "sapo, tiny temperatures": dict(objective="sapo", tau_pos=1e-30, tau_neg=1e-30),
    "sapo, huge temperatures": dict(objective="sapo", tau_pos=1e30, tau_neg=1e30),
    "sequence ratio, no clipping range": dict(ratio_level="sequence", clip_low=0.0, clip_high=0.0),
    "sequence-token, dual clip 1e30": dict(ratio_level="sequence-token", dual_clip=1e30),
}


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("case", LIMITS)
def test_objective_options_at_their_range_limits(backend, case):
    policy_case(backend, *policy_inputs(), **LIMITS[case])


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("surrogate", ["clip", "cispo", "gpg", "sapo"])
@pytest.mark.parametrize("value", [0.0, 1e30, math.inf])
def test_importance_weights_at_their_range_limits(backend, surrogate, value):
    """0, 1e30 and +inf weights: +inf on a token whose surrogate carries no gradient (clipped) gives
    gradient 0, as autograd of the reference does; elsewhere +-inf or NaN as the reference."""
    log_prob, old, adv, mask = policy_inputs()
    log_prob[0, :4] = old[0, :4] + torch.tensor([1.0, -1.0, 0.05, 30.0], device=DEVICE)  # clipped, inside, past the clamp
    weights = torch.ones_like(log_prob)
    weights[0, :4] = value
    policy_case(backend, log_prob, old, adv, mask, objective=surrogate, is_weights=weights, agg="seq-mean-token-sum")
