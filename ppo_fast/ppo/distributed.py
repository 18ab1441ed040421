"""Data-parallel PPO on PyTorch's own engine: torchrun launches the processes, FSDP2
(`fully_shard`) shards every model per transformer block, `torch.distributed.checkpoint`
writes sharded checkpoints.

    torchrun --nproc_per_node 8 -m ppo_fast.cli train --config run.yaml

Each rank samples its own slice of the global rollout batch (the same global prompt batch on
every rank, its own sampling seed), scores it and computes its experience; what couples the
rows (advantage whitening, the losses' token and sequence counts, the statistics) is reduced
over the ranks. Each rank's loss is its share of the global mean, scaled by the world size
before backward because FSDP averages gradients over ranks (gloo has no pre-scaled sum), so N
ranks with B/N rows each take the step one rank with B rows would.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ppo_fast.ops.constants import WHITEN_EPS
from ppo_fast.ops.reference import valid_only
from ppo_fast.ppo.config import ConfigError


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks, and the operations that couple them. Not launched by
    torchrun (`enabled` False: rank 0 of 1), every method is the identity: its reductions return
    their input, its whitening is the op's own, its share of a batch is the whole batch. So the
    loop reads the same for one rank or many."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of n (n divisible by the world size)."""
        per_rank = n // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks (in place)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def max(self, stats: dict, device) -> dict:
        """Each statistic's maximum over the ranks, in one all-reduce."""
        if not self.enabled or not stats:
            return stats
        keys = sorted(stats)
        values = torch.stack([torch.as_tensor(stats[k], device=device).float() for k in keys])
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(keys, values.unbind()))

    def all_true(self, flag: bool, device) -> bool:
        """Whether `flag` holds on every rank."""
        if not self.enabled:
            return flag
        tensor = torch.tensor(float(flag), device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor)

    def reduce_stats(self, stats: dict, device, *, mean: bool) -> dict:
        """Each statistic summed (or averaged) over the ranks, in one float64 all-reduce."""
        if not self.enabled:
            return stats
        keys = sorted(stats)
        values = self.sum(torch.stack([torch.as_tensor(stats[k], device=device).double() for k in keys]))
        if mean:
            values = values / self.size
        return dict(zip(keys, values.float().unbind()))

    @torch.no_grad()
    def masked_whiten(self, x: torch.Tensor, mask: torch.Tensor, ops) -> torch.Tensor:
        """ops.masked_whiten with the statistics of every rank's valid tokens. Across ranks: the
        reference's two-pass sums in float64, each pass one all-reduce."""
        if not self.enabled:
            return ops.masked_whiten(x, mask)
        x64, m = x.double(), mask.double()
        first = self.sum(torch.stack([(valid_only(x64, mask) * m).sum(), m.sum()]))
        mean = first[0] / first[1].clamp(min=1)
        squares = self.sum((valid_only(x64 - mean, mask) ** 2 * m).sum())
        var = squares / (first[1] - 1).clamp(min=1)
        return ((x64 - mean) * torch.rsqrt(var + WHITEN_EPS)).to(torch.float32)

    def average_replicated_grads(self, params) -> None:
        """Average over the ranks the gradients of the parameters FSDP does not shard (plain
        tensors), as FSDP does for the shards."""
        if not self.enabled:
            return
        from torch.distributed.tensor import DTensor

        for p in params:
            if p.grad is not None and not isinstance(p.grad, DTensor):
                self.sum(p.grad).div_(self.size)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """fully_shard each transformer block (gradients reduced in fp32, averaged over ranks). The
        parameters outside the blocks (embeddings, final norm, LM head, value head) stay whole on
        every rank: the loop reads the LM head's weight directly (the fused log-prob ops), and
        average_replicated_grads averages their gradients."""
        if not self.enabled:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        return model

    def check_same_config(self, config) -> None:
        """Every rank runs the same config: gathered and compared before anything can fail on one
        rank only, so a mismatch is reported on every rank (never a hang in a later collective)."""
        if self.enabled:
            check_same_config(self, config.to_dict())

    def check_sizes(self, config) -> None:
        """Batch sizes that split evenly, no option FSDP cannot follow here (every rank raises)."""
        if self.enabled:
            check_sizes(self, config)


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def setup(mode: str, device_type: str) -> World:
    """Join the process group torchrun set up (`mode` auto: when launched by torchrun; fsdp:
    required; none: never). NCCL for CUDA, gloo for CPU."""
    if mode == "none" or (mode == "auto" and not launched_by_torchrun()):
        return World()
    if not launched_by_torchrun():
        raise ConfigError("distributed='fsdp' needs the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, "
                          "MASTER_ADDR): launch with `torchrun --nproc_per_node N -m ppo_fast.cli train ...`")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, True)


