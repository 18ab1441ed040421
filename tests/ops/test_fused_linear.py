"""fused_linear_logprobs against float64, and its memory bound."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support import DEVICE, assert_close_f64, randn

from ppo_fast.ops import fused_linear_logprobs, reference

OP = "fused_linear_logprobs"  # the `backend` fixture runs over this op's backends

IGNORE = -100


def make_inputs(N, H, V, dtype, *, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = IGNORE
    return [None if t is None else t.to(DEVICE) for t in (hidden, weight, bias, labels)]


def oracle(hidden, weight, bias, labels, temperature, out_dtype):
    """float64 log-probs of the logits as the op forms them: the GEMM's output rounded to the
    input dtype (straight-through for the gradient), then exact math."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    rounded = logits + (logits.to(out_dtype).double() - logits).detach()
    return reference.logprobs_from_logits(rounded, labels, temperature=temperature, return_entropy=True)


def bf16_close(actual, expected, name, rel):
    """bf16 tolerance: the logits (and grad_logits) are rounded to bf16, 2^-8 relative each."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rel, atol=rel * scale,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("N, H, V", [(67, 48, 3001), (33, 64, 5003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64(backend, N, H, V, dtype, with_bias):
    hidden, weight, bias, labels = make_inputs(N, H, V, dtype, with_bias=with_bias)
    params = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    temperature = 0.8
    logp, entropy = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                          return_entropy=True, chunk_size=16)
    up_logp, up_entropy = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    grads = torch.autograd.grad((logp * up_logp).sum() + (entropy * up_entropy).sum(), params)

    params64 = [t.detach().double().requires_grad_() for t in params]
    h64, w64 = params64[:2]
    b64 = params64[2] if with_bias else None
    logp64, entropy64 = oracle(h64, w64, b64, labels, temperature, dtype)
    grads64 = torch.autograd.grad((logp64 * up_logp).sum() + (entropy64 * up_entropy).sum(), params64)

    assert logp.dtype == torch.float32 and [g.dtype for g in grads] == [dtype] * len(grads)
    if dtype == torch.float32:
        assert_close_f64(logp, logp64, "logp")
        assert_close_f64(entropy, entropy64, "entropy")
        for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
            assert_close_f64(g, g64, f"grad {name}", magnitude=10.0)
    else:
        bf16_close(logp, logp64, "logp", 2.0**-8)
        bf16_close(entropy, entropy64, "entropy", 2.0**-8)
        for name, g, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
            bf16_close(g, g64, f"grad {name}", 2.0**-6)


def test_chunking_does_not_change_results(backend):
    hidden, weight, bias, labels = make_inputs(45, 32, 1013, torch.float32, with_bias=True, seed=1)
    hidden = hidden.view(3, 15, 32)
    labels = labels.view(3, 15)
    results = []
    for chunk in (1, 7, 45, None):
        h = hidden.detach().clone().requires_grad_()
        logp, entropy = fused_linear_logprobs(h, weight, labels, bias=bias, return_entropy=True, chunk_size=chunk)
        (logp.sum() + entropy.sum()).backward()
        assert logp.shape == (3, 15)
        results.append((logp, entropy, h.grad))
    for logp, entropy, grad in results[1:]:
        torch.testing.assert_close(logp, results[0][0])
        torch.testing.assert_close(entropy, results[0][1])
        torch.testing.assert_close(grad, results[0][2])


def test_bad_inputs_give_clear_errors():
    hidden, weight, bias, labels = make_inputs(4, 8, 50, torch.float32, with_bias=True)
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, H\] with H = hidden.shape\[-1\] = 8"):
        fused_linear_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match=r"bias: expected shape \(50,\)"):
        fused_linear_logprobs(hidden, weight, labels, bias=bias[:49])
    with pytest.raises(TypeError, match=r"weight: expected dtype in .*, got torch.int64"):
        fused_linear_logprobs(hidden, weight.long(), labels)
    with pytest.raises(ValueError, match=r"labels: values must be in \[0, 50\)"):
        fused_linear_logprobs(hidden, weight, torch.full_like(labels, 50))
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        fused_linear_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match=r"chunk_size: expected None or an int >= 1, got 0"):
        fused_linear_logprobs(hidden, weight, labels, chunk_size=0)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import ppo_fast
    from ppo_fast.ops import reference
    from ppo_fast.ops import fused_linear_logprobs
    N, H, V = 8192, 256, 32000
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / 16).requires_grad_()
    labels = torch.randint(0, V, (N,))
    up = torch.randn(2, N)
    fn = fused_linear_logprobs if sys.argv[1] == "fused" else reference.fused_linear_logprobs
    fn(hidden[:4], weight, labels[:4], return_entropy=True)  # warm-up, outside the measurement
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logp, entropy = fn(hidden, weight, labels, return_entropy=True)
    torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), (hidden, weight))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (after - before) * 1024, "logits_bytes": N * V * 4}))
""")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="measures host RSS")
def test_peak_memory_is_a_fraction_of_the_logits():
    """One fwd+bwd at N=8192, H=256, V=32000 (fp32 logits: 1 GiB): the fused op's peak RSS grows
    by under a quarter of the logits, the plain way by several times them."""
    def growth(kind):
        env = dict(os.environ, PPO_FAST_BACKEND="auto")
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, kind], capture_output=True, text=True, env=env,
                             timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    fused, plain = growth("fused"), growth("plain")
    logits = fused["logits_bytes"]
    assert fused["growth_bytes"] < 0.25 * logits, fused
    assert plain["growth_bytes"] > 2 * logits, plain


