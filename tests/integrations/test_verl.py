"""ppo_fast.integrations.verl against verl's own functions (verl.trainer.ppo.core_algos and
verl.utils.torch_functional, loaded by tests/peers.py): values, gradients and metrics."""
import numpy as np
import pytest
import torch
from peers import own_tests, stand_in_site, verl_core_algos, verl_rollout_corr_helper, verl_torch_functional
from support import DEVICE, assert_close_f64, backends_for, on_backend, ragged_mask, randn

from ppo_fast import ops
from ppo_fast.integrations import UnsupportedOption
from ppo_fast.integrations import verl as pf

core = verl_core_algos()
verl_F = verl_torch_functional()
OP = "ppo_policy_loss"
MODES = pf.AGG_MODES
SHAPE = (6, 37)


class ActorConfig(dict, core.ActorConfig):
    """What verl's policy losses read of its ActorConfig: attributes, .get, global_batch_info (an
    instance of verl's ActorConfig class as loaded, which gspo / cispo / sapo assert)."""

    def __getattr__(self, key):
        return self[key]


def grads(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(loss * 1.7, x)[0]


def policy_inputs(dtype=torch.float32, seed=0):
    old = randn(*SHAPE, seed=seed, scale=0.5) - 2.0
    log_prob = old + randn(*SHAPE, seed=seed + 1, scale=0.4)
    return old.to(dtype), log_prob.to(dtype), randn(*SHAPE, seed=seed + 2).to(dtype), ragged_mask(*SHAPE, seed=seed,
                                                                                                   empty_rows=[2])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 4, "batch_num_tokens": 700, "global_batch_size": 24,
                                             "loss_scale_factor": 50}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_verl(backend, mode, batch_info, dtype):
    old, log_prob, adv, mask = policy_inputs(dtype)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                         global_batch_info=batch_info)
    (loss, metrics), grad = grads(lambda lp: pf.compute_policy_loss(old, lp, adv, mask, mode, config), log_prob)
    f64 = lambda t: t.double()  # noqa: E731 - verl's own math on the same values, in float64
    (want, want_metrics), want_grad = grads(
        lambda lp: core.compute_policy_loss_vanilla(f64(old), lp, f64(adv), mask.double(), mode, config), f64(log_prob))
    assert_close_f64(loss, want, "loss")
    assert_close_f64(grad, want_grad, "grad")
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), key


VERL_LOSSES = {"ppo_fast": "vanilla", "ppo_fast_gspo": "gspo", "ppo_fast_cispo": "cispo", "ppo_fast_gpg": "gpg",
               "ppo_fast_sapo": "sapo"}


@pytest.mark.parametrize("name", list(VERL_LOSSES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("weights", [False, True])
def test_every_registered_loss_mode_matches_verls_own(backend, name, mode, weights):
    """Each loss_mode register() adds against verl's own function of that objective, with verl's
    rollout correction weights (per token, zero on padding, as verl passes them) or without."""
    old, log_prob, adv, mask = policy_inputs(seed=11)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.0,
                         tau_neg=1.05, global_batch_info={"dp_size": 2, "batch_num_tokens": 300,
                                                          "global_batch_size": 12})
    is_weights = (randn(*SHAPE, seed=12).abs() + 0.5) * mask if weights else None
    compare_with_verls_own(name, VERL_LOSSES[name], (old, log_prob, adv, mask), mode, config, is_weights)


def compare_with_verls_own(name, verl_name, inputs, mode, config, is_weights):
    """pf.POLICY_LOSSES[name] against verl's compute_policy_loss_<verl_name> (in float64) on the same
    inputs: loss, gradient, metrics; torch's global generator seeded alike before each (clip_cov's
    random cut). Returns ppo_fast's metrics."""
    old, log_prob, adv, mask = inputs
    theirs = getattr(core, f"compute_policy_loss_{verl_name}")
    torch.manual_seed(5)
    (loss, metrics), grad = grads(lambda lp: pf.POLICY_LOSSES[name](old, lp, adv, mask, mode, config,
                                                                    rollout_is_weights=is_weights), log_prob)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731 - verl's own math in float64
    torch.manual_seed(5)
    (want, want_metrics), want_grad = grads(
        lambda lp: theirs(f64(old), lp, f64(adv), mask.double(), mode, config, rollout_is_weights=f64(is_weights)),
        f64(log_prob))
    assert_close_f64(loss, want, "loss")
    assert_close_f64(grad, want_grad, "grad")
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), key
    return metrics


