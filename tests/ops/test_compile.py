"""The ops as PyTorch custom ops: torch.library.opcheck, torch.compile(fullgraph=True) against
eager, torch.export, meta tensors, and input errors under the compiler."""
import pytest
import torch
from support import DEVICE, backends_for, on_backend, ragged_mask, randn

from ppo_fast import ops
from ppo_fast.ops.logprobs import LogitTransform
from ppo_fast.ops.objectives import resolve

B, T, V, H = 3, 6, 11, 8
LIB = torch.ops.ppo_fast


def per_token(seed):
    return randn(B, T, seed=seed, scale=0.5) - 2.0


def labels():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def grad(x):
    return x.detach().clone().requires_grad_()


# custom op: (public op whose backends it runs, backends it takes, sample args for a backend)
def _logprobs_forward(backend):
    return (grad(randn(B, T, V, seed=1)), labels(), LogitTransform(1.25, 1.1, 5.0).to_op_args(), -100, True, True,
            backend)


def _logprobs_backward(backend):
    logits = randn(B, T, V, seed=1)
    plain = LogitTransform(1.0).to_op_args()
    _, entropy, norm, _ = LIB.logprobs_forward(logits, labels(), plain, -100, True, False, backend)
    return (logits, labels(), norm, entropy, randn(B, T, seed=2), randn(B, T, seed=3), plain, -100, backend)


def _fused_forward(backend):
    return (grad(randn(B * T, H, seed=4)), grad(randn(V, H, seed=5)), grad(randn(V, seed=6)), labels().view(-1),
            LogitTransform(1.0).to_op_args(), -100, True, True, 5, torch.float32, backend)


def _fused_backward(backend):
    hidden, weight, bias = randn(B * T, H, seed=4), randn(V, H, seed=5), randn(V, seed=6)
    softcapped = LogitTransform(1.0, 0.5, 3.0).to_op_args()
    _, entropy, norm, _ = LIB.fused_linear_logprobs_forward(hidden, weight, bias, labels().view(-1), softcapped, -100,
                                                           True, False, 5, torch.float32, backend)
    return (hidden, weight, bias, labels().view(-1), norm, entropy, randn(B * T, seed=7), randn(B * T, seed=8),
            softcapped, -100, 5, torch.float32, True, True, True, backend)


def _policy_rows(backend):
    return (grad(per_token(9)), per_token(10), randn(B, T, seed=11), ragged_mask(B, T, seed=12),
            randn(B, 1, seed=13).abs(),
            *resolve("clip", ratio_level="sequence", clip_high=0.28, dual_clip=3.0).to_op_args(), True, backend)


def _value_rows(backend):
    return (grad(randn(B, T, seed=13)), randn(B, T, seed=14), randn(B, T, seed=15), ragged_mask(B, T, seed=16), 0.2,
            True, backend)


def _kl_forward(backend):
    return (grad(per_token(17)), grad(per_token(18)), "k3+", backend)


def _kl_backward(backend):
    return (per_token(17), per_token(18), randn(B, T, seed=19), 3, True, True, backend)


def _rewards(backend):
    return (randn(B, seed=20), per_token(21), per_token(22), ragged_mask(B, T, seed=23), 0.1, "k3", backend)


def _gae(backend):
    return (randn(B, T, seed=24), randn(B, T, seed=25), ragged_mask(B, T, seed=26), 0.99, 0.95, backend)


def _row_sums(backend):
    return (grad(randn(B, T, seed=27)), ragged_mask(B, T, seed=28), True, backend)


def _whiten(backend):
    return (randn(B, T, seed=29), ragged_mask(B, T, seed=30), False, backend)


def _fused_ppo(backend):
    mask = ragged_mask(B, T, seed=31).float()
    row_weights = mask.sum(-1).gt(0).float() / mask.sum().clamp(min=1)
    return (grad(randn(B, T, H, seed=32)), grad(randn(V, H, seed=33, scale=0.3)), None, labels(), per_token(34) - 1,
            randn(B, T, seed=35), mask, per_token(36) - 1, randn(B, T, seed=37).abs(), row_weights,
            LogitTransform(1.0).to_op_args(), -100, *resolve("sapo").to_op_args(), 0.1, "k3", "sequence", 0.01, 7, torch.float32, True, True, False, True,
            backend)