def test_backward_chunks_follow_the_memory_budget_not_v_over_h(monkeypatch):
    """The weight gradient is accumulated once per backward chunk, and backward chunks are as
    large as the budget allows, in whole GEMM blocks: at V = 5000, H = 16 the forward uses
    V/H-sized chunks, the backward the budget's (64 MiB / (V * 12 B) = 1118 rows -> 1024 here)."""
    from ppo_fast.ops import fused_linear

    calls = []
    real = fused_linear.accumulate_fp32
    monkeypatch.setattr(fused_linear, "accumulate_fp32", lambda acc, a, b: calls.append(a.shape) or real(acc, a, b))
    N, H, V = 2500, 16, 5000
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    rows = fused_linear.chunk_budget_rows(V, torch.device("cpu"))
    budget = fused_linear.CPU_BUDGET_BYTES // (V * fused_linear.BYTES_PER_LOGIT)
    assert rows == budget - budget % fused_linear.GEMM_BLOCK_ROWS == 1024
    fused_linear_logprobs(hidden, weight, torch.randint(0, V, (N,))).sum().backward()
    assert len(calls) == -(-N // rows) and calls[0] == (V, rows)


def test_degenerate_shapes_give_a_clear_error_or_a_defined_result(backend):
    """H = 0: the logits are the bias (or 0): log-probs and entropy of that distribution, gradients of
    the right (empty) shapes. V = 0 and a 0-d hidden: errors naming the argument."""
    from ppo_fast.ops import fused_linear_logprobs

    labels = torch.tensor([1, 4, 0], device=DEVICE)
    bias = randn(5, seed=3)
    hidden = torch.zeros(3, 0, device=DEVICE, requires_grad=True)
    weight = torch.zeros(5, 0, device=DEVICE, requires_grad=True)
    logp, entropy = fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    expected = torch.log_softmax(bias, -1)
    torch.testing.assert_close(logp, expected[labels])
    torch.testing.assert_close(entropy, -(expected.exp() * expected).sum().expand(3))
    grads = torch.autograd.grad((logp + entropy).sum(), (hidden, weight))
    assert [g.shape for g in grads] == [(3, 0), (5, 0)]
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, H\] with V >= 1"):
        fused_linear_logprobs(randn(3, 4), torch.zeros(0, 4, device=DEVICE), torch.full((3,), -100, device=DEVICE))
    with pytest.raises(ValueError, match=r"hidden: expected shape \[\.\.\., H\] \(at least one dimension\), got \(\)"):
        fused_linear_logprobs(torch.tensor(1.0, device=DEVICE), randn(5, 1), torch.tensor(1, device=DEVICE))


@pytest.mark.parametrize("softcap, logit_scale", [(None, 0.5), (20.0, 1.0)])
def test_softcap_logit_scale_and_statistics_from_hidden_states(backend, softcap, logit_scale):
    """fused_linear_logprobs with a logit transform and return_stats equals the float64 reference
    over the materialised logits (values, statistics, gradients to hidden and weight; fp32: the
    bf16 GEMMs' rounding is covered by the plain cases above)."""
    import importlib

    from ppo_fast.ops import fused_linear_logprobs

    check = importlib.import_module("test_logprobs").check_transform_and_stats
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(3, 7, 16, generator=g).to(DEVICE), (torch.randn(101, 16, generator=g) / 2).to(DEVICE)
    bias, labels = torch.randn(101, generator=g).to(DEVICE), torch.randint(0, 101, (3, 7), generator=g).to(DEVICE)
    check(lambda h, w, lab, **kw: fused_linear_logprobs(h, w, lab, bias=bias, chunk_size=4, **kw),
          lambda h, w, lab, **kw: reference.fused_linear_logprobs(h, w, lab, bias=bias.double(), **kw),
          [hidden, weight], labels, dict(temperature=0.9, softcap=softcap, logit_scale=logit_scale), magnitude=10.0)
