"""The objectives registry (ppo_fast/ops/objectives.py): an objective defined and registered in
this file runs through ppo_policy_loss and fused_linear_ppo_loss on every backend, equal to its
formula in float64 (the measure of the registry: a new objective is its definition and its test,
here one file); every registered objective the kernels do not compile runs the generic path of
the fused op without [N, V] tensors; bad objectives and parameters are refused before any kernel."""
import math

import pytest
import torch
from support import DEVICE, assert_close_f64, backends_for, on_backend, ragged_mask, randn

from ppo_fast import ops
from ppo_fast.ops import fused_linear, objectives, reference
from ppo_fast.ops.objectives import Param, Terms, register_objective, unregister_objective

B, T, H, V = 4, 11, 8, 53
GENERIC = [name for name, definition in objectives.REGISTRY.items() if definition.kernel is None]


# ----------------------------------------------------------------------------- a new objective
def quartic_formula(log_prob, old, adv, c):
    """The toy objective's math, written out here (the oracle): -A y + c (y - old)^4."""
    return -adv * log_prob + c * (log_prob - old) ** 4


@pytest.fixture
def quartic():
    """An objective that exists nowhere in ppo_fast: one function and its registration."""
    def check_c(name, value):
        if not (isinstance(value, float) and value >= 0):
            raise ValueError(f"{name}: expected a float >= 0, got {value!r}")
        return value

    @register_objective("test_quartic", params={"c": Param(0.5, check_c)})
    def test_quartic(log_prob, old_log_prob, advantages, mask, *, c):
        loss = quartic_formula(log_prob, old_log_prob, advantages, c)
        return Terms(loss, clipped=(log_prob - old_log_prob).abs() > 0.3)

    yield "test_quartic"
    unregister_objective("test_quartic")


def policy_inputs(seed=0):
    old = randn(B, T, seed=seed, scale=0.5) - 2.0
    return old + randn(B, T, seed=seed + 1, scale=0.4), old, randn(B, T, seed=seed + 2), ragged_mask(B, T, seed=seed)


@pytest.mark.parametrize("backend", backends_for("ppo_policy_loss"))
def test_a_new_objective_runs_through_ppo_policy_loss(backend, quartic):
    log_prob, old, adv, mask = policy_inputs()
    weights = randn(B, T, seed=9).abs()
    x = log_prob.clone().requires_grad_()
    with on_backend(backend):
        loss, stats = ops.ppo_policy_loss(x, old, adv, mask, objective=quartic, c=0.25, is_weights=weights,
                                          agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss * 1.7, x)
    x64 = log_prob.double().requires_grad_()
    per_token = quartic_formula(x64, old.double(), adv.double(), 0.25) * weights.double()
    m = mask.double()
    rows = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
    want = rows[m.sum(-1) > 0].sum() / (m.sum(-1) > 0).sum()
    (want_grad,) = torch.autograd.grad(want * 1.7, x64)
    assert_close_f64(loss, want, "loss")
    assert_close_f64(grad, want_grad, "grad")
    clipped = ((log_prob - old).abs() > 0.3).double()
    assert_close_f64(stats["clipfrac"], (clipped * m).sum() / m.sum(), "clipfrac")


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
def test_a_new_objective_runs_through_the_fused_head(backend, quartic):
    hidden, weight = randn(B, T, H, seed=3), randn(V, H, seed=4, scale=0.4)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    _, old, adv, mask = policy_inputs(seed=5)
    args = [t.clone().requires_grad_() for t in (hidden, weight)]
    with on_backend(backend):
        loss, stats = ops.fused_linear_ppo_loss(*args, labels, old, adv, mask, objective=quartic, c=2.0,
                                                entropy_coef=0.01, chunk_size=T)
    grads = torch.autograd.grad(loss, args)
    args64 = [t.double().requires_grad_() for t in (hidden, weight)]
    logits = (args64[0] @ args64[1].T).log_softmax(-1)
    logp = logits.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logits.exp() * logits).sum(-1)
    m = mask.double()
    want = ((quartic_formula(logp, old.double(), adv.double(), 2.0) - 0.01 * entropy) * m).sum() / m.sum()
    want_grads = torch.autograd.grad(want, args64)
    assert_close_f64(loss, want, "loss")
    assert_close_f64(grads[0], want_grads[0], "grad hidden")
    assert_close_f64(grads[1], want_grads[1], "grad weight")


# ----------------------------------------------------------------------------- the generic path
@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("name", GENERIC)
def test_every_generic_objective_through_the_fused_head_matches_float64(backend, name, monkeypatch):
    """fused_linear_ppo_loss == its reference composition in float64 for each registered objective
    the kernels do not compile; the head's GEMMs see at most a chunk of rows (no [N, V] logits)."""
    hidden, weight = randn(B, T, H, seed=6), randn(V, H, seed=7, scale=0.4)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    _, old, adv, mask = policy_inputs(seed=8)
    ref = old + randn(B, T, seed=10, scale=0.2)
    kwargs = dict(ref_log_prob=ref, kl_coef=0.05, entropy_coef=0.01, is_weights=randn(B, T, seed=11).abs() + 0.5,
                  objective=name, agg="seq-mean-token-sum")
    gemm_rows = []
    real = fused_linear.blocked_linear
    monkeypatch.setattr(fused_linear, "blocked_linear", lambda x, *a, **k: gemm_rows.append(x.shape[0]) or real(x, *a, **k))

    def run(fn, h, w, **extra):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        torch.manual_seed(0)  # clip_cov's random cut
        loss, stats = fn(h, w, labels, old, adv, mask, **kwargs, **extra)
        return loss, stats, torch.autograd.grad(loss * 1.3, (h, w))

    with on_backend(backend):
        got = run(ops.fused_linear_ppo_loss, hidden, weight, chunk_size=2 * T)
    want = run(reference.fused_linear_ppo_loss, hidden.double(), weight.double())
    assert_close_f64(got[0], want[0], "loss")
    for stat in want[1]:
        assert_close_f64(got[1][stat], want[1][stat], stat)
    assert_close_f64(got[2][0], want[2][0], "grad hidden")
    assert_close_f64(got[2][1], want[2][1], "grad weight")
    if backend != "torch":
        assert gemm_rows and max(gemm_rows) <= 2 * T


