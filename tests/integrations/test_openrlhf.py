"""ppo_fast.integrations.openrlhf against OpenRLHF's own PolicyLoss, ValueLoss, compute_approx_kl,
masked_mean and GAE (loaded by tests/peers.py): values, gradients and statistics."""
import pytest
import torch
from peers import OPENRLHF_STAND_INS, openrlhf_experience_maker, openrlhf_models, own_tests
from support import DEVICE, assert_close_f64, backends_for, on_backend, ragged_mask, randn

from ppo_fast.integrations import UnsupportedOption
from ppo_fast.integrations import openrlhf as pf

loss_module, utils = openrlhf_models()
OP = "ppo_policy_loss"
SHAPE = (5, 29)


def right_padded(B, T, seed):
    """OpenRLHF's action masks: a response, then padding."""
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    return (torch.arange(T)[None] < lengths[:, None]).to(DEVICE)


def with_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(loss.sum() * 1.3, x)[0]


@pytest.mark.parametrize("name", [b for b in backends_for("ppo_policy_loss") if b in backends_for("masked_mean")])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("counts", [{}, {"dp_size": 2, "batch_num_tokens": 200.0, "global_batch_size": 8.0},
                                    {"dp_size": 2, "batch_num_tokens": torch.tensor(200.0)}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_openrlhf(name, dual_clip, token_level_loss, counts, dtype):
    """On the backends that have both ops the adapter uses (the policy loss and masked_mean)."""
    old = (randn(*SHAPE, seed=1, scale=0.5) - 2).to(dtype)
    log_prob = (old.float() + randn(*SHAPE, seed=2, scale=0.4)).to(dtype)
    adv, mask = randn(*SHAPE, seed=3).to(dtype), ragged_mask(*SHAPE, seed=4)
    ours = pf.PolicyLoss(0.2, 0.28, dual_clip, token_level_loss)
    theirs = loss_module.PolicyLoss(0.2, 0.28, dual_clip, token_level_loss)
    with on_backend(name):
        out, grad = with_grad(lambda lp: ours(lp, old, adv, mask, **counts), log_prob)
    want, want_grad = with_grad(lambda lp: theirs(lp, old.double(), adv.double(), mask.double(), **counts),
                                log_prob.double())  # OpenRLHF's math on the same values, in float64
    for name, a, b in zip(("loss", "clip_ratio", "ppo_kl"), out[:3], want[:3]):
        assert_close_f64(a, b, name)
    assert_close_f64(grad, want_grad, "grad")
    assert out[3] is None and out[4] is None


CORRECTIONS = [dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.8, 1.25)),
               dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.8, 1.25)),
               dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.9, 1.1))] + [
    dict(is_correction_level=level, is_correction_mode="mask", is_correction_gating=gating,
         is_correction_threshold=(0.0, bound))  # the divergence gates: an upper bound only
    for gating, bound in (("binary_kl", 0.002), ("tv", 0.02)) for level in ("token", "seq")]  # some units dropped, not all
LEGACY = {"tis": CORRECTIONS[0], "icepop": CORRECTIONS[1], "seq-mask-tis": CORRECTIONS[2]}


def correction_inputs(dtype=torch.float32):
    old = (randn(*SHAPE, seed=21, scale=0.5) - 2).to(dtype)
    log_prob = (old.float() + randn(*SHAPE, seed=22, scale=0.3)).to(dtype)
    rollout = (old.float() + randn(*SHAPE, seed=23, scale=0.2)).to(dtype)
    return log_prob, old, rollout, randn(*SHAPE, seed=24).to(dtype), right_padded(*SHAPE, seed=25)


def compare_with_openrlhf(ours, theirs, inputs, counts=None, name="auto"):
    log_prob, old, rollout, adv, mask = inputs
    counts = counts or {}
    with on_backend(name):
        out, grad = with_grad(lambda lp: ours(lp, old, adv, mask, rollout_log_probs=rollout, **counts), log_prob)
    d = lambda t: t.double()  # noqa: E731 - OpenRLHF's math on the same values, in float64
    want, want_grad = with_grad(lambda lp: theirs(lp, d(old), d(adv), mask.double(), rollout_log_probs=d(rollout),
                                                  **counts), d(log_prob))
    for label, a, b in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), out, want):
        assert (a is None) == (b is None), label
        if a is not None:
            assert_close_f64(torch.as_tensor(a), torch.as_tensor(b), label)
    assert_close_f64(grad, want_grad, "grad")


@pytest.mark.parametrize("name", [b for b in backends_for("ppo_policy_loss") if b in backends_for("masked_mean")])
@pytest.mark.parametrize("correction", range(len(CORRECTIONS)))
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_policy_loss_with_is_correction_and_gspo_matches_openrlhf(name, correction, policy_loss_type):
    """0.11's is_correction_* (token clip = TIS, token mask = ICEPOP, seq mask = the geometric-mean
    gate) and GSPO (with the correction: its ratio against the rollout policy), against OpenRLHF's own."""
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, policy_loss_type=policy_loss_type,
                  **CORRECTIONS[correction])
    compare_with_openrlhf(pf.PolicyLoss(**kwargs), loss_module.PolicyLoss(**kwargs), correction_inputs(),
                          {"dp_size": 2, "batch_num_tokens": 100.0, "global_batch_size": 8.0}, name)


