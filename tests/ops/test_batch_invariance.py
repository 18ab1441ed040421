"""Batch invariance, on every backend of every per-row op: a row's outputs and its gradients (for
given global counts) are bitwise equal whatever the other rows, their order, the batch size, the
chunk size and the masked padding after the row. This is what keeps the first update of a
rollout exactly on-policy: the experience and update passes see a row in different batches.

The batch-level ops (agg_loss, masked_mean, masked_whiten and the losses' scalars) are
statistics of the whole batch by definition and are not listed.
"""
import pytest
import torch
from support import DEVICE, backends_for, on_backend

from ppo_fast import ops

B, T, V, H, PAD = 5, 13, 1013, 24, 6


def batch(dtype=torch.float32, T=T):
    g = torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)

    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, max(1, T - 2 * b):] = False  # ragged, every row with at least one token
    return {"logits": randn(B, T, V, scale=3.0).to(dtype),
            "labels": torch.randint(0, V, (B, T), generator=g).to(DEVICE),
            "hidden": randn(B, T, H).to(dtype), "weight": randn(V, H, scale=0.3).to(dtype),
            "log_prob": randn(B, T, shift=-2.0), "old": randn(B, T, shift=-2.0), "adv": randn(B, T),
            "ref": randn(B, T, shift=-2.0), "values": randn(B, T), "returns": randn(B, T), "scores": randn(B),
            "up": randn(B, T), "mask": mask.to(DEVICE)}


def padded(d):
    """The same rows with PAD more positions after each: masked, holding junk (labels ignored)."""
    g = torch.Generator().manual_seed(2)
    out = dict(d)
    for key, x in d.items():
        if key in ("weight", "scores"):
            continue
        if key == "mask":
            extra = torch.zeros(B, PAD, dtype=x.dtype, device=DEVICE)
        elif key == "labels":
            extra = torch.full((B, PAD), -100, dtype=x.dtype, device=DEVICE)
        else:
            extra = (torch.randn(B, PAD, *x.shape[2:], generator=g) * 5).to(x.dtype).to(DEVICE)
        out[key] = torch.cat([x, extra], 1)
    return out


def rows_of(d, rows):
    return {k: v if k == "weight" else v[rows] for k, v in d.items()}


def grad_of(fn, x, *others):
    """fn's scalar output differentiated to a copy of x."""
    x = x.detach().clone().requires_grad_()
    return torch.autograd.grad(fn(x, *others), x)[0]


def logprobs(d):
    labels = d["labels"]
    x = d["logits"].detach().clone().requires_grad_()
    logp, entropy = ops.logprobs_from_logits(x, labels, return_entropy=True)
    grad = torch.autograd.grad((logp * d["up"]).sum() + entropy.sum(), x)[0]
    return logp, entropy, grad


def fused_linear(d, chunk_size=None):
    labels = d["labels"].masked_fill(~d["mask"], -100)
    h = d["hidden"].detach().clone().requires_grad_()
    logp, entropy = ops.fused_linear_logprobs(h, d["weight"], labels, return_entropy=True, chunk_size=chunk_size)
    return logp, entropy, torch.autograd.grad((logp * d["up"]).sum() + entropy.sum(), h)[0]


def fused_ppo_loss(d, chunk_size=None, **objective):
    def loss(h):
        return ops.fused_linear_ppo_loss(h, d["weight"], d["labels"], d["old"], d["adv"], d["mask"],
                                         ref_log_prob=d["ref"], kl_coef=0.1, entropy_coef=0.01, agg="token-mean",
                                         num_tokens=40.0, chunk_size=chunk_size, **objective)[0]

    return (grad_of(loss, d["hidden"]),)


def policy_loss(d, **objective):
    def loss(x):
        return ops.ppo_policy_loss(x, d["old"], d["adv"], d["mask"], agg="seq-mean-token-sum", num_seqs=7.0,
                                   **objective)[0]

    return (grad_of(loss, d["log_prob"]),)


def value_loss(d):
    def loss(x):
        return ops.value_loss(x, d["values"] * 0.9, d["returns"], d["mask"], agg="token-mean", num_tokens=40.0)[0]

    return (grad_of(loss, d["values"]),)


OBJECTIVES = [dict(ratio_level=level, objective=s) for level in ("token", "sequence", "sequence-token")
              for s in ("clip", "cispo", "sapo")] + [dict(objective="gpg")]
