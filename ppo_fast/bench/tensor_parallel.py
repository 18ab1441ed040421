"""`ppo-fast bench tp`: the vocabulary-parallel head (ppo_fast/ops/vocab_parallel.py).

Two kinds of rows, each for fused_linear_logprobs (a weight shard [V_r, H]) and
logprobs_from_logits (a logits shard [N, V_r]), forward and forward+backward, the default mode
(`tp`) and the TP-degree-invariant one (`tp-invariant`), beside the op without a group (`plain`):

- `group`: one process per rank (gloo on CPU, each rank with cores / ranks threads; NCCL where
  there is a GPU per rank), every rank timing its own calls, collectives included, the same
  number of times (a barrier before each); the row's ms is the slowest rank's median.
- `local`: one process, a group of one, a shard of V / tp columns (whole blocks of 128): the work
  one rank of a TP-tp group does, without the communication — on one GPU the figure to set beside
  Liger #1422's per-rank backward times at TP 1/2/4/8.

Each row states the bytes a rank receives per call (received_mb) against gathering the full
logits instead (full_logits_mb = (tp - 1) / tp * N * V * the logits' element size): the
partials' all-gather, (tp - 1) * N * (U + 1) * k * 4 (U units per rank, k = 3 floats each, the
label's logit as one more unit), and in the fused backward d_hidden's all-reduce,
2 (tp - 1) / tp * N * H * 4 (a ring's traffic).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from ppo_fast.bench.timing import environment, synchronize
from ppo_fast.ops.vocab_parallel import VOCAB_BLOCK, vocab_shards

SHAPES = {"cpu": dict(N=1024, H=256, V=32000, dtype=torch.float32),
          "cuda": dict(N=2048, H=4096, V=131072, dtype=torch.bfloat16),  # Liger #1422's M, H, V
          "quick": dict(N=64, H=32, V=1000, dtype=torch.float32)}
IMPLS = {"tp": False, "tp-invariant": True}
REPEATS = 7  # every rank the same count: the calls hold collectives


def received_mb(fn: str, mode: str, invariant: bool, tp: int, N: int, H: int, vocab: int) -> float:
    """Bytes a rank receives per call (module docstring), in MB."""
    if tp == 1:
        return 0.0
    units = -(-vocab // tp // VOCAB_BLOCK) if invariant else 1
    total = (tp - 1) * N * (units + 1) * 3 * 4
    if fn == "fused_linear_logprobs" and mode == "fwd+bwd":
        total += 2 * (tp - 1) / tp * N * H * 4
    return round(total / 1e6, 3)


def make_call(fn: str, mode: str, shape: dict, lo: int, hi: int, device, group, invariant):
    """A no-argument call of fn on the columns [lo, hi) (group None: the plain op on every column); a
    group of one holding part of the vocabulary (a local row) takes its labels modulo its columns."""
    from ppo_fast import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    N, H, V, dtype = shape["N"], shape["H"], shape["V"], shape["dtype"]
    labels = torch.randint(0, V, (N,), generator=g)
    if group is not None and dist.get_world_size(group) == 1:
        labels = labels % (hi - lo)
    labels = labels.to(device)
    grad = mode == "fwd+bwd"
    tp = {} if group is None else {"tp_group": group, "tp_invariant": invariant}
    if fn == "fused_linear_logprobs":
        hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(grad)
        weight = (torch.randn(V, H, generator=g)[lo:hi] * H**-0.5).to(device, dtype).requires_grad_(grad)

        def call():
            logp, entropy = ops.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, **tp)
            if grad:
                torch.autograd.grad(logp.sum() + entropy.sum(), (hidden, weight))
    else:
        logits = (torch.randn(N, V, generator=g)[:, lo:hi] * 3).to(device, dtype).requires_grad_(grad)

        def call():
            logp, entropy = ops.logprobs_from_logits(logits, labels, return_entropy=True, **tp)
            if grad:
                torch.autograd.grad(logp.sum() + entropy.sum(), logits)
    return call


def time_in_step(call, device, group) -> float:
    """Median ms over REPEATS calls after one warm-up, every rank in step (a barrier before each)."""
    call()
    times = []
    for _ in range(REPEATS):
        if group is not None:
            dist.barrier(group=group)
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rows_of_rank(kind: str, tp: int, rank: int, shape: dict, device, group) -> list:
    """Every case's row as this rank times it (group None: the plain op, tp = 1)."""
    lo, hi = vocab_shards(shape["V"], tp, aligned=True)[rank]  # the invariant mode's layout, both modes
    impls = {"plain": None} if group is None else IMPLS
    rows = []
    for fn in ("fused_linear_logprobs", "logprobs_from_logits"):
        for mode in ("fwd", "fwd+bwd"):
            for impl, invariant in impls.items():
                ms = time_in_step(make_call(fn, mode, shape, lo, hi, device, group, invariant), device, group)
                size = torch.tensor([], dtype=shape["dtype"]).element_size()
                rows.append({"fn": fn, "mode": mode, "dtype": str(shape["dtype"]).replace("torch.", ""),
                             "shape": {k: shape[k] for k in ("N", "H", "V")}, "kind": kind, "tp": tp, "impl": impl,
                             "ms": round(ms, 3), "columns": hi - lo,
                             "received_mb": received_mb(fn, mode, invariant, tp, shape["N"], shape["H"], shape["V"]),
                             "full_logits_mb": round((tp - 1) / tp * shape["N"] * shape["V"] * size / 1e6, 3)})
    return rows


