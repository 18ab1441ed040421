"""Rules every op follows on every backend, checked against the reference (the spec):

- NaN / inf at a valid position: every output and gradient equals the float64 reference's,
  NaN where it has NaN;
- NaN / inf at a masked position (mask = 0): never reaches a result or a gradient;
- strided views and expanded (stride 0) tensors in any argument: the same results as the
  contiguous tensors (the kernels index by flat offsets, so a layout assumption would show).

A case is an op, or an op with options in brackets ("ppo_policy_loss[sequence,sapo,is]"): the
policy objectives' modes go through every rule too.
"""
import pytest
import torch
from support import DEVICE, assert_close_f64, backends_for, on_backend, ragged_mask, randn, strided

from ppo_fast import ops
from ppo_fast.ops import reference

NAN, INF = float("nan"), float("inf")
B, T, V, H = 3, 37, 131, 16


def per_token(seed):
    return randn(B, T, seed=seed, scale=0.5) - 1.0


# op: (make inputs, call(fn, inputs) -> outputs, differentiable inputs, float inputs with a mask)
CASES = {
    "logprobs_from_logits": (
        lambda: {"logits": randn(B, T, V, seed=1, scale=2.0), "labels": torch.randint(0, V, (B, T), device=DEVICE)},
        lambda f, x: f(x["logits"], x["labels"], return_entropy=True), ["logits"], []),
    "entropy_from_logits": (lambda: {"logits": randn(B, V, seed=2, scale=2.0)},
                            lambda f, x: f(x["logits"]), ["logits"], []),
    "fused_linear_logprobs": (
        lambda: {"hidden": randn(B, T, H, seed=3), "weight": randn(V, H, seed=4, scale=0.3),
                 "labels": torch.randint(0, V, (B, T), device=DEVICE)},
        lambda f, x: f(x["hidden"], x["weight"], x["labels"], return_entropy=True), ["hidden", "weight"], []),
    "fused_linear_ppo_loss": (
        lambda: {"hidden": randn(B, T, H, seed=29), "weight": randn(V, H, seed=30, scale=0.3),
                 "labels": torch.randint(0, V, (B, T), device=DEVICE), "old": per_token(31) - 3.0,
                 "adv": randn(B, T, seed=32), "ref": per_token(33) - 3.0, "mask": ragged_mask(B, T, seed=34)},
        lambda f, x: f(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"], ref_log_prob=x["ref"],
                       kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01, dual_clip=3.0, agg="seq-mean-token-mean"),
        ["hidden", "weight"], ["old", "adv", "ref"]),
    "ppo_policy_loss": (
        lambda: {"log_prob": per_token(5), "old": per_token(6), "adv": randn(B, T, seed=7),
                 "mask": ragged_mask(B, T, seed=8)},
        lambda f, x: f(x["log_prob"], x["old"], x["adv"], x["mask"], dual_clip=3.0, agg="seq-mean-token-mean"),
        ["log_prob"], ["log_prob", "old", "adv"]),
    "value_loss": (
        lambda: {"values": randn(B, T, seed=9), "old": randn(B, T, seed=10), "returns": randn(B, T, seed=11),
                 "mask": ragged_mask(B, T, seed=12)},
        lambda f, x: f(x["values"], x["old"], x["returns"], x["mask"]), ["values"], ["values", "old", "returns"]),
    "kl_penalty": (lambda: {"log_prob": per_token(13), "ref": per_token(14)},
                   lambda f, x: f(x["log_prob"], x["ref"], estimator="k3"), ["log_prob", "ref"], []),
    "compute_rewards": (
        lambda: {"scores": randn(B, seed=15), "log_prob": per_token(16), "ref": per_token(17),
                 "mask": ragged_mask(B, T, seed=18)},
        lambda f, x: f(x["scores"], x["log_prob"], x["ref"], x["mask"], kl_coef=0.1, estimator="k3"), [],
        ["log_prob", "ref"]),
    "gae": (lambda: {"rewards": randn(B, T, seed=19), "values": randn(B, T, seed=20), "mask": ragged_mask(B, T, seed=21)},
            lambda f, x: f(x["rewards"], x["values"], x["mask"], gamma=0.99, lam=0.95), [], ["rewards", "values"]),
    "agg_loss": (lambda: {"loss": randn(B, T, seed=22), "mask": ragged_mask(B, T, seed=23)},
                 lambda f, x: f(x["loss"], x["mask"], "seq-mean-token-sum"), ["loss"], ["loss"]),
    "masked_mean": (lambda: {"x": randn(B, T, seed=24), "mask": ragged_mask(B, T, seed=25)},
                    lambda f, x: f(x["x"], x["mask"]), ["x"], ["x"]),
    "masked_whiten": (lambda: {"x": randn(B, T, seed=26), "mask": ragged_mask(B, T, seed=27)},
                      lambda f, x: f(x["x"], x["mask"]), [], ["x"]),
    "group_advantages": (lambda: {"scores": randn(6, seed=28)}, lambda f, x: f(x["scores"], 3), [], []),
    # the policy objectives (ppo_fast.ops.policy_loss): surrogates, sequence ratios, importance weights
    "ppo_policy_loss[sequence,sapo,is per sequence]": (
        lambda: {"log_prob": per_token(35), "old": per_token(36), "adv": randn(B, T, seed=37),
                 "mask": ragged_mask(B, T, seed=38), "is": randn(B, 1, seed=39).abs()},
        lambda f, x: f(x["log_prob"], x["old"], x["adv"], x["mask"], is_weights=x["is"], ratio_level="sequence",
                       objective="sapo", agg="token-mean"),
        ["log_prob"], ["log_prob", "old", "adv"]),
    "ppo_policy_loss[sequence-token,cispo,is]": (
        lambda: {"log_prob": per_token(40), "old": per_token(41), "adv": randn(B, T, seed=42),
                 "mask": ragged_mask(B, T, seed=43), "is": randn(B, T, seed=44).abs()},
        lambda f, x: f(x["log_prob"], x["old"], x["adv"], x["mask"], is_weights=x["is"], ratio_level="sequence-token",
                       objective="cispo", agg="seq-mean-token-sum"),
        ["log_prob"], ["log_prob", "old", "adv", "is"]),
    "ppo_policy_loss[sequence,clip]": (
        lambda: {"log_prob": per_token(45), "old": per_token(46), "adv": randn(B, T, seed=47),
                 "mask": ragged_mask(B, T, seed=48)},
        lambda f, x: f(x["log_prob"], x["old"], x["adv"], x["mask"], ratio_level="sequence", dual_clip=3.0,
                       agg="seq-mean-token-mean"),
        ["log_prob"], ["log_prob", "old", "adv"]),
    "ppo_policy_loss[gpg,is]": (
        lambda: {"log_prob": per_token(49), "old": per_token(50), "adv": randn(B, T, seed=51),
                 "mask": ragged_mask(B, T, seed=52), "is": randn(B, T, seed=53).abs()},
        lambda f, x: f(x["log_prob"], x["old"], x["adv"], x["mask"], is_weights=x["is"], objective="gpg"),
        ["log_prob"], ["log_prob", "old", "adv", "is"]),
    "fused_linear_ppo_loss[sequence,clip,is]": (
        lambda: {"hidden": randn(B, T, H, seed=54), "weight": randn(V, H, seed=55, scale=0.3),
                 "labels": torch.randint(0, V, (B, T), device=DEVICE), "old": per_token(56) - 3.0,
                 "adv": randn(B, T, seed=57), "ref": per_token(58) - 3.0, "mask": ragged_mask(B, T, seed=59),
                 "is": randn(B, T, seed=60).abs()},
        lambda f, x: f(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"], ref_log_prob=x["ref"],
                       kl_coef=0.1, entropy_coef=0.01, is_weights=x["is"], ratio_level="sequence",
                       agg="seq-mean-token-mean"),
        ["hidden", "weight"], ["old", "adv", "ref", "is"]),
    "rollout_correction[token,mask]": (
        lambda: {"old": per_token(61), "rollout": per_token(62), "mask": ragged_mask(B, T, seed=63)},
        lambda f, x: f(x["old"], x["rollout"], x["mask"], level="token", mode="mask", low=0.5, high=2.0), [],
        ["old", "rollout"]),
    "rollout_correction[sequence,truncate]": (
        lambda: {"old": per_token(64), "rollout": per_token(64) + randn(B, T, seed=65, scale=0.05),
                 "mask": ragged_mask(B, T, seed=66)},
        lambda f, x: f(x["old"], x["rollout"], x["mask"], level="sequence", mode="truncate", high=2.0), [],
        ["old", "rollout"]),
}


