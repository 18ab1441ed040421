"""logprobs_from_logits / entropy_from_logits on every backend against the float64 reference."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import DEVICE, assert_close_f64

import ppo_fast
from ppo_fast.ops import entropy_from_logits, logprobs_from_logits, reference

OP = "logprobs_from_logits"  # the `backend` fixture runs over this op's backends

IGNORE = -100


def make_inputs(shape, dtype, *, scale=3.0, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < ignore_frac] = IGNORE
    return logits.to(DEVICE), labels.to(DEVICE)


def check_against_f64(logits, labels, *, temperature=1.0, seed=1):
    """Forward values and the gradient (random upstream grads on both outputs) vs float64."""
    logits = logits.detach().requires_grad_()
    logp, entropy = logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    g = torch.Generator().manual_seed(seed)
    up_logp = torch.randn(logp.shape, generator=g).to(DEVICE)
    up_entropy = torch.randn(entropy.shape, generator=g).to(DEVICE)
    (grad,) = torch.autograd.grad((logp * up_logp).sum() + (entropy * up_entropy).sum(), logits)
    assert grad.dtype == logits.dtype

    logits64 = logits.detach().double().requires_grad_()
    logp64, entropy64 = reference.logprobs_from_logits(
        logits64, labels, temperature=temperature, return_entropy=True
    )
    (grad64,) = torch.autograd.grad((logp64 * up_logp).sum() + (entropy64 * up_entropy).sum(), logits64)
    assert_close_f64(logp, logp64, "logp")
    assert_close_f64(entropy, entropy64, "entropy")
    assert_close_f64(grad, grad64, "grad_logits", magnitude=logit_magnitude(logits, temperature))


def logit_magnitude(logits, temperature):
    """max |logits / T| over finite entries: the entropy gradient's fp32 error grows with it."""
    finite = logits.detach().float().masked_fill(~torch.isfinite(logits.detach()), 0)
    return finite.abs().max().item() / temperature if finite.numel() else 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 1013), (2, 3, 4099), (2, 50257), (1, 1, 7), (7,)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, shape, dtype, temperature):
    logits, labels = make_inputs(shape, dtype)
    check_against_f64(logits, labels, temperature=temperature)


def test_float16(backend):
    logits, labels = make_inputs((4, 1013), torch.float16, scale=2.0)
    check_against_f64(logits, labels, temperature=1.3)


def test_near_one_hot_rows(backend):
    """softmax of the label ~ 1: logp ~ 0, entropy ~ 0, and the gradient stays exact."""
    logits, labels = make_inputs((6, 1013), torch.float32, ignore_frac=0.0)
    logits[torch.arange(6), labels] += 40.0
    check_against_f64(logits, labels)
    logp = logprobs_from_logits(logits, labels)
    assert logp.abs().max() < 1e-6


def test_sliced_logits_match_contiguous(backend):
    """logits[:, :-1] (the usual shift for next-token log-probs) is read without a copy."""
    full, _ = make_inputs((3, 9, 1013), torch.bfloat16)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    labels = torch.randint(0, 1013, (3, 8), device=DEVICE)
    check_against_f64(sliced, labels, temperature=0.9)
    transposed = full.transpose(0, 1)[:4]
    check_against_f64(transposed, labels[:, :4].T.contiguous())


def test_ignored_positions(backend):
    logits, labels = make_inputs((4, 257), torch.float32, ignore_frac=0.0)
    labels[1] = IGNORE
    labels[3] = IGNORE
    logits.requires_grad_()
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    assert torch.all(logp[[1, 3]] == 0)
    assert torch.all(entropy[[1, 3]] > 0)
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    assert torch.all(grad[[1, 3]] == 0) and torch.all(grad[[0, 2]] != 0)
    labels[:] = IGNORE
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    assert torch.all(logp == 0) and torch.all(torch.isfinite(entropy))


def test_masked_vocabulary_entries(backend):
    """-inf logits (tokens banned by a sampler) have probability 0: finite outputs, zero grad."""
    logits, labels = make_inputs((3, 300), torch.float32, ignore_frac=0.0)
    logits[:, 100:200] = float("-inf")
    labels = labels % 100
    check_against_f64(logits, labels)
    logits.requires_grad_()
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), logits)
    assert torch.all(grad[:, 100:200] == 0) and torch.isfinite(grad).all()