@pytest.mark.parametrize("legacy_type", list(LEGACY))
def test_the_earlier_spelling_of_the_correction_is_the_same_loss(legacy_type):
    """enable_vllm_is_correction / vllm_is_truncated_threshold / vllm_is_correction_type (OpenRLHF
    before 0.11) give what 0.11's spelling of the same correction gives in OpenRLHF's own code."""
    new = LEGACY[legacy_type]
    ours = pf.PolicyLoss(0.2, 0.28, enable_vllm_is_correction=True, vllm_is_correction_type=legacy_type,
                         vllm_is_truncated_threshold=list(new["is_correction_threshold"]))
    compare_with_openrlhf(ours, loss_module.PolicyLoss(0.2, 0.28, **new), correction_inputs())


def test_gspo_without_correction_matches_openrlhf():
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type="gspo")
    compare_with_openrlhf(pf.PolicyLoss(**kwargs), loss_module.PolicyLoss(**kwargs), correction_inputs())


def test_policy_loss_refuses_what_it_lacks():
    """Unknown keywords are refused, never swallowed into an uncorrected loss."""
    with pytest.raises(UnsupportedOption, match=r"keyword\(s\) \['vllm_is_truncation'\]"):
        pf.PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncation=2.0)
    with pytest.raises(UnsupportedOption, match="policy_loss_type='cispo'"):
        pf.PolicyLoss(policy_loss_type="cispo")
    with pytest.raises(ValueError, match="is_correction_gating=binary_kl takes an upper bound only"):
        pf.PolicyLoss(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=(0.1, 1))
    with pytest.raises(ValueError, match="is_correction_gating must be ratio/binary_kl/tv"):
        pf.PolicyLoss(is_correction_level="token", is_correction_gating="k3")
    with pytest.raises(ValueError, match="is_correction_mode=clip requires is_correction_level=token"):
        pf.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="given twice"):
        pf.PolicyLoss(is_correction_level="token", enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0, 2])
    log_prob, old, _, adv, mask = correction_inputs()
    with pytest.raises(ValueError, match="rollout_log_probs: required"):
        pf.PolicyLoss(is_correction_level="token")(log_prob, old, adv, mask)


@pytest.mark.op("value_loss")
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_value_loss_matches_openrlhf(backend, clip_eps, token_level_loss):
    values, old, returns = randn(*SHAPE, seed=5), randn(*SHAPE, seed=6), randn(*SHAPE, seed=7)
    mask = ragged_mask(*SHAPE, seed=8)
    out, grad = with_grad(lambda v: pf.ValueLoss(clip_eps, token_level_loss)(v, old, returns, mask), values)
    want, want_grad = with_grad(lambda v: loss_module.ValueLoss(clip_eps, token_level_loss)(
        v, old.double(), returns.double(), mask.double()), values.double())
    assert_close_f64(out, want, "loss")
    assert_close_f64(grad, want_grad, "grad")


@pytest.mark.op("kl_penalty")
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased_gradient", [False, True])
def test_compute_approx_kl_matches_openrlhf(backend, estimator, unbiased_gradient):
    log_prob, base = randn(*SHAPE, seed=9, scale=6.0), randn(*SHAPE, seed=10, scale=6.0)  # past the ±10 clamp
    out, grad = with_grad(lambda lp: pf.compute_approx_kl(lp, base, kl_estimator=estimator,
                                                          unbiased_gradient=unbiased_gradient), log_prob)
    want, want_grad = with_grad(lambda lp: utils.compute_approx_kl(lp, base.double(), kl_estimator=estimator,
                                                                   unbiased_gradient=unbiased_gradient),
                                log_prob.double())
    assert_close_f64(out, want.float().double(), estimator, magnitude=10)
    assert_close_f64(grad, want_grad.float().double(), estimator + " grad", magnitude=10)


@pytest.mark.op("masked_mean")
def test_masked_mean_matches_openrlhf(backend):
    x, mask = randn(*SHAPE, seed=11), ragged_mask(*SHAPE, seed=12)
    assert_close_f64(pf.masked_mean(x, mask), utils.masked_mean(x.double(), mask.double()), "masked_mean")
    with pytest.raises(UnsupportedOption, match="dim=-1"):
        pf.masked_mean(x, mask, dim=-1)


@pytest.mark.op("gae")
@pytest.mark.parametrize("gamma, lambd", [(1.0, 0.95), (0.99, 1.0)])
def test_gae_matches_openrlhf(backend, gamma, lambd):
    maker = openrlhf_experience_maker().RemoteExperienceMaker
    values, rewards, mask = randn(*SHAPE, seed=13), randn(*SHAPE, seed=14), right_padded(*SHAPE, seed=15)
    adv, ret = pf.get_advantages_and_returns(values, rewards, mask, gamma, lambd)
    want_adv, want_ret = maker.get_advantages_and_returns(None, values.double(), rewards.double(), mask.double(),
                                                          gamma, lambd)
    assert_close_f64(adv, want_adv, "advantages")
    assert_close_f64(ret, want_ret, "returns")
    with pytest.raises(UnsupportedOption, match="gap or leading zeros"):
        pf.get_advantages_and_returns(values, rewards, ragged_mask(*SHAPE, seed=16), gamma, lambd)


def test_openrlhfs_own_policy_loss_tests_pass_on_the_adapter():
    """OpenRLHF's own tests/test_loss_aggregation.py (shipped in its wheel), with ppo_fast's PolicyLoss."""
    tests = own_tests(utils, "tests/test_loss_aggregation.py", stand_ins=OPENRLHF_STAND_INS)
    tests.PolicyLoss = pf.PolicyLoss
    tests.test_policy_loss_token_mean_aggregation_matches_full_batch()
    tests.test_policy_kl_metric_is_not_clamped()