def op_of(case: str) -> str:
    """The op a case runs: "ppo_policy_loss[sequence,sapo]" -> "ppo_policy_loss"."""
    return case.split("[")[0]


PAIRS = [(case, b) for case in CASES for b in backends_for(op_of(case))]


def outputs_of(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in outputs_of(list(o.values()) if isinstance(o, dict) else o)]


def evaluate(fn, call, inputs, grad_names, double=False):
    """The outputs and the gradients (random upstream weights) of call(fn, inputs)."""
    x = {k: (v.double() if double and v.is_floating_point() else v).detach().clone() for k, v in inputs.items()}
    for name in grad_names:
        x[name].requires_grad_()
    outs = outputs_of(call(fn, x))
    diff = [o for o in outs if o.requires_grad]
    grads = []
    if diff:
        g = torch.Generator().manual_seed(0)
        total = sum((o * torch.rand(o.shape, generator=g).to(o.device, o.dtype)).sum() for o in diff)
        grads = list(torch.autograd.grad(total, [x[n] for n in grad_names]))
    return [o.detach() for o in outs], grads


def check_against_reference(op, inputs):
    _, call, grad_names, _ = CASES[op]
    outs, grads = evaluate(getattr(ops, op_of(op)), call, inputs, grad_names)
    outs64, grads64 = evaluate(getattr(reference, op_of(op)), call, inputs, grad_names, double=True)
    for i, (a, e) in enumerate(zip(outs + grads, outs64 + grads64)):
        if a.dtype == torch.bool:  # a mask (rollout_correction's keep_mask): exactly the reference's
            assert torch.equal(a, e), f"{op} output {i}"
        else:
            assert_close_f64(a, e, f"{op} output/grad {i}", magnitude=10.0, equal_nan=True)
    return outs, grads


