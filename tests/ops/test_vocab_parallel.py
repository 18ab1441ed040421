"""The vocabulary-parallel head (ppo_fast/ops/vocab_parallel.py) on gloo process groups of 1 to 4 CPU
processes with shards of unequal size: forward, backward with random upstream gradients on logp
and entropy, and every statistic, against the single-process float64 computation on the whole
vocabulary; bitwise equality across group sizes in the invariant mode; bad set-ups refused on
every rank. Each group size is one spawn of processes running every case; the results come back
through files."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N, H, V = 8, 16, 600  # V = 4 blocks of 128 and one of 88: shards of unequal size, the last one partial
TEMPERATURE = 0.8
BACKENDS = ["cpp", "torch", "triton"]


def shard_sizes(world: int) -> list:
    """Whole blocks of 128 columns shared out as evenly as possible, the partial block last."""
    from ppo_fast.ops.vocab_parallel import vocab_shards

    return [hi - lo for lo, hi in vocab_shards(V, world, aligned=True)]


def inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=g) * 3
    logits[0, 500:] = torch.finfo(torch.float32).min  # masked columns, across two shards
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    labels[2] = logits[2].argmax()  # an argmax label: is_top1
    # labels that are a later shard's offset + ignore_index (-100): a shard-local id must never read
    # as ignored (offsets 256, 384, 512 in groups of 2 to 4)
    labels[3:6] = torch.tensor([384 - 100, 256 - 100, 512 - 100])
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    up = torch.randn(2, N, generator=g)
    labels[6] = (hidden[6] @ weight.T).argmax()  # the fused head's argmax label: its is_top1
    return logits, labels, hidden, weight, up


def worker(rank, world, root, cases):
    import faulthandler

    import ppo_fast
    from ppo_fast import ops

    faulthandler.enable(file=open(f"{root}/faults-{world}-{rank}.txt", "w"), all_threads=True)  # a crash's stacks
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        logits, labels, hidden, weight, up = inputs()
        sizes = shard_sizes(world)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        results = {}
        for backend, invariant in cases:
            with ppo_fast.use_backend(backend):
                z = logits[:, lo:hi].clone().requires_grad_()
                logp, entropy, stats = ops.logprobs_from_logits(z, labels, temperature=TEMPERATURE, return_stats=True,
                                                                tp_group=dist.group.WORLD, tp_invariant=invariant)
                (grad,) = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), z)
                only_entropy = ops.entropy_from_logits(logits[:, lo:hi], temperature=TEMPERATURE,
                                                       tp_group=dist.group.WORLD, tp_invariant=invariant)
                h, w = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
                f_logp, f_entropy, f_stats = ops.fused_linear_logprobs(h, w, labels, return_stats=True, chunk_size=4,
                                                                       tp_group=dist.group.WORLD,
                                                                       tp_invariant=invariant)
                grad_h, grad_w = torch.autograd.grad((f_logp * up[0]).sum() + (f_entropy * up[1]).sum(), (h, w))
            results[(backend, invariant)] = dict(logp=logp, entropy=entropy, stats=stats, grad=grad,
                                                 only_entropy=only_entropy, f_logp=f_logp, f_entropy=f_entropy,
                                                 f_stats=f_stats, grad_h=grad_h, grad_w=grad_w)
        results["ppo"] = ppo_loss_case(hidden, weight[lo:hi], labels, up)
        results["verl"] = verl_door_case(logits[:, lo:hi], labels, hidden, weight[lo:hi])
        results["dtensor"] = dtensor_case(logits, labels, hidden, weight, up, world)
        torch.save(results, f"{root}/{world}-{rank}.pt")
    except Exception:  # noqa: BLE001 - reported to the test through the file
        torch.save({"error": traceback.format_exc()}, f"{root}/{world}-{rank}.pt")
    finally:
        dist.destroy_process_group()


PPO_ARGS = dict(kl_coef=0.1, entropy_coef=0.01, objective="clip", dual_clip=3.0, ratio_level="sequence",
                agg="seq-mean-token-mean", kl_estimator="k3")


def ppo_inputs(labels, up):
    B, T = 2, N // 2
    old, ref = up[0].view(B, T) * 0.3 - 5.0, up[1].view(B, T) * 0.3 - 5.0
    adv, mask = up[0].view(B, T).flip(-1), (labels.view(B, T) != -100)
    return B, T, old, ref, adv, mask


def ppo_loss_case(hidden, weight_shard, labels, up):
    """fused_linear_ppo_loss on the weight shard (every term: sequence ratio, dual clip, KL, entropy)."""
    from ppo_fast import ops

    B, T, old, ref, adv, mask = ppo_inputs(labels, up)
    h, w = hidden.view(B, T, H).clone().requires_grad_(), weight_shard.clone().requires_grad_()
    loss, stats = ops.fused_linear_ppo_loss(h, w, labels.view(B, T), old, adv, mask, ref_log_prob=ref,
                                            tp_group=dist.group.WORLD, **PPO_ARGS)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return dict(loss=loss.detach(), kl=stats["kl"], entropy=stats["entropy"], grad_h=grad_h, grad_w=grad_w)


def dtensor_case(logits, labels, hidden, weight, up, world):
    """The DTensor entry: logits sharded on the vocabulary (Shard(-1)), and the LM head's weight sharded
    on dim 0 beside hidden states replicated on its mesh (as parallelize_module's ColwiseParallel
    leaves them); torch's own shard sizes (chunks of ceil(V / world)). Returns whole gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from ppo_fast import ops

    mesh = init_device_mesh("cpu", (world,))
    z = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    logp, entropy = ops.logprobs_from_logits(z, labels, temperature=TEMPERATURE, return_entropy=True)
    (grad,) = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), z)
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    h = hidden.clone().requires_grad_()
    f_logp, f_entropy = ops.fused_linear_logprobs(DTensor.from_local(h, mesh, [Replicate()]), w, labels,
                                                  return_entropy=True)
    grad_h, grad_w = torch.autograd.grad((f_logp * up[0]).sum() + (f_entropy * up[1]).sum(), (h, w))
    refused = {}
    for name, call in (("plain hidden", lambda: ops.fused_linear_logprobs(hidden, w, labels)),
                       ("group and DTensor", lambda: ops.logprobs_from_logits(z, labels, tp_group=dist.group.WORLD)),
                       ("replicated logits", lambda: ops.logprobs_from_logits(
                           distribute_tensor(logits, mesh, [Replicate()]), labels))):
        try:
            call()
        except ValueError as err:
            refused[name] = str(err)
    return dict(plain_types=(type(logp), type(f_logp)), logp=logp, entropy=entropy, grad=grad.full_tensor(),
                f_logp=f_logp, f_entropy=f_entropy, grad_h=grad_h, grad_w=grad_w.full_tensor(), refused=refused)


