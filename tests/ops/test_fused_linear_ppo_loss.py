"""fused_linear_ppo_loss against the float64 composition of the reference ops (its spec)."""
import contextlib
import importlib

import pytest
import torch
from support import DEVICE, assert_close_f64, ragged_mask, randn

from ppo_fast.ops import fused_linear_ppo_loss, reference

fused_module = importlib.import_module("ppo_fast.ops.fused_linear_ppo_loss")  # ops.<name> is the function
OP = "fused_linear_ppo_loss"  # the `backend` fixture runs over this op's backends

IGNORE = -100
STATS = ("clipfrac", "approx_kl", "clipfrac_lower", "policy_loss", "entropy", "kl")


def make_inputs(B, T, H, V, dtype, *, with_bias=True, seed=0):
    """hidden, weight, bias, labels (some ignored) and per-token old/ref log-probs near the
    policy's (ratios around 1, some clipped), advantages and a ragged mask with an empty row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 2
    bias = torch.randn(V, generator=g) * 0.5 if with_bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.1] = IGNORE
    with torch.no_grad():
        logp = reference.fused_linear_logprobs(hidden, weight, labels, bias=bias)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = ragged_mask(B, T, seed=seed, empty_rows=(B - 1,) if B > 1 else ())
    hidden, weight, bias = (None if t is None else t.to(dtype).to(DEVICE) for t in (hidden, weight, bias))
    return hidden, weight, bias, labels.to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask, ref.to(DEVICE)


@contextlib.contextmanager
def logits_rounded_to(dtype):
    """The reference with its logits rounded to `dtype` (straight-through for the gradient), as
    the op's GEMM in that dtype gives them; exact math after that."""
    exact = reference.fused_linear_logprobs

    def rounded(hidden, weight, labels, *, bias=None, **kwargs):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logits = logits + (logits.to(dtype).double() - logits).detach()
        return reference.logprobs_from_logits(logits, labels, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "fused_linear_logprobs", rounded)
        yield
    assert reference.fused_linear_logprobs is exact


def run(fn, inputs, upstream, **kwargs):
    """(loss, stats, gradients of upstream * loss to hidden, weight, bias)."""
    hidden, weight, bias, labels, old, adv, mask, ref = inputs
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w = params[:2]
    b = params[2] if bias is not None else None
    loss, stats = fn(h, w, labels, old, adv, mask, bias=b, ref_log_prob=ref, **kwargs)
    grads = torch.autograd.grad(loss * upstream, params)
    return loss, stats, grads


def oracle(inputs, upstream, dtype, **kwargs):
    inputs64 = [None if t is None or not t.is_floating_point() else t.double() for t in inputs]
    inputs64 = [t64 if t64 is not None else t for t, t64 in zip(inputs, inputs64)]
    with logits_rounded_to(dtype):
        return run(reference.fused_linear_ppo_loss, inputs64, upstream, **kwargs)


def assert_matches(actual, expected, dtype):
    loss, stats, grads = actual
    loss64, stats64, grads64 = expected
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    assert set(stats) == set(stats64)
    for name in stats64:
        assert not stats[name].requires_grad and stats[name].dtype == torch.float32
    if dtype == torch.float32:
        assert_close_f64(loss, loss64, "loss")
        for name in stats64:
            assert_close_f64(stats[name], stats64[name], name)
        for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
            assert_close_f64(g, g64, f"grad {name}", magnitude=10.0)
    else:  # bf16 gradients: one rounding of grad_logits and of the GEMMs' outputs
        for name, a, e in [("loss", loss, loss64), *((n, stats[n], stats64[n]) for n in stats64)]:
            torch.testing.assert_close(a.double().cpu(), e.double().cpu(), rtol=2e-3, atol=2e-3, msg=name)
        for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
            scale = g64.abs().max().item()
            torch.testing.assert_close(g.double().cpu(), g64.double().cpu(), rtol=2.0**-6, atol=2.0**-6 * scale,
                                       msg=f"grad {name}")