def test_reference_gradient_with_banned_entries_is_exact():
    """The spec itself: finite, zero at the banned entries, equal to the gradient over the allowed ones."""
    logits, labels = make_inputs((3, 50), torch.float64, ignore_frac=0.0)
    labels = labels % 25
    full = logits.clone()
    full[:, 25:] = float("-inf")
    grads = []
    for x in (full, logits[:, :25].clone()):
        x.requires_grad_()
        logp, entropy = reference.logprobs_from_logits(x, labels, return_entropy=True)
        grads.append(torch.autograd.grad((0.7 * logp + 1.3 * entropy).sum(), x)[0])
    assert torch.isfinite(grads[0]).all() and torch.all(grads[0][:, 25:] == 0)
    torch.testing.assert_close(grads[0][:, :25], grads[1])


def test_uniform_logits_closed_form(backend):
    """Independent of the reference: uniform logits give logp = -log V, entropy = log V."""
    V = 3001
    logits = torch.full((2, 5, V), 0.25, device=DEVICE)
    labels = torch.randint(0, V, (2, 5), device=DEVICE)
    logp, entropy = logprobs_from_logits(logits, labels, temperature=0.5, return_entropy=True)
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(V)))
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(V)))


def test_reference_entropy_matches_categorical():
    logits = torch.randn(4, 6, 37, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits / 0.8).entropy()
    torch.testing.assert_close(reference.entropy_from_logits(logits, temperature=0.8), expected)


def test_one_output_gradients(backend):
    """Backward through only logp, and through only entropy."""
    logits, labels = make_inputs((3, 1013), torch.float32)
    logits.requires_grad_()
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    (grad_logp,) = torch.autograd.grad(logp.sum(), logits, retain_graph=True)
    (grad_entropy,) = torch.autograd.grad(entropy.sum(), logits)
    logits64 = logits.detach().double().requires_grad_()
    logp64, entropy64 = reference.logprobs_from_logits(logits64, labels, return_entropy=True)
    assert_close_f64(grad_logp, torch.autograd.grad(logp64.sum(), logits64, retain_graph=True)[0], "logp only")
    assert_close_f64(
        grad_entropy, torch.autograd.grad(entropy64.sum(), logits64)[0], "entropy only", logit_magnitude(logits, 1.0)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(backend, dtype):
    logits, _ = make_inputs((3, 5, 1013), dtype)
    logits.requires_grad_()
    entropy = entropy_from_logits(logits, temperature=1.2)
    upstream = torch.randn_like(entropy)
    (grad,) = torch.autograd.grad((entropy * upstream).sum(), logits)
    logits64 = logits.detach().double().requires_grad_()
    entropy64 = reference.entropy_from_logits(logits64, temperature=1.2)
    (grad64,) = torch.autograd.grad((entropy64 * upstream).sum(), logits64)
    assert_close_f64(entropy, entropy64, "entropy")
    assert_close_f64(grad, grad64, "grad_logits", magnitude=logit_magnitude(logits, 1.2))


def test_empty_batch(backend):
    logits = torch.randn(0, 3, 50, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    assert logp.shape == (0, 3) and entropy.shape == (0, 3)
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), logits)
    assert grad.shape == logits.shape


def test_does_not_modify_inputs(backend):
    logits, labels = make_inputs((3, 500), torch.bfloat16)
    before_logits, before_labels = logits.clone(), labels.clone()
    logits.requires_grad_()
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(logits.detach(), before_logits) and torch.equal(labels, before_labels)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 2500),
    temperature=st.floats(0.3, 3.0),
    scale=st.floats(0.0, 30.0),
    seed=st.integers(0, 2**16),
)
def test_property_triton_matches_float64(rows, vocab, temperature, scale, seed):
    logits, labels = make_inputs((rows, vocab), torch.float32, scale=scale, seed=seed)
    with ppo_fast.use_backend("triton"):
        check_against_f64(logits, labels, temperature=temperature, seed=seed)


# ----------------------------------------------------------------------------- bad input
def bad(match, exc=ValueError):
    return pytest.raises(exc, match=match)


