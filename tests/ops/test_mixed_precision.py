"""Mixed precision in the fused head (ppo_fast/ops/fused_linear.py's docstring): fp32 master weights
beside bf16 hidden states, and fp32 inputs under autocast, run the GEMMs in the compute dtype while
every fp32 input's gradient is accumulated in fp32 and returned in fp32 — never rounded through bf16,
as a cast by the caller (`weight.to(bf16)`) would. Checked against float64 on every backend: the
gradients' relative error is no larger than with the caller's cast, and the forward is the bf16
computation's, bitwise."""
import pytest
import torch
from support import DEVICE, backends_for, on_backend, randn

from ppo_fast import ops
from ppo_fast.ops import reference

N, H, V = 96, 32, 700
AUTOCAST = DEVICE.type  # autocast runs on the test device's type


def head_inputs(seed=0):
    hidden = randn(N, H, seed=seed).bfloat16()
    weight, bias = randn(V, H, seed=seed + 1, scale=0.3), randn(V, seed=seed + 2, scale=0.1)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return hidden, weight, bias, labels


def float64_grads(hidden, weight, bias, labels, up_logp, up_entropy):
    """The exact gradients on the given values (hidden's bf16 values, the fp32 master weight)."""
    args = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = (args[0] @ args[1].T + args[2]).log_softmax(-1)
    logp = logits.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logits.exp() * logits).sum(-1)
    return torch.autograd.grad((logp * up_logp).sum() + (entropy * up_entropy).sum(), args)


def relative_error(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def run_head(hidden, weight, bias, labels, up_logp, up_entropy, cast_by_caller=False, autocast=False):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    if cast_by_caller:  # what an adapter did before: the caller rounds the weight to the compute dtype
        w, b = w.to(h.dtype), b.to(h.dtype)
    with torch.autocast(AUTOCAST, dtype=torch.bfloat16, enabled=autocast):
        logp, entropy = ops.fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True)
    grads = torch.autograd.grad((logp * up_logp).sum() + (entropy * up_entropy).sum(), leaves)
    return logp, entropy, grads


@pytest.mark.parametrize("backend", backends_for("fused_linear_logprobs"))
def test_fp32_master_weights_beside_bf16_hidden_states(backend):
    hidden, weight, bias, labels = head_inputs()
    up_logp, up_entropy = randn(N, seed=5), randn(N, seed=6)
    want = float64_grads(hidden, weight, bias, labels, up_logp.double(), up_entropy.double())
    with on_backend(backend):
        _, _, grads = run_head(hidden, weight, bias, labels, up_logp, up_entropy)
        _, _, cast_grads = run_head(hidden, weight, bias, labels, up_logp, up_entropy, cast_by_caller=True)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for name, got, cast, exact in zip(("hidden", "weight", "bias"), grads, cast_grads, want):
        assert relative_error(got, exact) <= relative_error(cast, exact) * 1.001 + 1e-7, name
        assert relative_error(got, exact) < 1e-2, name


@pytest.mark.parametrize("backend", backends_for("fused_linear_logprobs"))
def test_under_autocast_the_gemms_are_bf16_and_the_gradients_fp32(backend):
    """fp32 hidden and weight under bf16 autocast: the forward equals the bf16 computation bitwise (as
    autocast runs `hidden @ weight.T`), the gradients come back fp32, accumulated in fp32."""
    hidden, weight, bias, labels = head_inputs(seed=3)
    hidden = hidden.float()
    up_logp, up_entropy = randn(N, seed=7), randn(N, seed=8)
    want = float64_grads(hidden, weight, bias, labels, up_logp.double(), up_entropy.double())
    with on_backend(backend):
        logp, entropy, grads = run_head(hidden, weight, bias, labels, up_logp, up_entropy, autocast=True)
        bf16_logp, bf16_entropy, _ = run_head(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), labels, up_logp,
                                              up_entropy)
    assert torch.equal(logp, bf16_logp) and torch.equal(entropy, bf16_entropy)
    assert all(g.dtype == torch.float32 for g in grads)
    for name, got, exact in zip(("hidden", "weight", "bias"), grads, want):
        assert relative_error(got, exact) < 1e-2, name


@pytest.mark.parametrize("backend", backends_for("fused_linear_ppo_loss"))
@pytest.mark.parametrize("objective", ["clip", "dro"])  # the compiled path and the generic one
def test_the_fused_ppo_loss_keeps_master_gradients_in_fp32(backend, objective):
    B, T = 6, 16
    hidden, weight, bias, _ = head_inputs(seed=9)
    hidden = hidden[: B * T].view(B, T, H)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(10)).to(DEVICE)
    old, adv = randn(B, T, seed=11, scale=0.3) - 6.0, randn(B, T, seed=12)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)

    def grads_of(h, w, b, cast_by_caller=False, fn=ops.fused_linear_ppo_loss):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        hh, ww, bb = leaves
        if cast_by_caller:
            ww, bb = ww.to(hh.dtype), bb.to(hh.dtype)
        loss, _ = fn(hh, ww, labels, old, adv, mask, bias=bb, entropy_coef=0.01, objective=objective)
        return torch.autograd.grad(loss, leaves)

    with on_backend(backend):
        grads, cast_grads = grads_of(hidden, weight, bias), grads_of(hidden, weight, bias, cast_by_caller=True)
    want = grads_of(hidden.double(), weight.double(), bias.double(), fn=reference.fused_linear_ppo_loss)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for name, got, cast, exact in zip(("hidden", "weight", "bias"), grads, cast_grads, want):
        assert relative_error(got, exact) <= relative_error(cast, exact) * 1.001 + 1e-7, name