@pytest.mark.parametrize("agg", reference.AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_float64_composition(backend, agg, dtype):
    inputs = make_inputs(5, 13, 24, 1001, dtype)
    kwargs = dict(temperature=0.9, kl_coef=0.05, kl_estimator="low_var_kl", entropy_coef=0.01, clip_low=0.2,
                  clip_high=0.28, dual_clip=3.0, agg=agg, chunk_size=20)
    actual = run(fused_linear_ppo_loss, inputs, 1.7, **kwargs)
    assert_matches(actual, oracle(inputs, 1.7, dtype, **kwargs), dtype)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "k3+"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kl_estimators_bias_and_global_counts(backend, estimator, with_bias):
    inputs = make_inputs(4, 9, 16, 257, torch.float32, with_bias=with_bias, seed=1)
    kwargs = dict(kl_coef=0.2, kl_estimator=estimator, entropy_coef=-0.02, agg="seq-mean-token-sum",
                  num_tokens=50, num_seqs=7)
    actual = run(fused_linear_ppo_loss, inputs, -0.6, **kwargs)
    assert_matches(actual, oracle(inputs, -0.6, torch.float32, **kwargs), torch.float32)


def test_without_reference_or_entropy_terms(backend):
    hidden, weight, bias, labels, old, adv, mask, _ = make_inputs(3, 1, 8, 67, torch.float32, seed=2)  # T = 1
    inputs = (hidden, weight, bias, labels, old, adv, mask, None)
    actual = run(fused_linear_ppo_loss, inputs, 1.0)
    assert "kl" not in actual[1]
    assert_matches(actual, oracle(inputs, 1.0, torch.float32), torch.float32)


def test_near_one_hot_logits(backend):
    """Logits 40 apart: p_y rounds to 1 in fp32, and 1 - p_y must not turn into noise."""
    hidden, weight, bias, labels, old, adv, mask, ref = make_inputs(2, 6, 8, 97, torch.float32, seed=3)
    weight = weight * 0
    bias = torch.zeros_like(bias)
    bias[labels.clamp(min=0).view(-1)[:3]] = 40.0
    inputs = (hidden, weight, bias, labels, old, adv, mask, ref)
    actual = run(fused_linear_ppo_loss, inputs, 1.0, kl_coef=0.1, entropy_coef=0.1)
    assert_matches(actual, oracle(inputs, 1.0, torch.float32, kl_coef=0.1, entropy_coef=0.1), torch.float32)


def test_micro_batches_add_up_to_the_big_batch(backend):
    """With the global counts, the micro-batches' gradients sum to the big batch's, exactly up to
    fp32 rounding, for every aggregation mode."""
    inputs = make_inputs(6, 11, 16, 301, torch.float32, seed=4)
    mask = inputs[6]
    num_tokens, num_seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
    for agg in reference.AGG_MODES:
        kwargs = dict(kl_coef=0.1, entropy_coef=0.01, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
        big_loss, big_stats, big_grads = run(fused_linear_ppo_loss, inputs, 1.0, **kwargs)
        parts = [run(fused_linear_ppo_loss, [t if t is None or t.dim() < 2 or t is inputs[1] else t[rows]
                                             for t in inputs], 1.0, **kwargs)
                 for rows in (slice(0, 2), slice(2, 6))]
        torch.testing.assert_close(sum(p[0] for p in parts), big_loss)
        for i, name in enumerate(("hidden", "weight", "bias")):
            if name == "hidden":
                summed = torch.cat([p[2][0] for p in parts])
            else:
                summed = parts[0][2][i] + parts[1][2][i]
            torch.testing.assert_close(summed, big_grads[i], rtol=1e-5, atol=1e-6, msg=f"{agg}: grad {name}")


def test_chunk_size_does_not_change_results(backend):
    inputs = make_inputs(4, 7, 16, 203, torch.float32, seed=5)
    results = [run(fused_linear_ppo_loss, inputs, 1.0, kl_coef=0.1, entropy_coef=0.01, chunk_size=c)
               for c in (1, 7, 15, 10_000, None)]
    for loss, stats, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0)


def test_three_gemms_and_no_gradient_work_without_grad(backend, monkeypatch):
    """Three GEMMs per chunk in the forward (logits, grad_h, grad_W), none in the backward; under no_grad (or with
    nothing requiring grad) no gradient is formed, and the value is the same."""
    if backend == "torch":
        pytest.skip("the reference materialises the logits and lets autograd differentiate them")
    calls = {"linear": 0, "accumulate": 0}
    real_linear, real_accumulate = fused_module.blocked_linear, fused_module.accumulate_fp32

    def count(name, fn):
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)

    monkeypatch.setattr(fused_module, "blocked_linear", count("linear", real_linear))
    monkeypatch.setattr(fused_module, "accumulate_fp32", count("accumulate", real_accumulate))
    hidden, weight, bias, labels, old, adv, mask, ref = make_inputs(4, 5, 8, 101, torch.float32, seed=6)
    loss, _, _ = run(fused_linear_ppo_loss, (hidden, weight, bias, labels, old, adv, mask, ref), 1.0,
                     chunk_size=10, kl_coef=0.1)
    # 4 rows of 5 tokens in chunks of 2 rows: per chunk the logits, grad_h (blocked_linear) and grad_W GEMMs
    assert calls == {"linear": 4, "accumulate": 2}
    calls.update(linear=0, accumulate=0)
    with torch.no_grad():
        no_grad_loss, _ = fused_linear_ppo_loss(hidden.requires_grad_(), weight, labels, old, adv, mask, bias=bias,
                                                ref_log_prob=ref, kl_coef=0.1, chunk_size=10)
    frozen_loss, _ = fused_linear_ppo_loss(hidden.detach(), weight, labels, old, adv, mask, bias=bias,
                                           ref_log_prob=ref, kl_coef=0.1, chunk_size=10)
    assert calls == {"linear": 4, "accumulate": 0}
    assert not no_grad_loss.requires_grad and not frozen_loss.requires_grad
    torch.testing.assert_close(no_grad_loss, loss.detach())
    torch.testing.assert_close(frozen_loss, loss.detach())


