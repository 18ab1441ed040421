"""ppo_fast.integrations.trl against TRL's own selective_log_softmax / entropy_from_logits, and
ppo_fast.integrations.liger against Liger-Kernel's own cross-entropy modules."""

import pytest
import torch
from peers import load, trl_utils
from support import DEVICE, assert_close_f64, randn

from ppo_fast import ops
from ppo_fast.integrations import UnsupportedOption
from ppo_fast.integrations import liger as pf_liger
from ppo_fast.integrations import trl as pf_trl

OP = "logprobs_from_logits"
V = 1013


def inputs(dtype=torch.float32, seed=0):
    logits = randn(3, 9, V, seed=seed, scale=3.0).to(dtype)
    return logits, torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(backend, dtype, temperature):
    trl = trl_utils()
    logits, index = inputs(dtype)
    row_mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    got = pf_trl.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
    want = trl.selective_log_softmax(logits.double(), index, temperature=temperature, row_mask=row_mask)
    assert got.dtype == dtype  # TRL's convention: the logits' dtype
    assert_close_f64(got, want, "logp", magnitude=10)
    logits.requires_grad_()
    (grad,) = torch.autograd.grad(pf_trl.selective_log_softmax(logits, index).float().sum(), logits)
    x = logits.detach().double().requires_grad_()
    (want_grad,) = torch.autograd.grad(trl.selective_log_softmax(x, index).sum(), x)
    assert_close_f64(grad, want_grad, "grad")
    with pytest.raises(UnsupportedOption, match="K ids per position"):
        pf_trl.selective_log_softmax(logits, index[..., None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits_matches_trl(backend, dtype):
    logits, _ = inputs(dtype, seed=2)
    got = pf_trl.entropy_from_logits(logits)
    assert got.dtype == dtype
    assert_close_f64(got, trl_utils().entropy_from_logits(logits.double()), "entropy")


def test_patch_swaps_trls_functions():
    trl = trl_utils()
    replaced = pf_trl.patch()
    assert "trl.trainer.utils.selective_log_softmax" in replaced
    assert trl.selective_log_softmax is pf_trl.selective_log_softmax
    assert trl.entropy_from_logits is pf_trl.entropy_from_logits


def liger_modules():
    try:
        return load("liger_kernel.transformers.cross_entropy"), load("liger_kernel.transformers.fused_linear_cross_entropy")
    except ImportError as err:
        pytest.skip(f"liger_kernel does not import here: {err}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_matches_liger(backend, reduction):
    liger_ce, _ = liger_modules()
    logits, target = randn(17, V, seed=3, scale=2.0), torch.randint(0, V, (17,), device=DEVICE)
    target[::4] = -100
    x = logits.clone().requires_grad_()
    got = pf_liger.LigerCrossEntropyLoss(reduction=reduction)(x, target)
    (grad,) = torch.autograd.grad(got.sum(), x)
    y = logits.clone().requires_grad_()
    want = liger_ce.LigerCrossEntropyLoss(reduction=reduction)(y, target)
    (want_grad,) = torch.autograd.grad(want.sum(), y)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.op("fused_linear_logprobs")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_linear_cross_entropy_matches_liger(backend, reduction):
    _, liger_flce = liger_modules()
    hidden, weight = randn(19, 32, seed=4), randn(V, 32, seed=5, scale=0.3)
    target = torch.randint(0, V, (19,), device=DEVICE)
    target[::5] = -100
    got = pf_liger.LigerFusedLinearCrossEntropyLoss(reduction=reduction)(weight, hidden, target)
    want = liger_flce.LigerFusedLinearCrossEntropyLoss(reduction=reduction)(weight, hidden, target)
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
    with pytest.raises(UnsupportedOption, match="softcap"):
        pf_liger.LigerCrossEntropyLoss(softcap=30.0)