def poke(x, row, col, value):
    x = x.clone()
    x[row, col] = value
    return x


def first_positions(mask, valid, n=2):
    """The first n (row, col) positions where mask == valid."""
    return [tuple(p) for p in (mask.bool() == valid).nonzero()[:n].tolist()]


@pytest.mark.parametrize("op, backend", PAIRS)
def test_nan_and_inf_at_valid_positions_follow_the_reference(op, backend):
    make, _, _, with_mask = CASES[op]
    inputs = make()
    name = with_mask[0] if with_mask else next(k for k, v in inputs.items() if v.is_floating_point())
    if with_mask:
        (r0, c0), (r1, c1) = first_positions(inputs["mask"], True)
        inputs[name] = poke(poke(inputs[name], r0, c0, NAN), r1, c1, INF)
    else:
        inputs[name] = inputs[name].clone()
        inputs[name].view(-1)[1] = NAN
        inputs[name].view(-1)[-1] = INF
    with on_backend(backend):
        outs, _ = check_against_reference(op, inputs)
    assert any(torch.isnan(o).any() for o in outs), "a NaN input must reach an output"


@pytest.mark.parametrize("op, backend", [(op, b) for op, b in PAIRS if CASES[op][3]])
def test_nan_and_inf_at_masked_positions_never_leak(op, backend):
    make, _, _, with_mask = CASES[op]
    inputs = make()
    (r0, c0), (r1, c1) = first_positions(inputs["mask"], False)
    for name in with_mask:
        inputs[name] = poke(poke(inputs[name], r0, c0, NAN), r1, c1, -INF)
    with on_backend(backend):
        outs, grads = check_against_reference(op, inputs)
    valid = inputs["mask"].bool()
    for t in outs + grads:
        finite = torch.isfinite(t[valid] if t.shape == valid.shape else t)
        assert finite.all(), f"{op}: a masked NaN leaked into a result or gradient"