def test_register_adds_every_loss_mode():
    registry = core.POLICY_LOSS_REGISTRY
    before = dict(registry)
    try:
        pf.register()
        assert {name: registry[name] for name in [*VERL_LOSSES, *GENERIC_LOSSES, "ppo_fast_bypass_mode"]} == pf.POLICY_LOSSES
    finally:
        registry.clear()
        registry.update(before)


def test_policy_loss_rejects_what_it_cannot_follow():
    old, log_prob, adv, mask = policy_inputs()
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, global_batch_info={})
    with pytest.raises(ValueError, match=r"is_weights: expected shape \(6, 37\) \(per token\)"):
        pf.compute_policy_loss(old, log_prob, adv, mask, "token-mean", config,
                               rollout_is_weights=torch.ones(6, 5, device=DEVICE))
    with pytest.raises(ValueError, match="loss_agg_mode: expected one of"):
        pf.compute_policy_loss(old, log_prob, adv, mask, "seq-sum", config)


@pytest.mark.op("agg_loss")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 10}])
def test_agg_loss_matches_verl(backend, mode, info):
    loss, mask = randn(*SHAPE, seed=5), ragged_mask(*SHAPE, seed=6, empty_rows=[0])
    got, grad = grads(pf.agg_loss, loss, mask, mode, **info)
    want, want_grad = grads(core.agg_loss, loss.double(), mask.double(), mode, **info)
    assert_close_f64(got, want, mode)
    assert_close_f64(grad, want_grad, mode + " grad")


@pytest.mark.op("value_loss")
@pytest.mark.parametrize("mode", MODES)
def test_value_loss_matches_verl(backend, mode):
    values, old, returns = randn(*SHAPE, seed=7), randn(*SHAPE, seed=8), randn(*SHAPE, seed=9)
    mask = ragged_mask(*SHAPE, seed=10)
    (loss, clipfrac), grad = grads(pf.compute_value_loss, values, returns, old, mask, 0.2, mode)
    (want, want_clipfrac), want_grad = grads(core.compute_value_loss, values.double(), returns.double(), old.double(),
                                             mask.double(), 0.2, mode)
    assert_close_f64(loss, want, "loss")
    assert_close_f64(grad, want_grad, "grad")
    assert float(clipfrac) == pytest.approx(float(want_clipfrac))


@pytest.mark.op("kl_penalty")
@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_kl_penalty_matches_verl(backend, name):
    log_prob, ref = randn(*SHAPE, seed=11) - 2, randn(*SHAPE, seed=12) - 2
    got, grad = grads(lambda lp: pf.kl_penalty(lp, ref, name).sum(), log_prob)
    want, want_grad = grads(lambda lp: core.kl_penalty(lp, ref.double(), name).sum(), log_prob.double())
    assert_close_f64(got, want, name, magnitude=10)
    assert_close_f64(grad, want_grad, name + " grad")
    with pytest.raises(UnsupportedOption, match="full"):
        pf.kl_penalty(log_prob, ref, "full")