@pytest.mark.parametrize("backend", backends_for("ppo_policy_loss"))
@pytest.mark.parametrize("name", GENERIC)
def test_every_generic_objective_through_ppo_policy_loss_matches_float64(backend, name):
    log_prob, old, adv, mask = policy_inputs(seed=12)
    x = log_prob.clone().requires_grad_()
    with on_backend(backend):
        torch.manual_seed(0)
        loss, stats = ops.ppo_policy_loss(x, old, adv, mask, objective=name)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = log_prob.double().requires_grad_()
    torch.manual_seed(0)
    want, want_stats = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, objective=name)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert_close_f64(loss, want, "loss")
    assert_close_f64(grad, want_grad, "grad")
    for stat in want_stats:
        assert_close_f64(stats[stat], want_stats[stat], stat)


def test_clip_delta_equals_the_dual_clip_where_delta_is_past_the_range():
    """TRL's two-sided clipping with delta >= 1 + clip_high is PPO's dual clip (the compiled path)."""
    log_prob, old, adv, mask = policy_inputs(seed=13)
    a, _ = reference.ppo_policy_loss(log_prob.double(), old.double(), adv.double(), mask, objective="clip_delta",
                                     delta=1.5, clip_high=0.28)
    b, _ = reference.ppo_policy_loss(log_prob.double(), old.double(), adv.double(), mask, dual_clip=1.5,
                                     clip_high=0.28)
    torch.testing.assert_close(a, b)


def test_a_cispo_cap_below_one():
    """TRL's default CISPO cap: clip_low = 1, clip_high = C - 1 < 0 (the weight in [0, C])."""
    log_prob, old, adv, mask = policy_inputs(seed=14)
    x = log_prob.clone().requires_grad_()
    loss, _ = ops.ppo_policy_loss(x, old, adv, mask, objective="cispo", clip_low=1.0, clip_high=-0.8)
    (grad,) = torch.autograd.grad(loss, x)
    weight = torch.clamp(torch.exp(log_prob - old), 0.0, 0.2)
    m = mask.float()
    torch.testing.assert_close(grad, -weight * adv * m / m.sum())


# ----------------------------------------------------------------------------- bad objectives
def test_bad_objectives_are_refused_before_any_kernel(quartic):
    log_prob, old, adv, mask = policy_inputs()
    with pytest.raises(ValueError, match=r"objective: expected one of \(.*'test_quartic'.*\), got 'quartic'"):
        ops.ppo_policy_loss(log_prob, old, adv, mask, objective="quartic")
    with pytest.raises(ValueError, match=r"clip_low: objective 'test_quartic' takes no parameter 'clip_low' "
                                         r"\(it takes: c\)"):
        ops.ppo_policy_loss(log_prob, old, adv, mask, objective=quartic, clip_low=0.2)
    with pytest.raises(ValueError, match=r"c: expected a float >= 0, got -1.0"):
        ops.fused_linear_ppo_loss(randn(B, T, H), randn(V, H), torch.zeros(B, T, dtype=torch.long, device=DEVICE),
                                  old, adv, mask, objective=quartic, c=-1.0)
    with pytest.raises(ValueError, match=r"objective 'test_quartic' is registered already"):
        register_objective("test_quartic")(lambda *a: None)
    with pytest.raises(TypeError, match=r"given as an Objective, so no parameters besides it"):
        ops.ppo_policy_loss(log_prob, old, adv, mask, objective=objectives.resolve("clip"), clip_low=0.1)
    with pytest.raises(ValueError, match=r"beta: expected a finite value > 0, got 0.0"):
        ops.ppo_policy_loss(log_prob, old, adv, mask, objective="dro", beta=0.0)
    with pytest.raises(ValueError, match=r"clip_high: the range \[1 - clip_low, 1 \+ clip_high\] is empty"):
        ops.ppo_policy_loss(log_prob, old, adv, mask, objective="cispo", clip_low=0.1, clip_high=-0.5)


def test_an_objective_crosses_op_boundaries_whole():
    """to_op_args / from_op_args give back the same Objective, whatever its parameters."""
    for name in objectives.REGISTRY:
        objective = objectives.resolve(name)
        assert objectives.Objective.from_op_args(*objective.to_op_args()) == objective
    tiny = objectives.resolve("clip", clip_low=1e-300, dual_clip=1e300, ratio_level="sequence-token")
    assert objectives.Objective.from_op_args(*tiny.to_op_args()) == tiny
    assert math.isclose(tiny["dual_clip"], 1e300)