def test_only_the_inputs_that_require_grad_get_one(backend):
    hidden, weight, bias, labels, old, adv, mask, ref = make_inputs(3, 4, 8, 53, torch.float32, seed=7)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_ppo_loss(h, weight, labels, old, adv, mask, bias=bias)
    loss.backward()
    assert h.grad is not None and weight.grad is None and bias.grad is None


def test_a_second_backward_is_refused_not_scaled_twice(backend):
    if backend == "torch":
        pytest.skip("the reference keeps autograd's graph, which allows retain_graph")
    hidden, weight, bias, labels, old, adv, mask, _ = make_inputs(3, 4, 8, 53, torch.float32, seed=9)
    loss, _ = fused_linear_ppo_loss(hidden.requires_grad_(), weight, labels, old, adv, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


def test_empty_and_fully_masked_batches_give_zeros(backend):
    for B, T in ((0, 5), (3, 0), (3, 4)):
        hidden, weight = randn(B, T, 8, seed=8).requires_grad_(), randn(31, 8, seed=9).requires_grad_()
        labels = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
        zeros = torch.zeros(B, T, device=DEVICE)
        loss, stats = fused_linear_ppo_loss(hidden, weight, labels, zeros, zeros, zeros.bool(), ref_log_prob=zeros,
                                            kl_coef=0.1, entropy_coef=0.1)
        loss.backward()
        assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values()), (B, T, stats)
        assert not hidden.grad.any() and not weight.grad.any()