@pytest.mark.parametrize("name", [b for b in backends_for("gae") if b in backends_for("masked_whiten")])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0)])
def test_gae_matches_verl(name, gamma, lam):
    """GAE then whitening: on the backends that have both ops."""
    rewards, values, mask = randn(*SHAPE, seed=13), randn(*SHAPE, seed=14), ragged_mask(*SHAPE, seed=15)
    with on_backend(name):
        adv, ret = pf.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    want_adv, want_ret = core.compute_gae_advantage_return(rewards.double(), values.double(), mask.double(), gamma, lam)
    assert_close_f64(adv, want_adv, "advantages")
    assert_close_f64(ret, want_ret, "returns")


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_and_rloo_match_verl(norm):
    rewards = torch.zeros(12, 9, device=DEVICE)
    rewards[:, -1] = randn(12, seed=16)
    mask = torch.ones(12, 9, device=DEVICE)
    index = np.array(["a", "b", "c"] * 4, dtype=object)  # interleaved groups, as verl's uids come
    got = pf.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    want = core.compute_grpo_outcome_advantage(rewards.double(), mask.double(), index, norm_adv_by_std_in_grpo=norm)
    assert_close_f64(got[0], want[0], "grpo")
    got, want = pf.compute_rloo_outcome_advantage(rewards, mask, index), core.compute_rloo_outcome_advantage(
        rewards.double(), mask.double(), index)
    assert_close_f64(got[0], want[0], "rloo")
    uneven = np.array(["a", "b", "c", "b", "a", "b", "c", "b", "a"], dtype=object)  # groups of 3, 4 and 2
    for mode in (True, False):
        got = pf.compute_grpo_outcome_advantage(rewards[:9], mask[:9], uneven, norm_adv_by_std_in_grpo=mode)
        want = core.compute_grpo_outcome_advantage(rewards[:9].double(), mask[:9].double(), uneven,
                                                   norm_adv_by_std_in_grpo=mode)
        assert_close_f64(got[0], want[0], "grpo, groups of unequal sizes")
    assert_close_f64(pf.compute_rloo_outcome_advantage(rewards[:9], mask[:9], uneven)[0],
                     core.compute_rloo_outcome_advantage(rewards[:9].double(), mask[:9].double(), uneven)[0], "rloo")
    with pytest.raises(UnsupportedOption, match="groups of one sample"):
        pf.compute_grpo_outcome_advantage(rewards[:4], mask[:4], index[:4])  # b and c alone


@pytest.mark.op("logprobs_from_logits")
def test_logprobs_and_entropy_match_verl(backend):
    logits, labels = randn(4, 7, 1013, seed=17, scale=3.0), torch.randint(0, 1013, (4, 7), device=DEVICE)
    got, grad = grads(lambda x: pf.logprobs_from_logits(x, labels).sum(), logits)
    want, want_grad = grads(lambda x: verl_F.logprobs_from_logits_naive(x, labels).sum(), logits.double())
    assert_close_f64(got, want, "logp", magnitude=10)
    assert_close_f64(grad, want_grad, "grad")
    assert_close_f64(pf.entropy_from_logits(logits), verl_F.entropy_from_logits(logits.double()), "entropy")


@pytest.mark.op("fused_linear_logprobs")
def test_fused_linear_for_ppo_matches_verl(backend):
    from peers import load

    verl_exp = load("verl.utils.experimental.torch_functional", stand_ins=("tensordict",))
    hidden, weight = randn(3, 11, 32, seed=18), randn(509, 32, seed=19, scale=0.3)
    ids = torch.randint(0, 509, (3, 11), device=DEVICE)
    logp, entropy = pf.FusedLinearForPPO(chunk_size=8)(hidden, weight, ids, temperature=0.7)
    want_logp, want_entropy = verl_exp.FusedLinearForPPO(chunk_size=8)(hidden.double(), weight.double(), ids, 0.7)
    assert_close_f64(logp, want_logp, "logp", magnitude=10)
    assert_close_f64(entropy, want_entropy, "entropy")


def test_register_makes_ppo_fast_nameable_in_verl():
    pf.register()
    assert core.get_policy_loss_fn("ppo_fast") is pf.compute_policy_loss
    fn = core.get_adv_estimator_fn("ppo_fast_grpo")
    rewards, mask = torch.zeros(4, 3, device=DEVICE), torch.ones(4, 3, device=DEVICE)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 2.0, 1.0])
    adv, _ = fn(token_level_rewards=rewards, response_mask=mask, index=np.array([0, 0, 1, 1]), config=None)
    assert adv[0, 0] > 0 > adv[1, 0]