CASES = {  # name -> (op, per-row outputs of a batch dict)
    "logprobs_from_logits": ("logprobs_from_logits", logprobs),
    "entropy_from_logits": ("entropy_from_logits", lambda d: (ops.entropy_from_logits(d["logits"]),)),
    "fused_linear_logprobs": ("fused_linear_logprobs", fused_linear),
    "fused_linear_logprobs chunk 7": ("fused_linear_logprobs", lambda d: fused_linear(d, 7)),
    **{f"fused_linear_ppo_loss {o['ratio_level']}": ("fused_linear_ppo_loss", lambda d, o=o: fused_ppo_loss(d, **o))
       for o in OBJECTIVES[:9:3]},
    "fused_linear_ppo_loss chunk 13": ("fused_linear_ppo_loss", lambda d: fused_ppo_loss(d, 13)),
    **{f"ppo_policy_loss {o.get('ratio_level', 'token')} {o['objective']}":
       ("ppo_policy_loss", lambda d, o=o: policy_loss(d, **o)) for o in OBJECTIVES},
    "value_loss": ("value_loss", value_loss),
    **{f"kl_penalty {e}": ("kl_penalty", lambda d, e=e: (ops.kl_penalty(d["log_prob"], d["ref"], estimator=e),))
       for e in ("k1", "k2", "k3", "k3_raw", "k3+")},
    "compute_rewards": ("compute_rewards", lambda d: (ops.compute_rewards(d["scores"], d["log_prob"], d["ref"],
                                                                          d["mask"], kl_coef=0.1),)),
    "gae": ("gae", lambda d: ops.gae(d["returns"] * d["mask"], d["values"], d["mask"], gamma=0.99, lam=0.95)),
    **{f"rollout_correction {lvl}": ("rollout_correction", lambda d, lvl=lvl: ops.rollout_correction(
        d["old"], d["log_prob"], d["mask"], level=lvl, mode="mask", low=0.5, high=2.0)[:2])
       for lvl in ("token", "sequence", "geometric")},
}
PAIRS = [(name, b) for name, (op, _) in CASES.items() for b in backends_for(op)]


def assert_rows_equal(full, part, rows, what):
    for i, (a, b) in enumerate(zip(full, part)):
        a = a[rows]
        assert torch.equal(a, b), (
            f"{what}: output {i} differs (max |diff| {(a.double() - b.double()).abs().max().item():.3g})")


@pytest.mark.parametrize("name, backend", PAIRS)
def test_a_rows_results_do_not_depend_on_the_batch(name, backend):
    _, fn = CASES[name]
    d = batch()
    with on_backend(backend):
        full = fn(d)
        for rows, what in (([1, 3], "two of the rows"), ([3], "the row alone"), ([4, 2, 0, 3, 1], "rows reordered"),
                           (list(range(B)) + [0, 2], "a larger batch")):
            assert_rows_equal(full, fn(rows_of(d, rows)), rows, what)


@pytest.mark.parametrize("name, backend", [(n, b) for n, b in PAIRS if n.split()[0] != "entropy_from_logits"])
def test_a_rows_results_do_not_depend_on_masked_padding(name, backend):
    """PAD masked positions with junk after every row: the results at the row's own positions are
    bitwise those without them (per-row sums reduce in fixed blocks)."""
    _, fn = CASES[name]
    d = batch()
    with on_backend(backend):
        full, longer = fn(d), fn(padded(d))
    for i, (a, b) in enumerate(zip(full, longer)):
        if a.dim() == 1:  # per-row outputs
            assert torch.equal(a, b), f"output {i}"
        else:
            assert torch.equal(a, b[:, :T]), f"output {i} (max |diff| {(a - b[:, :T]).abs().max().item():.3g})"


@pytest.mark.parametrize("backend", backends_for("fused_linear_logprobs"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_rows_get_the_logits_of_a_full_block(backend, dtype):
    """A single token (the sampler's decode step, T = 1) scored alone gives bitwise the log-prob it
    gets inside a long batch: the LM-head GEMM runs on blocks of one shape, whatever N."""
    d = batch(dtype)
    hidden, labels = d["hidden"].reshape(B * T, H), d["labels"].reshape(B * T)
    with on_backend(backend):
        full = ops.fused_linear_logprobs(hidden, d["weight"], labels, return_entropy=True)
        for i in (0, 7, B * T - 1):
            one = ops.fused_linear_logprobs(hidden[i:i + 1], d["weight"], labels[i:i + 1], return_entropy=True)
            assert torch.equal(full[0][i:i + 1], one[0]) and torch.equal(full[1][i:i + 1], one[1]), f"token {i}"