def test_bad_inputs_give_clear_errors():
    hidden, weight, bias, labels, old, adv, mask, ref = make_inputs(3, 4, 8, 53, torch.float32)
    call = dict(hidden=hidden, weight=weight, labels=labels, old_log_prob=old, advantages=adv, mask=mask)

    def raises(error, match, **changes):
        args = {**call, **changes}
        kwargs = {k: args.pop(k) for k in list(args) if k not in call}
        with pytest.raises(error, match=match):
            fused_linear_ppo_loss(*args.values(), **kwargs)

    raises(ValueError, r"ref_log_prob: required when kl_coef != 0", kl_coef=0.1)
    raises(ValueError, r"advantages: expected shape \(3, 4\) \(the shape of old_log_prob\), got \(3, 3\)",
           advantages=adv[:, :3])
    raises(ValueError, r"labels: expected a \[B, T\] tensor", hidden=hidden[0], labels=labels[0])
    raises(ValueError, r"old_log_prob: expected the shape of labels \(3, 4\), got \(2, 4\)", old_log_prob=old[:2],
           advantages=adv[:2], mask=mask[:2])
    raises(ValueError, r"mask: expected shape \(3, 4\)", mask=mask[:, :2])
    raises(ValueError, r"kl_estimator: expected one of", ref_log_prob=ref, kl_estimator="k4")
    raises(ValueError, r"agg: expected one of", agg="sum")
    raises(ValueError, r"dual_clip: expected None or a finite value > 1, got 0.5", dual_clip=0.5)
    raises(ValueError, r"entropy_coef: expected a finite value, got nan", entropy_coef=float("nan"))
    raises(ValueError, r"num_tokens: expected None or a finite number > 0", num_tokens=0)
    raises(ValueError, r"chunk_size: expected None or an int >= 1, got 0", chunk_size=0)
    raises(ValueError, r"labels: values must be in \[0, 53\)", labels=torch.full_like(labels, 53))
    raises(TypeError, r"weight: expected dtype in", weight=weight.long())
    raises(TypeError, r"old_log_prob: expected dtype in", old_log_prob=old.long())


# ----------------------------------------------------------------------------- the ratio-weighted KL
@pytest.mark.parametrize("level", reference.RATIO_LEVELS)
def test_policy_ratio_vjp_is_autograd_of_policy_ratio(level):
    """The derivative the compiled path uses inside its custom op equals autograd's of the ratio."""
    g = torch.Generator().manual_seed(3)
    logp = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 0.5 - 2).requires_grad_()
    old = logp.detach() + torch.randn(4, 9, generator=g, dtype=torch.float64) * 0.4
    old[0, 0] = logp[0, 0].item() - 25.0  # one token past the clamp
    mask = ragged_mask(4, 9, seed=3, empty_rows=(3,)).cpu()
    v = torch.randn(4, 9, generator=g, dtype=torch.float64)
    rho, _ = reference.policy_ratio(logp, old, mask, level)
    (want,) = torch.autograd.grad(rho, logp, grad_outputs=reference.valid_only(v, mask))
    got_rho, got = reference.policy_ratio_vjp(logp.detach(), old, mask, level, v)
    torch.testing.assert_close(got_rho, rho.detach())
    torch.testing.assert_close(reference.valid_only(got, mask), reference.valid_only(want, mask))


@pytest.mark.parametrize("kl_ratio", reference.RATIO_LEVELS)
@pytest.mark.parametrize("objective", ["clip", "dro"])  # compiled and generic paths
@pytest.mark.parametrize("on_policy", [False, True])
def test_ratio_weighted_kl_matches_float64(backend, kl_ratio, objective, on_policy):
    """kl_ratio: each token's KL times the policy ratio, its gradient included (TRL's
    use_bias_correction_kl), on both paths and every backend; the kl statistic is the weighted one;
    return_log_prob gives the per-token log-probs."""
    inputs = make_inputs(4, 9, 8, 37, torch.float32, seed=21)
    if on_policy:
        inputs = (*inputs[:4], None, *inputs[5:])
    kwargs = dict(kl_coef=0.3, kl_estimator="k3_raw", kl_ratio=kl_ratio, objective=objective,
                  agg="seq-mean-token-mean", chunk_size=9, return_log_prob=True)
    got = run(fused_linear_ppo_loss, inputs, 1.3, **kwargs)
    want = oracle(inputs, 1.3, torch.float32, **kwargs)
    assert_matches(got, want, torch.float32)
    hidden, weight, bias, labels = inputs[:4]
    logp = reference.fused_linear_logprobs(hidden.double(), weight.double(), labels, bias=bias.double())
    assert_close_f64(got[1]["log_prob"], logp, "log_prob")
    plain = run(fused_linear_ppo_loss, inputs, 1.3, **{**kwargs, "kl_ratio": None})
    assert not torch.equal(got[2][0], plain[2][0])  # the weighting took effect (on-policy: in the gradient only)