def verl_door_case(logits_shard, labels, hidden, weight_shard):
    """verl's vocabulary-parallel doors: linear_cross_entropy(dist_process_group=...), and
    vocab_parallel_entropy against verl's own _VocabParallelEntropy, whose Megatron parallel-state
    query (mpu.get_tensor_model_parallel_group) is stood in for by the process group."""
    import sys
    import types

    from ppo_fast.integrations import verl as pf_verl

    out = {}
    out["lce"] = pf_verl.linear_cross_entropy(hidden, weight_shard, labels.clamp(min=0), 0.9, "none",
                                              dist_process_group=dist.group.WORLD)
    out["entropy"] = pf_verl.vocab_parallel_entropy(logits_shard, tp_group=dist.group.WORLD)
    out["logp"] = pf_verl.vocab_parallel_log_probs_from_logits(logits_shard, labels.clamp(min=0), tp_group=dist.group.WORLD)
    try:
        from peers import load
    except ImportError:
        return out
    mpu = types.SimpleNamespace(get_tensor_model_parallel_group=lambda: dist.group.WORLD,
                                get_tensor_model_parallel_rank=lambda: dist.get_rank(),
                                get_tensor_model_parallel_world_size=lambda: dist.get_world_size())
    megatron = types.ModuleType("megatron")
    core = types.ModuleType("megatron.core")
    core.parallel_state, core.mpu = mpu, mpu
    megatron.core = core
    sys.modules.update({"megatron": megatron, "megatron.core": core, "megatron.core.parallel_state": mpu})
    try:
        theirs = load("verl.utils.megatron.tensor_parallel", stand_ins=("tensordict",))
        out["verl_entropy"] = theirs.vocab_parallel_entropy(logits_shard.clone())
    except Exception as err:  # noqa: BLE001 - a verl that does not load here: said in the result
        out["verl_entropy"] = repr(err)
    return out


def run_group(world, root, cases):
    try:
        mp.spawn(worker, args=(world, str(root), cases), nprocs=world, join=True)
    except mp.ProcessExitedException as err:  # a rank died in C++: its threads' Python stacks say where
        faults = {r: open(f"{root}/faults-{world}-{r}.txt").read() for r in range(world)}
        raise AssertionError(f"{err}; stacks: {faults}") from err
    results = [torch.load(f"{root}/{world}-{rank}.pt", weights_only=False) for rank in range(world)]
    for r in results:
        assert "error" not in r, r.get("error")
    return results