def verl_own_tests():
    """verl's own unit tests of these functions (shipped in its wheel), with ppo_fast's adapters in
    place of verl's functions."""
    module = own_tests(core, "tests/trainer/ppo/test_core_algos_on_cpu.py")
    module.compute_gae_advantage_return = pf.compute_gae_advantage_return
    module.kl_penalty = pf.kl_penalty
    return module


@pytest.mark.parametrize("repeat", range(5))
def test_verls_own_multi_turn_gae_test_passes_on_the_adapter(repeat):
    verl_own_tests().test_multi_turn_compute_gae_advantage_return()  # random gammas and values each time


def test_verls_own_kl_straight_through_tests_pass_on_the_adapter():
    tests = verl_own_tests()
    (mark,) = [m for m in tests.test_kl_penalty_straight_through_value_matches_base.pytestmark
               if m.name == "parametrize"]
    for name, base in mark.args[1]:
        tests.test_kl_penalty_straight_through_value_matches_base(name, base)
    tests.test_kl_penalty_k3_plus_uses_k2_gradient()


# verl's objectives that run on ppo_fast's generic path: loss_mode -> (verl's name, config extras)
GENERIC_LOSSES = {
    "ppo_fast_dro": ("dro", {"policy_loss": {"dro_beta": 0.3}}),
    "ppo_fast_dppo_tv": ("dppo_tv", {"clip_ratio_c": 3.0}),
    "ppo_fast_dppo_kl": ("dppo_kl", {"clip_ratio_c": 3.0}),
    "ppo_fast_geo_mean": ("geo_mean", {}),
    "ppo_fast_clip_cov": ("clip_cov", {"policy_loss": {"clip_cov_ratio": 0.2, "clip_cov_lb": -1.0,
                                                       "clip_cov_ub": 5.0}}),
    "ppo_fast_kl_cov": ("kl_cov", {"policy_loss": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5}}),
}


class PolicyLossConfig(dict):
    def __getattr__(self, key):
        return self.get(key)