def relayout(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: a stride-2 view, or an expanded (stride 0)
    tensor when all values along the first dim are equal."""
    if x.dim() >= 1 and x.shape[0] > 1 and bool((x == x[:1]).all()):
        return x[:1].expand_as(x)
    return strided(x) if x.dim() else x


@pytest.mark.parametrize("op, backend", PAIRS)
def test_strided_and_expanded_inputs_give_the_contiguous_results(op, backend):
    make, call, grad_names, _ = CASES[op]
    inputs = make()
    if "labels" in inputs:  # one label everywhere: expanded with stride 0
        inputs["labels"] = torch.full_like(inputs["labels"], 7)
    views = {k: relayout(v) for k, v in inputs.items()}
    assert any(not v.is_contiguous() for v in views.values())
    with on_backend(backend):
        outs, grads = evaluate(getattr(ops, op_of(op)), call, inputs, grad_names)
        outs_v, grads_v = evaluate(getattr(ops, op_of(op)), call, views, grad_names)
    for i, (a, e) in enumerate(zip(outs_v + grads_v, outs + grads)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{op} {i}: {m}")


@pytest.mark.parametrize("backend", backends_for("logprobs_from_logits"))
def test_column_of_a_label_matrix(backend):
    """A 1-D label view with stride 2 (a column of an [N, 2] tensor), on logits [N, V]."""
    logits = randn(9, V, seed=30)
    pairs = torch.randint(0, V, (9, 2), device=DEVICE)
    with on_backend(backend):
        got = ops.logprobs_from_logits(logits, pairs[:, 0])
        want = ops.logprobs_from_logits(logits, pairs[:, 0].contiguous())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("op, backend", [(op, b) for op, b in PAIRS if op_of(op) in (
    "compute_rewards", "gae", "ppo_policy_loss", "value_loss", "agg_loss", "masked_whiten")])
def test_zero_length_sequences_give_empty_or_zero_results(op, backend):
    """T = 0: empty per-token results and losses of 0 (nothing is valid), never an IndexError."""
    make, call, grad_names, _ = CASES[op]
    inputs = {k: (v[:, :0] if v.dim() == 2 and v.shape[1] != 1 else v) for k, v in make().items()}
    with on_backend(backend):
        outs, grads = evaluate(getattr(ops, op_of(op)), call, inputs, grad_names)
    for t in outs + grads:
        assert t.numel() == 0 or (t.dim() == 0 and t.item() == 0)


def weight_like(case):
    """The float inputs of a case that carry a mask (advantages, old / reference log-probs,
    importance weights per token or per sequence): each gets a NaN in turn."""
    make, _, _, with_mask = CASES[case]
    inputs = make()
    return list(with_mask) + (["is"] if "is" in inputs and "is" not in with_mask else [])


@pytest.mark.parametrize("op, name, backend", [(case, name, b) for case, b in PAIRS for name in weight_like(case)])
def test_each_weight_like_input_nan_at_a_valid_then_a_masked_position(op, name, backend):
    """Every weight-like input, not only the first: a NaN at a valid position reaches the outputs as
    the reference's does; at a masked position (a token with mask 0) it never does."""
    make, _, _, _ = CASES[op]
    inputs = make()
    valid = inputs["mask"].bool()
    (r0, c0), = first_positions(inputs["mask"], True, n=1)
    per_sequence = inputs[name].shape[-1] == 1
    inputs[name] = poke(inputs[name], r0, 0 if per_sequence else c0, NAN)
    with on_backend(backend):
        outs, _ = check_against_reference(op, inputs)
    if name == "rollout":  # the exception: an unscored sampler token is ratio 1 (TRL's mapping), not NaN
        assert all(torch.isfinite(o).all() for o in outs), f"{op}: a NaN rollout log-prob must give ratio 1"
    else:
        assert any(torch.isnan(o).any() for o in outs), f"{op}: a NaN in {name} at a valid position must reach an output"
    if per_sequence:  # a sequence weight is read wherever its row has a valid token
        return
    inputs = make()
    (r1, c1), = first_positions(inputs["mask"], False, n=1)
    inputs[name] = poke(inputs[name], r1, c1, NAN)
    with on_backend(backend):
        outs, grads = check_against_reference(op, inputs)
    for t in outs + grads:
        assert torch.isfinite(t[valid] if t.shape == valid.shape else t).all(), f"{op}: a masked NaN in {name} leaked"