def float64_oracle():
    """float64 on the kernels' own x = fp32(z * fp32(1 / T)) (the numeric contract: finfo.min / T is
    -inf in fp32), the gradient to z through that product."""
    logits, labels, hidden, weight, up = inputs()
    inv_t = torch.tensor(1 / TEMPERATURE, dtype=torch.float32)
    z = logits.double().requires_grad_()
    x = z * inv_t.double() + ((logits * inv_t).double() - z * inv_t.double()).detach()
    logp_all = torch.log_softmax(x, -1)
    safe = labels.clamp(min=0)
    logp = torch.where(labels == -100, 0.0, logp_all.gather(-1, safe[:, None]).squeeze(-1))
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    (grad,) = torch.autograd.grad((logp * up[0].double()).sum() + (entropy * up[1].double()).sum(), z)
    with torch.no_grad():
        stats = torch.stack([torch.logsumexp(2 * logp_all, -1), x.mean(-1),
                             ((labels != -100) & (x.gather(-1, safe[:, None]).squeeze(-1) >= x.amax(-1))).double()], -1)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    f_x = h @ w.T
    f_all = torch.log_softmax(f_x, -1)
    f_logp = torch.where(labels == -100, 0.0, f_all.gather(-1, safe[:, None]).squeeze(-1))
    f_entropy = -(f_all.exp() * f_all).sum(-1)
    grad_h, grad_w = torch.autograd.grad((f_logp * up[0].double()).sum() + (f_entropy * up[1].double()).sum(), (h, w))
    with torch.no_grad():
        f_top1 = (labels != -100) & (f_x.gather(-1, safe[:, None]).squeeze(-1) >= f_x.amax(-1))
        f_stats = torch.stack([torch.logsumexp(2 * f_all, -1), f_x.mean(-1), f_top1.double()], -1)
    return dict(logp=logp, entropy=entropy, stats=stats, grad=grad, only_entropy=entropy, f_logp=f_logp,
                f_entropy=f_entropy, f_stats=f_stats, grad_h=grad_h, grad_w=grad_w)


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """{world: [rank results]} for groups of 1, 2, 3 and 4 processes, every backend, both modes."""
    cases = [(b, inv) for b in BACKENDS for inv in (False, True)]
    return {world: run_group(world, tmp_path_factory.mktemp(f"tp{world}"), cases) for world in (1, 2, 3, 4)}


