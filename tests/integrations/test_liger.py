"""ppo_fast.integrations.liger against Liger-Kernel's own code: the cross-entropy modules and the fused
linear GRPO loss (every loss type, token and sequence ratios, importance weights, the reference
model's inputs, old log-probs or none)."""

import pytest
import torch
from peers import load
from support import DEVICE, randn

from ppo_fast import ops
from ppo_fast.integrations import UnsupportedOption, grpo_loss_types
from ppo_fast.integrations import liger as pf_liger

OP = "logprobs_from_logits"
V = 1013


def inputs(dtype=torch.float32, seed=0):
    logits = randn(3, 9, V, seed=seed, scale=3.0).to(dtype)
    return logits, torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def liger_modules():
    try:
        return load("liger_kernel.transformers.cross_entropy"), load("liger_kernel.transformers.fused_linear_cross_entropy")
    except ImportError as err:
        pytest.skip(f"liger_kernel does not import here: {err}")


def liger_ce_or_softcapped(liger_module, reduction, softcap):
    """Liger's module; with a softcap, Liger's definition -- cross_entropy(softcap tanh(z / softcap)) --
    in float64 (Liger's softcap kernel path fails under TRITON_INTERPRET: tl.tanh on a float)."""
    if softcap is None:
        return liger_module(reduction=reduction)

    def softcapped(logits, target):
        z = logits.double()
        return torch.nn.functional.cross_entropy(softcap * torch.tanh(z / softcap), target, reduction=reduction)

    return softcapped


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cross_entropy_matches_liger(backend, reduction, softcap):
    liger_ce, _ = liger_modules()
    logits, target = randn(17, V, seed=3, scale=2.0), torch.randint(0, V, (17,), device=DEVICE)
    target[::4] = -100
    x = logits.clone().requires_grad_()
    got = pf_liger.LigerCrossEntropyLoss(reduction=reduction, softcap=softcap)(x, target)
    (grad,) = torch.autograd.grad(got.sum(), x)
    y = logits.clone().requires_grad_()
    want = liger_ce_or_softcapped(liger_ce.LigerCrossEntropyLoss, reduction, softcap)(y, target)
    (want_grad,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.op("fused_linear_logprobs")
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_linear_cross_entropy_matches_liger(backend, reduction, softcap):
    _, liger_flce = liger_modules()
    hidden, weight = randn(19, 32, seed=4), randn(V, 32, seed=5, scale=0.3)
    target = torch.randint(0, V, (19,), device=DEVICE)
    target[::5] = -100
    got = pf_liger.LigerFusedLinearCrossEntropyLoss(reduction=reduction, softcap=softcap)(weight, hidden, target)
    if softcap is None:
        want = liger_flce.LigerFusedLinearCrossEntropyLoss(reduction=reduction)(weight, hidden, target)
    else:
        want = liger_ce_or_softcapped(None, reduction, softcap)(hidden @ weight.t(), target)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.op("fused_linear_ppo_loss")
def test_fused_linear_ppo_loss_matches_liger_grpo(backend):
    """Liger's own fused linear GRPO loss (k3 KL, token-mean as 'dapo', asymmetric clip) as the
    oracle: with per-sequence advantages the two objectives are the same function."""
    try:
        grpo_module = load("liger_kernel.chunked_loss.grpo_loss")
    except ImportError as err:
        pytest.skip(f"liger_kernel does not import here: {err}")
    B, T, H = 3, 7, 16
    hidden, weight = randn(B, T, H, seed=6), randn(V, H, seed=7, scale=0.25)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(8)).to(DEVICE) > 0.2
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels[..., None])[..., 0]
    old, ref, adv = logp + 0.3 * randn(B, T, seed=9), logp + 0.2 * randn(B, T, seed=10), randn(B, seed=11)
    grpo = grpo_module.LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, epsilon_low=0.2, epsilon_high=0.28,
                                                loss_type="dapo")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = grpo(h, w, labels, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    want_grads = torch.autograd.grad(want, (h, w))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got, _ = ops.fused_linear_ppo_loss(h, w, labels, old, adv[:, None].expand(B, T), mask, ref_log_prob=ref,
                                       kl_coef=0.04, kl_estimator="k3", clip_low=0.2, clip_high=0.28)
    got_grads = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("hidden", "weight"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_liger_options_ppo_fast_lacks_are_refused():
    with pytest.raises(UnsupportedOption, match="label_smoothing=0.1"):
        pf_liger.LigerCrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(UnsupportedOption, match="return_z_loss=True"):
        pf_liger.LigerFusedLinearCrossEntropyLoss(return_z_loss=True)
    with pytest.raises(ValueError, match="softcap: expected None or a number > 0, got 0.0"):
        pf_liger.LigerCrossEntropyLoss(softcap=0.0)
    with pytest.raises(UnsupportedOption, match="loss_type='luspo' at importance_sampling_level='token'"):
        pf_liger.LigerFusedLinearGRPOLoss(loss_type="luspo")
    with pytest.raises(UnsupportedOption, match="loss_type='ppo'"):
        pf_liger.LigerFusedLinearGRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported for loss_type='sapo'"):
        pf_liger.LigerFusedLinearGRPOLoss(loss_type="sapo", importance_sampling_level="sequence")


@pytest.mark.op("fused_linear_ppo_loss")
def test_luspo_matches_liger_where_liger_keeps_it_per_sequence(backend):
    """Liger's luspo (sequence level, no KL, no importance ratio: its per-token loss stays [B, 1]) is
    the mean of the sequences' token sums, as TRL's; the door refuses what would broadcast it."""
    B, T, H = 4, 9, 16
    hidden, weight = randn(B, T, H, seed=41), randn(V, H, seed=42, scale=0.25)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(43)).to(DEVICE)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(44)).to(DEVICE) > 0.25
    mask[-1] = False
    old = randn(B, T, seed=45, scale=0.3) - 4.0
    init = dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0, use_ref_model=False)
    results = []
    for module in (pf_liger.LigerFusedLinearGRPOLoss(**init), grpo_liger().LigerFusedLinearGRPOLoss(compiled=False,
                                                                                                     **init)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = module(h, w, labels, mask.long(), randn(B, seed=46), old_per_token_logps=old)
        results.append((loss, torch.autograd.grad(loss, (h, w))))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(UnsupportedOption, match="luspo with beta != 0"):
        pf_liger.LigerFusedLinearGRPOLoss(**{**init, "beta": 0.04})
    with pytest.raises(UnsupportedOption, match="luspo with vllm_is_ratio"):
        pf_liger.LigerFusedLinearGRPOLoss(**init)(hidden, weight, labels, mask.long(), randn(B, seed=46),
                                                  old_per_token_logps=old, vllm_is_ratio=torch.ones(B, T))


# Each constructor option of LigerFusedLinearGRPOLoss changed from a base setting: ppo_fast's class
# must change its result exactly as Liger's does (compiled and chunk_size change none, in either).
OPTION_CHANGES = {
    "beta": dict(beta=0.2), "compiled": dict(compiled=False), "use_ref_model=False": dict(use_ref_model=False),
    "use_ref_model=False, beta=0.1": dict(use_ref_model=False, beta=0.1), "chunk_size": dict(chunk_size=2),
    "epsilon_low": dict(epsilon_low=0.05), "epsilon_high": dict(epsilon_high=0.5), "loss_type": dict(loss_type="bnpo"),
    "max_completion_length": dict(loss_type="dr_grpo", max_completion_length=20),
    "importance_sampling_level": dict(importance_sampling_level="sequence"),
    "sapo temperatures": dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    "temperature": dict(temperature=0.7), "delta": dict(delta=1.5), "delta below the range": dict(delta=1.1),
    "use_bias_correction_kl": dict(use_bias_correction_kl=True),
    "use_bias_correction_kl, sequence": dict(use_bias_correction_kl=True, importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=1.0),
}


@pytest.mark.op("fused_linear_ppo_loss")
@pytest.mark.parametrize("change", list(OPTION_CHANGES))
def test_every_constructor_option_changes_the_result_as_liger_does(backend, change):
    B, T, H = 4, 9, 16
    hidden, weight = randn(B, T, H, seed=51), randn(V, H, seed=52, scale=0.25)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(53)).to(DEVICE)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(54)).to(DEVICE) > 0.25
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels[..., None])[..., 0]
    call = dict(old_per_token_logps=logp + 0.3 * randn(B, T, seed=55), ref_per_token_logps=logp + 0.2 * randn(
        B, T, seed=56), num_items_in_batch=torch.tensor(30.0))
    adv = randn(B, seed=57)

    def run(cls, **init):
        module = cls(**init) if cls is pf_liger.LigerFusedLinearGRPOLoss else cls(**{"compiled": False, **init})
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = module(h, w, labels, mask.long(), adv, **call)
        return loss, metrics, torch.autograd.grad(loss, (h, w))

    theirs_cls = grpo_liger().LigerFusedLinearGRPOLoss
    for init in ({}, OPTION_CHANGES[change]):
        got, want = run(pf_liger.LigerFusedLinearGRPOLoss, **init), run(theirs_cls, **init)
        torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert len(got[1]) == len(want[1])
        torch.testing.assert_close(got[1][0], want[1][0].float(), rtol=1e-5, atol=1e-6)  # the KL (or clip) metric