def test_bad_inputs_give_clear_errors():
    logits = torch.randn(2, 3, 11, device=DEVICE)
    labels = torch.randint(0, 11, (2, 3), device=DEVICE)
    with bad(r"labels: values must be in \[0, 11\).*found 11"):
        logprobs_from_logits(logits, torch.full_like(labels, 11))
    with bad(r"labels: values must be in \[0, 11\).*found -1"):
        logprobs_from_logits(logits, torch.full_like(labels, -1))
    with bad(r"labels: expected shape \(2, 3\).*got \(3, 2\)"):
        logprobs_from_logits(logits, labels.T)
    with bad(r"logits: expected dtype.*got torch.int64", TypeError):
        logprobs_from_logits(labels[..., None].expand(2, 3, 11), labels)
    with bad(r"labels: expected an integer dtype, got torch.float32", TypeError):
        logprobs_from_logits(logits, labels.float())
    with bad(r"temperature: expected a finite value > 0, got 0"):
        logprobs_from_logits(logits, labels, temperature=0.0)
    with bad(r"temperature: expected a finite value > 0, got -1"):
        entropy_from_logits(logits, temperature=-1.0)
    with bad(r"temperature: expected a Python float, got Tensor", TypeError):
        logprobs_from_logits(logits, labels, temperature=torch.tensor(1.0))
    with bad(r"tensors must be on one device, got logits on .*, labels on meta"):
        logprobs_from_logits(logits, labels.to("meta"))
    with bad(r"logits: expected shape \[\.\.\., V\] with V >= 1"):
        logprobs_from_logits(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with bad(r"logits: expected a torch.Tensor, got list", TypeError):
        entropy_from_logits([1.0, 2.0])


def check_transform_and_stats(fn, ref_fn, args, labels, kwargs, magnitude=1.0):
    """A log-probs op with a logit transform and its statistics vs the float64 reference: values,
    statistics, and gradients (random upstream weights on logp and entropy)."""
    args = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    logp, entropy, stats = fn(*args, labels, return_stats=True, **kwargs)
    g = torch.Generator().manual_seed(3)
    up = [torch.randn(logp.shape, generator=g).to(DEVICE) for _ in range(2)]
    diff = [a for a in args if a.requires_grad]
    grads = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), diff)
    args64 = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    logp64, entropy64, stats64 = ref_fn(*args64, labels, return_stats=True, **kwargs)
    grads64 = torch.autograd.grad((logp64 * up[0]).sum() + (entropy64 * up[1]).sum(),
                                  [a for a in args64 if a.requires_grad])
    assert_close_f64(logp, logp64, "logp", magnitude=magnitude)
    assert_close_f64(entropy, entropy64, "entropy", magnitude=magnitude)
    for name in ("log_sum_sq_probs", "mean_logit"):
        assert not stats[name].requires_grad and stats[name].dtype == torch.float32
        assert_close_f64(stats[name], stats64[name], name, magnitude=magnitude)
    assert stats["is_top1"].dtype == torch.bool and torch.equal(stats["is_top1"], stats64["is_top1"])
    for i, (a, e) in enumerate(zip(grads, grads64)):
        assert_close_f64(a, e, f"grad {i}", magnitude=10.0 * magnitude)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 1013), (2, 3, 4099), (1, 7)])
@pytest.mark.parametrize("softcap, logit_scale", [(None, 1.0), (None, 0.0625), (30.0, 1.0), (5.0, 0.5)])
def test_softcap_logit_scale_and_row_statistics_match_float64(backend, shape, dtype, softcap, logit_scale):
    """Gemma-style final-logit softcapping, Cohere / Granite-style logit scales, and the statistics
    TRL logs (log sum p^2, mean logit, label is the argmax) from the same pass. (The softcap stays
    off saturation: where tanh rounds to 1 in fp32, distinct logits tie and the first maximum moves.)"""
    logits, labels = make_inputs(shape, dtype, scale=8.0)
    labels.view(-1)[0] = logits.view(-1, shape[-1])[0].argmax()  # at least one argmax label
    check_transform_and_stats(logprobs_from_logits, reference.logprobs_from_logits, [logits], labels,
                              dict(temperature=0.8, softcap=softcap, logit_scale=logit_scale),
                              magnitude=8.0 * logit_scale / 0.8)


def test_is_top1_is_the_first_maximum_and_false_for_ignored_labels(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 1.0]], device=DEVICE)
    labels = torch.tensor([2, 0, IGNORE], device=DEVICE)
    _, _, stats = logprobs_from_logits(logits, labels, return_stats=True)
    assert stats["is_top1"].tolist() == [False, True, False]  # a tie goes to the first maximum, as argmax
    labels = torch.tensor([1, 3, 1], device=DEVICE)
    assert logprobs_from_logits(logits, labels, return_stats=True)[2]["is_top1"].tolist() == [True, False, True]


def test_bad_transforms_give_clear_errors():
    logits, labels = make_inputs((3, 11), torch.float32)
    with pytest.raises(ValueError, match=r"softcap: expected a finite value > 0, got 0.0"):
        logprobs_from_logits(logits, labels, softcap=0.0)
    with pytest.raises(ValueError, match=r"logit_scale: expected a finite value > 0, got -1.0"):
        logprobs_from_logits(logits, labels, logit_scale=-1.0)
    with pytest.raises(TypeError, match=r"logit_scale: expected a Python float"):
        logprobs_from_logits(logits, labels, logit_scale=torch.tensor(2.0))