def close(actual, expected, name, rtol=3e-5, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_gets_the_whole_vocabularys_results(groups, backend, invariant, world):
    """Values, statistics and the gradient (the shards' gradients in rank order) against float64 on
    the whole vocabulary; the same rows' results on every rank."""
    want = float64_oracle()
    ranks = [r[(backend, invariant)] for r in groups[world]]
    for got in ranks:
        for name in ("logp", "entropy", "only_entropy", "f_logp", "f_entropy"):
            close(got[name], want[name], name)
        for prefix in ("", "f_"):  # the logits shard's statistics, then the weight shard's
            stats, oracle = got[f"{prefix}stats"], want[f"{prefix}stats"]
            close(stats["log_sum_sq_probs"], oracle[:, 0], f"{prefix}log_sum_sq_probs")
            close(stats["mean_logit"], oracle[:, 1], f"{prefix}mean_logit", atol=1e-4)
            assert torch.equal(stats["is_top1"], oracle[:, 2].bool()), f"{prefix}is_top1"
        close(got["grad_h"], want["grad_h"], "grad hidden (summed over the group)")
    close(torch.cat([r["grad"] for r in ranks], -1), want["grad"], "grad logits")
    close(torch.cat([r["grad_w"] for r in ranks]), want["grad_w"], "grad weight")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_fused_ppo_loss_on_a_weight_shard(groups, world):
    """fused_linear_ppo_loss(tp_group=...) against the single-process float64 reference loss."""
    from ppo_fast.ops import reference

    _, labels, hidden, weight, up = inputs()
    B, T, old, ref, adv, mask = ppo_inputs(labels, up)
    h, w = hidden.view(B, T, H).double().requires_grad_(), weight.double().requires_grad_()
    loss, stats = reference.fused_linear_ppo_loss(h, w, labels.view(B, T), old.double(), adv.double(), mask,
                                                  ref_log_prob=ref.double(), **PPO_ARGS)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    ranks = [r["ppo"] for r in groups[world]]
    for got in ranks:
        close(got["loss"], loss, "loss")
        close(got["kl"], stats["kl"], "kl")
        close(got["entropy"], stats["entropy"], "entropy")
        close(got["grad_h"], grad_h, "grad hidden")
    close(torch.cat([r["grad_w"] for r in ranks]), grad_w, "grad weight")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_dtensor_entry(groups, world):
    """DTensors sharded on the vocabulary (logits, or the weight beside replicated hidden states): plain
    results, gradients back on the DTensors, against float64; the ambiguous and mixed set-ups refused."""
    want = float64_oracle()
    for rank in groups[world]:
        got = rank["dtensor"]
        assert got["plain_types"] == (torch.Tensor, torch.Tensor)
        for name in ("logp", "entropy", "grad", "f_logp", "f_entropy", "grad_h", "grad_w"):
            close(got[name], want[name], name)
        assert "hidden: a plain tensor beside a DTensor weight is ambiguous" in got["refused"]["plain hidden"]
        assert "tp_group: not with DTensor inputs" in got["refused"]["group and DTensor"]
        assert "logits: expected a DTensor on the mesh of logits" in got["refused"]["replicated logits"]
        assert "sharded on dimension -1 (the vocabulary)" in got["refused"]["replicated logits"]


@pytest.mark.parametrize("world", [2, 3])
def test_verls_vocabulary_parallel_doors(groups, world):
    """linear_cross_entropy with dist_process_group and Megatron-style vocab_parallel_* against float64,
    and vocab_parallel_entropy against verl's own (Megatron's parallel state stood in for)."""
    want = float64_oracle()
    logits, labels, hidden, weight, _ = inputs()
    logp_all = torch.log_softmax(logits.double(), -1)
    for rank in groups[world]:
        got = rank["verl"]
        all64 = torch.log_softmax(hidden.double() @ weight.double().T / 0.9, -1)
        close(got["lce"][0], all64.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), "linear_cross_entropy")
        close(got["lce"][1], -(all64.exp() * all64).sum(-1), "linear_cross_entropy entropy")
        close(got["entropy"], -(logp_all.exp() * torch.where(logp_all.exp() > 0, logp_all, 0.0)).sum(-1), "entropy",
              atol=1e-4)
        close(got["logp"], logp_all.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), "log-probs")
        if isinstance(got.get("verl_entropy"), torch.Tensor):
            close(got["entropy"], got["verl_entropy"], "verl's own vocab_parallel_entropy", atol=1e-4)
        else:
            pytest.skip(f"verl's megatron tensor_parallel does not load here: {got.get('verl_entropy')}")
    assert want is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_invariant_mode_is_bitwise_the_same_for_every_group_size(groups, backend):
    """A row's log-prob and entropy (and statistics) bitwise equal for groups of 1, 2, 3 and 4 ranks."""
    one = groups[1][0][(backend, True)]
    for world in (2, 3, 4):
        for rank in range(world):
            got = groups[world][rank][(backend, True)]
            for name in ("logp", "entropy", "only_entropy", "f_logp", "f_entropy"):
                assert torch.equal(got[name], one[name]), f"{name}: group of {world}, rank {rank}"
            for name, value in one["stats"].items():
                assert torch.equal(got["stats"][name], value), f"{name}: group of {world}, rank {rank}"


def bad_worker(rank, world, root):
    from ppo_fast import ops

    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    errors = []
    try:
        logits, labels, _, _, _ = inputs()
        half = logits[:, :300] if rank == 0 else logits[:, 300:]
        for name, call in (
            ("label in no shard", lambda: ops.logprobs_from_logits(half, torch.full((N,), V), tp_group=dist.group.WORLD)),
            ("unaligned", lambda: ops.logprobs_from_logits(logits[:, :100] if rank == 0 else logits[:, 100:], labels,
                                                           tp_group=dist.group.WORLD, tp_invariant=True)),
            ("dtypes", lambda: ops.logprobs_from_logits(half.bfloat16() if rank == 0 else half, labels,
                                                        tp_group=dist.group.WORLD)),
        ):
            try:
                call()
                errors.append((name, None))
            except (ValueError, TypeError) as err:
                errors.append((name, str(err)))
        # an ignore_index that is a column id: label 305 is column 5 of rank 1's shard, never ignored
        ignoring_5 = torch.tensor([5, 305, 7, 5, 306, 1, 5, 300])
        z = half.clone().requires_grad_()
        logp = ops.logprobs_from_logits(z, ignoring_5, ignore_index=5, tp_group=dist.group.WORLD)
        (grad,) = torch.autograd.grad(logp.sum(), z)
        errors.append(("ignore_index 5", (logp, grad)))
    finally:
        torch.save(errors, f"{root}/bad-{rank}.pt")
        dist.destroy_process_group()