def check_sizes(world: World, config) -> None:
    """The global batch sizes split evenly over the ranks (every rank raises the same error)."""
    for key in ("rollout_batch_size", "mini_batch_size"):
        value = getattr(config, key)
        if value % world.size:
            raise ConfigError(f"{key}={value} is not divisible by the world size {world.size}: each rank takes "
                              f"{key} / world_size rows")
    if (config.rollout_batch_size // world.size) % config.samples_per_prompt:
        raise ConfigError(f"rollout_batch_size / world_size = {config.rollout_batch_size // world.size} rows per rank "
                          f"is not a multiple of samples_per_prompt={config.samples_per_prompt}: a prompt's "
                          f"responses must be on one rank")
    per_rank = config.mini_batch_size // world.size
    if config.micro_batch_size is not None and per_rank % config.micro_batch_size:
        raise ConfigError(f"mini_batch_size / world_size = {per_rank} rows per rank is not a multiple of "
                          f"micro_batch_size={config.micro_batch_size}")
    for key, bad in (("critic", config.critic == "shared"), ("lora_rank", bool(config.lora_rank)),
                     ("offload", config.offload)):
        if bad:
            raise ConfigError(f"{key}={getattr(config, key)!r} is not supported with distributed training "
                              f"(FSDP shards every model)")


def check_same_config(world: World, values: dict) -> None:
    """Every rank runs the same config: gathered and compared on every rank."""
    gathered = [None] * world.size
    dist.all_gather_object(gathered, values)
    differing = sorted(k for k in values if any(other.get(k) != values[k] for other in gathered))
    if differing:
        seen = {k: [other.get(k) for other in gathered] for k in differing[:5]}
        raise ConfigError(f"the ranks were given different configs: {seen} (rank order)")


def transformer_blocks(model: torch.nn.Module) -> list:
    """The repeated blocks of a transformer (the largest ModuleList), FSDP's unit of sharding."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


# ----------------------------------------------------------------------------- checkpoints
def sharded_state(optimizer) -> dict:
    """The tensors a checkpoint holds, by name: fp32 masters and AdamW moments (DTensor shards
    for the sharded parameters, whole tensors for the replicated ones)."""
    masters = {f"{group}.{name}": master for group in range(len(optimizer.names))
               for name, master in optimizer.named_masters(group)}
    return {"masters": masters, "optimizer": optimizer.named_state()}


def save_checkpoint(world: World, final: str, optimizer, loop_state: dict) -> str:
    """Sharded checkpoint at `final` through torch.distributed.checkpoint (each rank writes its
    shards), plus each rank's loop and RNG state in state_rank<r>.pt; written to final.tmp and
    renamed by rank 0 once every rank has finished, so a killed run leaves only a .tmp."""
    import shutil

    import torch.distributed.checkpoint as dcp

    tmp = final + ".tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(sharded_state(optimizer), checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save({**loop_state, "world_size": world.size}, os.path.join(tmp, f"state_rank{world.rank}.pt"))
    dist.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_checkpoint(world: World, path: str, optimizer) -> dict:
    """Load the shards at `path` into the masters and optimiser (in place) and the parameters;
    returns this rank's loop state. The world size must be the one that wrote it."""
    import torch.distributed.checkpoint as dcp

    saved = len([f for f in os.listdir(path) if f.startswith("state_rank")])
    if saved != world.size:
        raise ConfigError(f"{path} was written by {saved} ranks; resume it with torchrun --nproc_per_node {saved} "
                          f"(this run has {world.size})")
    state = sharded_state(optimizer)
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    optimizer.copy_masters_to_params()
    return torch.load(os.path.join(path, f"state_rank{world.rank}.pt"), map_location="cpu", weights_only=False)