def _init_group(rank: int, world: int, root: str, device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{root}/pg", rank=rank, world_size=world)


def _group_worker(rank: int, world: int, root: str, device_type: str, shape: dict) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _init_group(rank, world, root, device)
    try:
        rows = rows_of_rank("group", world, rank, shape, device, dist.group.WORLD)
        torch.save(rows, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def group_rows(world: int, device, shape: dict) -> list:
    """The `group` rows of a group of `world` processes: each row's ms the slowest rank's."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as root:
        mp.spawn(_group_worker, args=(world, root, device.type, shape), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(root, f"rank{r}.pt")) for r in range(world)]
    return [{**first, "ms": max(rows[i]["ms"] for rows in ranks)} for i, first in enumerate(ranks[0])]


def local_rows(tp_sizes, device, shape: dict) -> list:
    """The `local` rows (module docstring) and the plain op's, in this process."""
    with tempfile.TemporaryDirectory() as root:
        _init_group(0, 1, root, device)
        try:
            rows = rows_of_rank("local", 1, 0, shape, device, None)
            for tp in tp_sizes:
                for row in rows_of_rank("local", tp, 0, shape, device, dist.group.WORLD):
                    rows.append({**row, "tp": tp, "received_mb": 0.0, "full_logits_mb": 0.0})
        finally:
            dist.destroy_process_group()
    return rows


def run(device=None, *, worlds=None, tp_sizes=(1, 2, 4, 8), shape=None, preset="full") -> dict:
    """The record: local rows for each of tp_sizes, group rows for each group size in worlds (default:
    2 on a CPU, every GPU on a machine with several, none with one GPU: a rank a GPU); shape: N, H, V,
    dtype (default SHAPES' for the device, or SHAPES["quick"] with preset "quick")."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = shape or SHAPES["quick" if preset == "quick" else device.type]
    if worlds is None:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        worlds = [2] if device.type == "cpu" else [gpus] * (gpus > 1)
    bad = [w for w in worlds if w < 1 or (device.type == "cuda" and w > torch.cuda.device_count())]
    if bad:
        raise ValueError(f"--world: group sizes {bad} do not fit this machine (at least 1; on CUDA at most "
                         f"{torch.cuda.device_count() if device.type == 'cuda' else '-'} GPUs)")
    record = {"kind": "tp", **environment(device), "preset": preset, "threads": torch.get_num_threads(),
              "results": []}
    record["results"] += local_rows(tp_sizes, device, shape)
    for world in worlds:
        record["results"] += group_rows(world, device, shape)
    return record


__all__ = ["received_mb", "run"]