def ops_plain_logprobs(*args, **kwargs):
    from ppo_fast import ops

    return ops.logprobs_from_logits(*args, **kwargs)


def test_bad_set_ups_are_refused_on_every_rank(tmp_path):
    """A label in no shard, unaligned invariant shards, ranks' dtypes differing: the same error on every
    rank. And an ignore_index that is a column id (5): another shard's column 5 is not ignored."""
    mp.spawn(bad_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        errors = dict(torch.load(tmp_path / f"bad-{rank}.pt"))
        assert "labels: values must be in [0, 600)" in errors["label in no shard"]
        assert "found 600 (a label in no shard)" in errors["label in no shard"]
        # rank 0's own shard starts aligned; both ranks refuse, none waits in a collective
        assert "tp_group: invariant=True needs every shard to start on a multiple of 128" in errors["unaligned"]
        assert "tp_group: the ranks called with different settings" in errors["dtypes"]
        logits, _, _, _, _ = inputs()
        whole = logits.clone().requires_grad_()
        want = ops_plain_logprobs(whole, torch.tensor([5, 305, 7, 5, 306, 1, 5, 300]), ignore_index=5)
        (want_grad,) = torch.autograd.grad(want.sum(), whole)
        logp, grad = errors["ignore_index 5"]
        torch.testing.assert_close(logp, want)
        torch.testing.assert_close(grad, want_grad[:, :300] if rank == 0 else want_grad[:, 300:])


def empty_shard_worker(rank, world, root):
    """Rank 1 holds no column (torch's chunking does that where V < the group): logits, then the head."""
    from ppo_fast import ops

    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        logits, labels, hidden, weight, up = inputs()
        cols = slice(0, V) if rank == 0 else slice(V, V)
        z, w = logits[:, cols].clone().requires_grad_(), weight[cols].clone().requires_grad_()
        logp, entropy = ops.logprobs_from_logits(z, labels, temperature=TEMPERATURE, return_entropy=True,
                                                 tp_group=dist.group.WORLD)
        (grad,) = torch.autograd.grad((logp * up[0]).sum() + (entropy * up[1]).sum(), z)
        f_logp, f_entropy = ops.fused_linear_logprobs(hidden, w, labels, return_entropy=True, tp_group=dist.group.WORLD)
        (grad_w,) = torch.autograd.grad((f_logp * up[0]).sum() + (f_entropy * up[1]).sum(), w)
        torch.save(dict(logp=logp, entropy=entropy, grad=grad, f_logp=f_logp, f_entropy=f_entropy, grad_w=grad_w),
                   f"{root}/empty-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_an_empty_shard_is_a_rank_without_columns(tmp_path):
    mp.spawn(empty_shard_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    want = float64_oracle()
    ranks = [torch.load(tmp_path / f"empty-{rank}.pt") for rank in range(2)]
    for got in ranks:
        for name in ("logp", "entropy", "f_logp", "f_entropy"):
            close(got[name], want[name], name)
    assert ranks[1]["grad"].shape == (N, 0) and ranks[1]["grad_w"].shape == (0, H)
    close(ranks[0]["grad"], want["grad"], "grad logits")
    close(ranks[0]["grad_w"], want["grad_w"], "grad weight")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("invariant", [False, True])
def test_a_group_of_one_agrees_with_the_plain_op(device, invariant):
    """tp_group of one process and the op without a group: the same rows to fp32, gradients too, for
    the logits and the fused head (on a GPU: its Triton and CUDA kernels under NCCL)."""
    from ppo_fast import ops

    root = os.environ.get("TMPDIR", "/tmp")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"file://{root}/ppo_fast_tp1_{os.getpid()}_{device}", rank=0, world_size=1)
    try:
        logits, labels, hidden, weight, up = (t.to(device) for t in inputs())
        results = []
        for group in (None, dist.group.WORLD):
            tp = {} if group is None else {"tp_group": group, "tp_invariant": invariant}
            z, h, w = (t.clone().requires_grad_() for t in (logits, hidden, weight))
            logp, entropy = ops.logprobs_from_logits(z, labels, return_entropy=True, **tp)
            f_logp, f_entropy = ops.fused_linear_logprobs(h, w, labels, return_entropy=True, **tp)
            loss = ((logp + f_logp) * up[0]).sum() + ((entropy + f_entropy) * up[1]).sum()
            results.append((logp, entropy, f_logp, f_entropy, *torch.autograd.grad(loss, (z, h, w))))
        for plain, grouped in zip(*results):
            torch.testing.assert_close(grouped, plain, rtol=3e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