def grpo_liger():
    try:
        return load("liger_kernel.chunked_loss.grpo_loss")
    except ImportError as err:
        pytest.skip(f"liger_kernel does not import here: {err}")


GRPO_CASES = [(t, level) for t in grpo_loss_types.LOSS_TYPES for level in ("token", "sequence")
              if not (level == "sequence" and t in ("cispo", "sapo", "vespo")) and t != "luspo"]


@pytest.mark.op("fused_linear_ppo_loss")
@pytest.mark.parametrize("loss_type, level", GRPO_CASES)
@pytest.mark.parametrize("extras", ["old+ref", "none", "ref_model+is+delta", "below the range"])
def test_grpo_loss_class_matches_liger_for_every_loss_type(backend, loss_type, level, extras):
    """The drop-in LigerFusedLinearGRPOLoss against Liger's own (compiled=False: its chunked torch
    code): loss, gradients to the hidden states and the head, the KL metric and the clip fraction
    (where the two define it alike)."""
    B, T, H = 4, 9, 16
    hidden, weight = randn(B, T, H, seed=21), randn(V, H, seed=22, scale=0.25)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(23)).to(DEVICE)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(24)).to(DEVICE) > 0.25
    mask[-1] = False  # an empty sequence
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t() / 0.9, -1).gather(-1, labels[..., None])[..., 0]
    adv = randn(B, seed=25)
    kwargs, init = {}, dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=0.2,
                            epsilon_high=5.0 if loss_type == "cispo" else 0.28, temperature=0.9,
                            max_completion_length=12, beta=0.04)
    if extras == "old+ref":
        kwargs = dict(old_per_token_logps=logp + 0.3 * randn(B, T, seed=26), ref_per_token_logps=logp + 0.2 * randn(
            B, T, seed=27), num_items_in_batch=torch.tensor(40.0))
    elif extras == "none":  # on-policy (no old log-probs), no KL, no reference model
        init.update(beta=0.0, use_ref_model=False)
    elif extras == "below the range":  # delta < 1 + epsilon_high (clip_delta), a CISPO cap below 1
        kwargs = dict(old_per_token_logps=logp + 0.3 * randn(B, T, seed=32))
        init.update(delta=None if loss_type in ("cispo", "sapo") else 1.1, beta=0.0, use_ref_model=False,
                    epsilon_high=0.8 if loss_type == "cispo" else 0.28)
    else:
        kwargs = dict(old_per_token_logps=logp + 0.3 * randn(B, T, seed=28), ref_input=randn(B, T, H, seed=29),
                      ref_weight=randn(V, H, seed=30, scale=0.25),
                      vllm_is_ratio=torch.where(mask, randn(B, T, seed=31).abs() + 0.5, 1.0))  # 1 at padding, as TRL's
        if loss_type not in ("cispo", "sapo"):
            init["delta"] = 2.0
    theirs = grpo_liger().LigerFusedLinearGRPOLoss(compiled=False, **init)
    ours = pf_liger.LigerFusedLinearGRPOLoss(**init)

    def run(module):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = module(h, w, labels, mask.long(), adv, **kwargs)
        return loss, metrics, torch.autograd.grad(loss, (h, w))

    (got, got_metrics, got_grads), (want, want_metrics, want_grads) = run(ours), run(theirs)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("hidden", "weight"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert len(got_metrics) == len(want_metrics)
    if init["beta"] != 0.0:
        torch.testing.assert_close(got_metrics[0], want_metrics[0].float(), rtol=1e-5, atol=1e-6)
    if loss_type != "cispo":
        torch.testing.assert_close(got_metrics[-1], want_metrics[-1].float(), rtol=1e-5, atol=1e-6)
