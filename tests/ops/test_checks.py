"""The input-check policy (ppo_fast/ops/checks.py): value checks on CPU tensors, no host sync on
CUDA tensors (value checks only with PPO_FAST_CHECK_VALUES=1), kernels safe without them."""
import contextlib

import pytest
import torch
from support import DEVICE, backends_for, on_backend, ragged_mask, randn

from ppo_fast import ops
from ppo_fast.ops import checks

HOST_READS = ("__bool__", "item", "tolist", "nonzero", "numpy", "__int__", "__float__")


def op_inputs():
    B, T, V = 3, 19, 53
    return {"mask": ragged_mask(B, T, seed=1), "x": randn(B, T, seed=2).requires_grad_(),
            "logits": randn(B, T, V, seed=3).requires_grad_(), "labels": torch.randint(0, V, (B, T), device=DEVICE),
            "tokens": [randn(B, T, seed=s) for s in range(4, 10)], "scores": randn(B, seed=10),
            "hidden": randn(B, T, 8, seed=12).requires_grad_(), "weight": randn(V, 8, seed=13)}


def every_op_call(x):
    """One forward and backward of each op that has a device kernel."""
    mask, t = x["mask"], x["tokens"]
    logp, entropy = ops.logprobs_from_logits(x["logits"], x["labels"], return_entropy=True)
    loss, _ = ops.ppo_policy_loss(x["x"], t[0], t[1], mask)
    vloss, _ = ops.value_loss(x["x"], t[2], t[3], mask)
    kl = ops.kl_penalty(x["x"], t[4], estimator="k3")
    total = loss + vloss + ops.agg_loss(kl, mask) + ops.masked_mean(entropy, mask) + logp.sum()
    total.backward()
    rewards = ops.compute_rewards(x["scores"], x["x"].detach(), t[5], mask, kl_coef=0.1)
    adv, _ = ops.gae(rewards, t[0], mask)
    ops.masked_whiten(adv, mask)
    ops.fused_linear_logprobs(x["hidden"], x["weight"], x["labels"], chunk_size=16).sum().backward()
    loss, _ = ops.fused_linear_ppo_loss(x["hidden"], x["weight"], x["labels"], t[0], t[1], mask, ref_log_prob=t[2],
                                        kl_coef=0.1, entropy_coef=0.01, chunk_size=16)
    loss.backward()


@contextlib.contextmanager
def host_reads_forbidden(monkeypatch):
    def forbidden(name):
        def read(*_args, **_kwargs):
            raise AssertionError(f"a host read of a tensor (Tensor.{name}): a device sync on CUDA")

        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        yield


@pytest.mark.skipif(DEVICE.type != "cpu" or "triton" not in backends_for("gae"), reason="the CPU stand-in for CUDA")
def test_the_cuda_code_path_reads_nothing_back_to_the_host(monkeypatch):
    """Triton (the CUDA default) with value checks off, as on CUDA: no tensor value reaches
    Python, so nothing waits for the device. (The interpreter runs kernels through numpy on its
    own copies, which does not go through these methods.)"""
    monkeypatch.setattr(checks, "value_checks_enabled", lambda device: False)
    with on_backend("triton"):
        every_op_call(op_inputs())  # warm-up: first launches compile
        inputs = op_inputs()
        with host_reads_forbidden(monkeypatch):
            every_op_call(inputs)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_device_sync_on_cuda(backend):
    with on_backend(backend):
        every_op_call(op_inputs())
        inputs = op_inputs()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            every_op_call(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_value_checks_run_on_cpu_and_only_on_request_on_cuda(monkeypatch):
    monkeypatch.delenv("PPO_FAST_CHECK_VALUES", raising=False)
    assert checks.value_checks_enabled(torch.device("cpu"))
    assert not checks.value_checks_enabled(torch.device("cuda"))
    monkeypatch.setenv("PPO_FAST_CHECK_VALUES", "1")
    assert checks.value_checks_enabled(torch.device("cuda"))


@pytest.mark.parametrize("backend", backends_for("logprobs_from_logits"))
def test_labels_out_of_range_without_checks_give_nan_not_a_crash(monkeypatch, backend):
    monkeypatch.setattr(checks, "value_checks_enabled", lambda device: False)
    if backend == "torch":
        pytest.skip("the reference gathers with torch, which raises its own index error")
    logits = randn(4, 29, seed=1)
    labels = torch.tensor([3, 29, -5, 7], device=DEVICE)
    with on_backend(backend):
        logp = ops.logprobs_from_logits(logits, labels)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()


@pytest.mark.parametrize("temperature", [1e-40, 0.0, -1.0, float("inf"), float("nan")])
def test_temperature_must_have_a_finite_inverse(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ops.logprobs_from_logits(randn(2, 5), torch.zeros(2, dtype=torch.long, device=DEVICE), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        ops.fused_linear_logprobs(randn(2, 4), randn(5, 4), torch.zeros(2, dtype=torch.long, device=DEVICE),
                                  temperature=temperature)