@pytest.mark.parametrize("name", list(GENERIC_LOSSES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("weights", [False, True])
def test_verls_newer_objectives_match_verls_own(backend, name, mode, weights):
    """dro, dppo_tv / dppo_kl, geo_mean (GMPO), clip_cov and kl_cov, each through the registry's generic
    path on every backend, against verl's own function on the same inputs: loss, gradient, metrics
    (clip_cov's random cut drawn from the same torch seed on both sides)."""
    verl_name, extras = GENERIC_LOSSES[name]
    old, log_prob, adv, mask = policy_inputs(seed=21)
    extras = {k: PolicyLossConfig(v) if isinstance(v, dict) else v for k, v in extras.items()}
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, global_batch_info={"dp_size": 1},
                         **{"policy_loss": PolicyLossConfig(), **extras})
    is_weights = (randn(*SHAPE, seed=22).abs() + 0.5) * mask if weights else None
    metrics = compare_with_verls_own(name, verl_name, (old, log_prob, adv, mask), mode, config, is_weights)
    if name == "ppo_fast_clip_cov":  # the cut happened (the bounds admit tokens), so the test can tell
        assert metrics["actor/pg_clipfrac"] > 0


# ----------------------------------------------------------------------------- rollout correction
# verl's rollout_rs options with a bound each (k1: verl's "lower_upper" ratio bounds), chosen so that
# every one rejects some tokens of the inputs below and keeps others
RS_BOUNDS = {"token_k1": "0.8_1.25", "token_k2": "0.02", "token_k3": "0.02", "seq_sum_k1": "0.5_2.0",
             "seq_sum_k2": "0.3", "seq_sum_k3": "0.3", "seq_mean_k1": "0.9_1.1", "seq_mean_k2": "0.03",
             "seq_mean_k3": "0.04", "seq_max_k2": "0.1", "seq_max_k3": "0.1"}
RS_CASES = [*RS_BOUNDS, "token_k1,seq_max_k3", "seq_mean_k2,token_k3,seq_sum_k1"]


def rollout_inputs(seed=30):
    """(current log-probs, rollout log-probs, ragged mask with an empty row) a sampler's precision apart."""
    old, log_prob, _, mask = policy_inputs(seed=seed)
    return log_prob, log_prob + randn(*SHAPE, seed=seed + 7, scale=0.25), mask


def criteria_of(rollout_rs):
    """ppo_fast's criteria for a verl rollout_rs string with RS_BOUNDS."""
    return {name: tuple(float(b) for b in RS_BOUNDS[name].split("_")) if name.endswith("k1") else float(RS_BOUNDS[name])
            for name in rollout_rs.split(",")}


@pytest.mark.parametrize("rollout_rs", RS_CASES)
def test_rollout_rejection_matches_verls_own(rollout_rs):
    """ops.rollout_rejection against verl's compute_rollout_rejection_mask (every rollout_rs option,
    and chains): the kept tokens, and the masked fractions verl logs (per option and combined)."""
    helper = verl_rollout_corr_helper()
    log_prob, rollout, mask = rollout_inputs()
    keep, stats = ops.rollout_rejection(log_prob, rollout, mask, criteria=criteria_of(rollout_rs))
    want_mask, want = helper.compute_rollout_rejection_mask(
        (log_prob - rollout).double(), mask.double(), rollout_rs, ",".join(RS_BOUNDS[n] for n in rollout_rs.split(",")))
    assert torch.equal(keep, want_mask.bool())
    assert 0 < stats["masked_fraction"] < 1  # the comparison is not vacuous
    for name in [*rollout_rs.split(","), None]:
        for part in ("masked_fraction", "seq_masked_fraction"):
            ours, theirs = (part, f"rollout_rs_{part}") if name is None else (f"{name}_{part}",
                                                                                f"rollout_rs_{name}_{part}")
            assert stats[ours].item() == pytest.approx(want[theirs], rel=1e-6, abs=1e-7), theirs


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", ["2.0", "0.7_1.5"])
def test_batch_normalized_is_weights_match_verls_own(level, threshold):
    """ops.rollout_correction(batch_normalize=True) against verl's compute_rollout_correction_weights
    with rollout_is_batch_normalize (TIS and IcePop, token and sequence): weights and the factor."""
    helper = verl_rollout_corr_helper()
    log_prob, rollout, mask = rollout_inputs()
    bounds = [float(b) for b in threshold.split("_")]
    low, high = (None, bounds[0]) if len(bounds) == 1 else bounds
    weights, _, stats = ops.rollout_correction(log_prob, rollout, mask, level=level,
                                               mode="truncate" if low is None else "mask", low=low, high=high,
                                               batch_normalize=True)
    want, want_metrics = helper.compute_rollout_correction_weights(
        (log_prob - rollout).double(), mask.double(), level, threshold, rollout_is_batch_normalize=True)
    assert_close_f64(weights.expand(SHAPE) * mask, want, "weights")
    assert stats["is_batch_norm_factor"].item() == pytest.approx(want_metrics["rollout_is_batch_norm_factor"], rel=1e-6)
    assert stats["is_batch_norm_factor"].item() != pytest.approx(1.0)


def test_rollout_rejection_refuses_bad_criteria():
    log_prob, rollout, mask = rollout_inputs()
    for criteria, match in [({}, "criteria: expected a non-empty dict"), ({"seq_max_k1": (0.5, 2.0)}, "criteria"),
                            ({"token_k1": 1.5}, r"criteria\['token_k1'\]: expected ratio bounds"),
                            ({"token_k1": (2.0, 1.0)}, "0 < low <= high"), ({"seq_sum_k3": 0.0}, "bound > 0")]:
        with pytest.raises(ValueError, match=match):
            ops.rollout_rejection(log_prob, rollout, mask, criteria=criteria)


BYPASS_CASES = {
    "ppo_clip": dict(loss_type="ppo_clip", rollout_is="token", rollout_rs="token_k1,seq_max_k3",
                     rollout_rs_threshold="0.8_1.25,0.1"),
    "reinforce-token-normalized": dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5,
                                       rollout_is_batch_normalize=True, rollout_rs="seq_mean_k2",
                                       rollout_rs_threshold="0.04"),
    "reinforce-sequence-icepop": dict(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold="0.2_5.0"),
    "reinforce-no-is": dict(loss_type="reinforce", rollout_rs="token_k3", rollout_rs_threshold="0.02"),
}