CUSTOM_OPS = {
    "logprobs_forward": ("logprobs_from_logits", _logprobs_forward),
    "logprobs_backward": ("logprobs_from_logits", _logprobs_backward),
    "fused_linear_logprobs_forward": ("fused_linear_logprobs", _fused_forward),
    "fused_linear_logprobs_backward": ("fused_linear_logprobs", _fused_backward),
    "policy_loss_rows": ("ppo_policy_loss", _policy_rows),
    "value_loss_rows": ("value_loss", _value_rows),
    "kl_forward": ("kl_penalty", _kl_forward),
    "kl_backward": ("kl_penalty", _kl_backward),
    "compute_rewards": ("compute_rewards", _rewards),
    "gae": ("gae", _gae),
    "masked_row_sums": ("agg_loss", _row_sums),
    "masked_whiten": ("masked_whiten", _whiten),
    "fused_linear_ppo_loss_forward": ("fused_linear_ppo_loss", _fused_ppo),
}
OPCHECK_CASES = [(name, backend) for name, (public, _) in CUSTOM_OPS.items()
                 for backend in backends_for(public) if backend not in ("torch", "auto")]


def test_every_custom_op_is_listed():
    registered = {name for name in dir(LIB) if not name.startswith("_")}
    assert registered >= set(CUSTOM_OPS) and not set(CUSTOM_OPS) - registered