@pytest.mark.parametrize("case", BYPASS_CASES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_bypass_mode_matches_verls_own(backend, case, mode):
    """ppo_fast_bypass_mode against verl's bypass_mode (ppo_clip and reinforce; IS token / sequence,
    TIS / IcePop, batch-normalised; rejection chains): loss, gradient, and every metric (verl's
    rollout_corr/* diagnostics among them)."""
    verl_rollout_corr_helper()  # loaded for both sides' import of it
    log_prob, rollout, mask = rollout_inputs()
    adv = randn(*SHAPE, seed=33)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                         global_batch_info={"dp_size": 1},
                         policy_loss=PolicyLossConfig(rollout_correction=PolicyLossConfig(BYPASS_CASES[case])))
    metrics = compare_with_verls_own("ppo_fast_bypass_mode", "bypass_mode", (rollout, log_prob, adv, mask), mode,
                                     config, None)
    assert any(key.startswith("rollout_corr/") for key in metrics)


# ----------------------------------------------------------------------------- verl in one config line
# What `import verl` needs that its package __init__ imports but the registration path never calls
# (ray, tensordict, codetiming: verl's runtime, not installed with --no-deps), stood in for in the
# fresh process by tests/peers.py's sitecustomize where they are not installed.
VERL_RUNTIME = ("ray", "tensordict", "codetiming")


def fresh_verl_process(tmp_path, code, **env):
    import os
    import subprocess
    import sys

    site = stand_in_site(tmp_path, VERL_RUNTIME)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": site, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


REGISTERED = ("import verl.trainer.ppo.core_algos as c; "
              "print(all(n in c.POLICY_LOSS_REGISTRY for n in ('ppo_fast', 'ppo_fast_dro', 'ppo_fast_geo_mean')), "
              "'ppo_fast_grpo' in c.ADV_ESTIMATOR_REGISTRY)")


def test_import_verl_alone_finds_ppo_fast_through_its_entry_point(tmp_path):
    """A fresh process that imports only verl (as a Ray worker does): the `verl.plugins` entry point
    of ppo_fast's pyproject.toml registers every loss mode and estimator; with verl's plugin
    discovery off, nothing is registered (the entry point, not an import of ours, did it)."""
    pytest.importorskip("verl")
    assert fresh_verl_process(tmp_path, REGISTERED) == "True True"
    assert fresh_verl_process(tmp_path, REGISTERED, VERL_USE_EXTERNAL_PLUGINS="none") == "False False"


def test_importing_the_adapter_registers(tmp_path):
    """external_lib=ppo_fast.integrations.verl (verl's own switch) works: the import registers."""
    pytest.importorskip("verl")
    code = "import ppo_fast.integrations.verl; " + REGISTERED
    assert fresh_verl_process(tmp_path, code, VERL_USE_EXTERNAL_PLUGINS="none") == "True True"


def test_fused_linear_for_ppo_follows_impl_backend():
    """verl's two implementations give the same values, and ppo_fast computes both; another name is
    refused with verl's message."""
    hidden, weight = randn(2, 5, 16, seed=40), randn(97, 16, seed=41, scale=0.3)
    ids = torch.randint(0, 97, (2, 5), device=DEVICE)
    a = pf.FusedLinearForPPO(chunk_size=4, impl_backend="torch")(hidden, weight, ids, 0.9)
    b = pf.FusedLinearForPPO(chunk_size=4, impl_backend="liger")(hidden, weight, ids, 0.9)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend: flash. Choose 'torch' or 'liger'."):
        pf.FusedLinearForPPO(impl_backend="flash")


@pytest.mark.op("fused_linear_logprobs")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_door(backend, reduction):
    """verl.utils.kernel.linear_cross_entropy's contract (its Triton kernel needs a GPU; its values
    are log_softmax(h W^T / T)[label] flattened, summed or averaged, and the per-token entropy)
    against float64; gradients through both outputs."""
    hidden, weight = randn(3, 7, 16, seed=42), randn(101, 16, seed=43, scale=0.3)
    labels = torch.randint(0, 101, (3, 7), device=DEVICE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = pf.linear_cross_entropy(h, w, labels, 0.8, reduction)
    grads = torch.autograd.grad(logp.sum() + 0.5 * entropy.sum(), (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    all64 = (h64.reshape(-1, 16) @ w64.T / 0.8).log_softmax(-1)
    logp64 = all64.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    logp64 = {"none": logp64, "sum": logp64.sum(), "mean": logp64.mean()}[reduction]
    entropy64 = -(all64.exp() * all64).sum(-1)
    grads64 = torch.autograd.grad(logp64.sum() + 0.5 * entropy64.sum(), (h64, w64))
    assert logp.shape == logp64.shape and entropy.shape == (21,)
    assert_close_f64(logp, logp64, "logp")
    assert_close_f64(entropy, entropy64, "entropy")
    for name, a, b in zip(("hidden", "weight"), grads, grads64):
        assert_close_f64(a, b, name)
    with pytest.raises(TypeError, match="temperature: expected a float"):
        pf.linear_cross_entropy(hidden, weight, labels, 1, reduction)
    with pytest.raises(ValueError, match="Invalid reduction: max"):
        pf.linear_cross_entropy(hidden, weight, labels, 1.0, "max")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="verl's linear_cross_entropy is a Triton kernel on CUDA")
def test_linear_cross_entropy_matches_verls_own_kernel():
    from peers import load

    theirs = load("verl.utils.kernel.linear_cross_entropy", stand_ins=("tensordict",)).linear_cross_entropy
    hidden, weight = randn(4, 64, 128, seed=44).bfloat16(), randn(1000, 128, seed=45, scale=0.1).bfloat16()
    labels = torch.randint(0, 1000, (4, 64), device=DEVICE)
    ours = pf.linear_cross_entropy(hidden, weight, labels, 0.9, "none")
    want = theirs(hidden, weight, labels, 0.9, "none")
    for a, b in zip(ours, want):
        torch.testing.assert_close(a.float(), b.float().reshape(a.shape), rtol=2e-2, atol=2e-2)


def test_a_dtensor_weight_is_gathered_once_per_call(tmp_path):
    """An FSDP2-sharded lm_head (a DTensor sharded on the vocabulary, one gloo rank here: the sharded
    type and its autograd, not the collective) through FusedLinearForPPO and linear_cross_entropy: the
    plain weight's values, and the gradient lands on the DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        hidden, weight = randn(2, 6, 16, seed=46).cpu(), randn(53, 16, seed=47, scale=0.3).cpu()
        ids = torch.randint(0, 53, (2, 6))
        sharded = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        plain = weight.clone().requires_grad_()
        for fn in (lambda w: pf.FusedLinearForPPO(chunk_size=4)(hidden, w, ids, 1.0),
                   lambda w: pf.linear_cross_entropy(hidden, w, ids, 1.0)):
            got, want = fn(sharded), fn(plain)
            (got[0].sum() + got[1].sum()).backward()
            (want[0].sum() + want[1].sum()).backward()
            torch.testing.assert_close(got[0], want[0])
            assert isinstance(sharded.grad, DTensor)
            torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad)
            sharded.grad = plain.grad = None
    finally:
        dist.destroy_process_group()