@pytest.mark.parametrize("name, backend", OPCHECK_CASES)
def test_opcheck(name, backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, per backend."""
    with on_backend(backend):
        torch.library.opcheck(getattr(LIB, name).default, CUSTOM_OPS[name][1](backend))


def losses(logits, labels, old, adv, mask, ref, values, old_values, returns):
    """A PPO loss written with the ops as a trainer would: log-probs -> policy loss -> KL -> value loss."""
    logp, entropy = ops.logprobs_from_logits(logits, labels, return_entropy=True, temperature=0.9)
    loss, stats = ops.ppo_policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean")
    kl = ops.kl_penalty(logp, ref, estimator="k3")
    vloss, vclip = ops.value_loss(values, old_values, returns, mask)
    total = loss + 0.1 * ops.agg_loss(kl, mask) - 0.01 * ops.masked_mean(entropy, mask) + 0.5 * vloss
    return total, stats["clipfrac"], stats["approx_kl"], vclip


def fused(hidden, weight, labels, old, adv, mask, ref, rewards, values):
    logp = ops.fused_linear_logprobs(hidden, weight, labels, chunk_size=5)
    loss, stats = ops.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_log_prob=ref, kl_coef=0.1,
                                            entropy_coef=0.01, chunk_size=7)
    token_rewards = ops.compute_rewards(rewards, logp.detach(), ref, mask, kl_coef=0.05)
    advantages, returns = ops.gae(token_rewards, values, mask)
    return loss + logp.sum(), stats["entropy"], ops.masked_whiten(advantages, mask), returns


def loss_inputs():
    return (grad(randn(B, T, V, seed=40, scale=2.0)), labels(), per_token(41), randn(B, T, seed=42),
            ragged_mask(B, T, seed=43), per_token(44), grad(randn(B, T, seed=45)), randn(B, T, seed=46),
            randn(B, T, seed=47))


def fused_inputs():
    return (grad(randn(B, T, H, seed=48)), grad(randn(V, H, seed=49, scale=0.3)), labels(), per_token(50) - 1,
            randn(B, T, seed=51), ragged_mask(B, T, seed=52), per_token(53) - 1, randn(B, seed=54),
            randn(B, T, seed=55))


@pytest.mark.parametrize("fn, make_inputs", [(losses, loss_inputs), (fused, fused_inputs)])
def test_fullgraph_compile_equals_eager(fn, make_inputs):
    """No graph break anywhere (fullgraph=True), the same values and gradients as eager."""
    torch._dynamo.reset()
    inputs = make_inputs()
    params = [x for x in inputs if x.requires_grad]
    compiled = torch.compile(fn, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled[0], params)
    eager = fn(*inputs)
    eager_grads = torch.autograd.grad(eager[0], params)
    for a, e in zip(compiled + compiled_grads, eager + eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_errors_under_the_compiler():
    """Shape errors are raised while tracing (inside dynamo's report, our message intact);
    value checks become assert ops in the graph and raise when it runs (CPU)."""
    torch._dynamo.reset()
    inputs = list(loss_inputs())
    compiled = torch.compile(losses, fullgraph=True)
    with pytest.raises(Exception, match=r"labels: expected shape \(3, 6\) \(logits.shape\[:-1\]\)"):
        compiled(inputs[0], inputs[1][:, :3], *inputs[2:])
    if DEVICE.type == "cpu":
        inputs[1] = inputs[1].clone()
        inputs[1][0, 0] = V
        with pytest.raises(RuntimeError, match=r"labels: values must be in \[0, 11\) or equal ignore_index=-100"):
            compiled(*inputs)


def test_torch_export_keeps_one_node_per_op():
    class PolicyLoss(torch.nn.Module):
        def forward(self, logits, labels, old, adv, mask):
            logp = ops.logprobs_from_logits(logits, labels)
            return ops.ppo_policy_loss(logp, old, adv, mask)[0]

    inputs = (randn(B, T, V, seed=60), labels(), per_token(61), randn(B, T, seed=62), ragged_mask(B, T, seed=63))
    with on_backend("cpp" if DEVICE.type == "cpu" else "triton"):
        program = torch.export.export(PolicyLoss(), inputs)
        eager = PolicyLoss()(*inputs)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"ppo_fast.logprobs_forward.default", "ppo_fast.policy_loss_rows.default"} <= targets
    torch.testing.assert_close(program.module()(*inputs), eager)


def test_meta_tensors_give_shapes_without_running():
    meta = dict(device="meta")
    logits = torch.empty(B, T, V, **meta, requires_grad=True)
    hidden, weight = torch.empty(B, T, H, **meta, requires_grad=True), torch.empty(V, H, **meta, requires_grad=True)
    tok, ids, mask = torch.empty(B, T, **meta), torch.zeros(B, T, dtype=torch.long, **meta), torch.ones(
        B, T, dtype=torch.bool, **meta)
    logp, entropy = ops.logprobs_from_logits(logits, ids, return_entropy=True)
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, ids, tok, tok, mask, ref_log_prob=tok, kl_coef=0.1)
    loss.backward()
    shapes = [logp, entropy, ops.fused_linear_logprobs(hidden, weight, ids), ops.ppo_policy_loss(tok, tok, tok, mask)[0],
              ops.value_loss(tok, tok, tok, mask)[0], ops.kl_penalty(tok, tok), *ops.gae(tok, tok, mask),
              ops.compute_rewards(torch.empty(B, **meta), tok, tok, mask, kl_coef=0.1), ops.agg_loss(tok, mask),
              ops.masked_mean(tok, mask), ops.masked_whiten(tok, mask), loss, hidden.grad, weight.grad]
    assert all(t.device.type == "meta" for t in shapes)
    assert [tuple(t.shape) for t in shapes] == [(B, T)] * 3 + [()] * 2 + [(B, T)] * 4 + [()] * 2 + [(B, T), (),
                                                                                                   (B, T, H), (V, H)]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_cuda_graph_capture_and_replay_equal_eager():
    """The ops read nothing back to the host on CUDA, so a whole forward+backward captures in a
    CUDA graph; replaying it gives the eager values and gradients."""
    for fn, make_inputs in ((losses, loss_inputs), (fused, fused_inputs)):
        inputs = make_inputs()
        params = [x for x in inputs if x.requires_grad]

        def step():
            out = fn(*inputs)
            return out, torch.autograd.grad(out[0], params)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: compile the Triton kernels, fill the allocator's pools
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured, captured_grads = step()
        graph.replay()
        torch.cuda.synchronize()
        eager, eager_grads = step()
        for a, e in zip(captured + captured_grads, eager + eager_grads):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("op", ["ppo_policy_loss", "value_loss", "agg_loss"])
def test_the_eager_path_equals_the_custom_op(monkeypatch, op):
    """In plain eager mode the loss ops call their kernel through an autograd.Function, not the
    custom op (rows.register_loss_rows_autograd): the same values and gradients, bitwise, and the
    custom op under tracing (FakeTensorMode) and on meta tensors."""
    from ppo_fast.ops import backend, rows

    mask = ragged_mask(B, T, seed=40)
    others = (mask,) if op == "agg_loss" else (per_token(41), randn(B, T, seed=42), mask)

    def run():
        x = per_token(43).requires_grad_()
        out = getattr(ops, op)(x, *others)
        loss, stats = out if isinstance(out, tuple) else (out, {})
        (grad_x,) = torch.autograd.grad(loss * 1.7, x)
        stats = stats if isinstance(stats, dict) else {"clipfrac": stats}
        return [loss, grad_x, *stats.values()]

    calls = []
    monkeypatch.setattr(rows, "plain_eager", lambda x: calls.append(backend.plain_eager(x)) or calls[-1])
    eager = run()
    monkeypatch.setattr(rows, "plain_eager", lambda x: False)
    custom = run()
    assert calls == [True]
    assert all(torch.equal(a, b) for a, b in zip(eager, custom, strict=True))
    assert not backend.plain_eager(torch.empty(2, device="meta"))
    with torch._subclasses.FakeTensorMode():
        assert not backend.plain_eager(torch.empty(2))
