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

With `tensor_parallel=T` the ranks form a 2-D mesh (data x tensor, T consecutive ranks a
tensor-parallel group): the T ranks of a group hold the same rows and split the policy's and
the reference's LM heads by vocabulary (VocabParallelLMHead; ppo_fast/ops/vocab_parallel.py
computes the log-probs on the shards), every model's blocks follow the model's own transformers
TP plan (config.base_model_tp_plan: attention heads and MLP columns split, through torch's
`parallelize_module` on the tensor dimension of the mesh), FSDP2 shards the blocks over the data
dimension, and everything above that couples rows is reduced over the data dimension only. With
`tensor_parallel_invariant` the blocks stay whole on each rank of the group: a row-parallel layer
sums its partial products over the group, in an order no single process reproduces bitwise.
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
    tp_size: int = 1  # ranks per tensor-parallel group (they hold the same rows)
    dp_group: object = None  # the ranks holding this rank's tensor-parallel position (None: all)
    tp_group: object = None  # this rank's tensor-parallel group (None: tp_size 1)
    dp_mesh: object = None  # FSDP's mesh (None: the default one over every rank)
    tp_mesh: object = None  # the blocks' tensor-parallel mesh (None: blocks whole on every rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """The number of data shards: the ranks that hold different rows."""
        return self.size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of n (n divisible by the data-parallel size)."""
        per_rank = n // self.dp_size
        return slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the data shards (in place; a tensor-parallel group holds one shard's rows)."""
        if self.enabled and self.dp_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def max(self, stats: dict, device) -> dict:
        """Each statistic's maximum over the ranks, in one all-reduce."""
        if not self.enabled or not stats:
            return stats
        keys = sorted(stats)
        values = torch.stack([torch.as_tensor(stats[k], device=device).float() for k in keys])
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.dp_group)
        return dict(zip(keys, values.unbind()))

    def all_true(self, flag: bool, device) -> bool:
        """Whether `flag` holds on every rank."""
        if not self.enabled:
            return flag
        tensor = torch.tensor(float(flag), device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)  # every rank: a tensor-parallel group stops together
        return bool(tensor)

    def reduce_stats(self, stats: dict, device, *, mean: bool) -> dict:
        """Each statistic summed (or averaged) over the data shards, in one float64 all-reduce."""
        if not self.enabled:
            return stats
        keys = sorted(stats)
        values = self.sum(torch.stack([torch.as_tensor(stats[k], device=device).double() for k in keys]))
        if mean:
            values = values / self.dp_size
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
        """Average over the data shards the gradients of the parameters FSDP does not shard (plain
        tensors, a vocabulary shard of an LM head included), as FSDP does for the shards."""
        if not self.enabled:
            return
        from torch.distributed.tensor import DTensor

        for p in params:
            if p.grad is not None and not isinstance(p.grad, DTensor):
                self.sum(p.grad).div_(self.dp_size)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Split the blocks by the model's TP plan over the tensor-parallel mesh (split_blocks), then
        fully_shard each transformer block over the data dimension (gradients reduced in fp32,
        averaged over ranks). The parameters outside the blocks (embeddings, final norm, LM head,
        value head) stay whole on every rank: the loop reads the LM head's weight directly (the
        fused log-prob ops), and average_replicated_grads averages their gradients."""
        if not self.enabled:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.tp_mesh is not None:
            split_blocks(model, self.tp_mesh)
        for block in transformer_blocks(model):
            fully_shard(block, mesh=self.dp_mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        return model

    def shard_lm_head(self, model: torch.nn.Module, invariant: bool) -> None:
        """Split the model's LM head by vocabulary over the tensor-parallel group (in place:
        VocabParallelLMHead keeps this rank's rows); nothing with tp_size 1, unless `invariant`
        (a group of one on the invariant path: what makes tensor_parallel=1 and 2 agree bitwise)."""
        if self.tp_group is None:
            return
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if embeddings is not None and embeddings.weight is head.weight:
            raise ConfigError("tensor_parallel: the model ties its LM head to its input embeddings "
                              "(tie_word_embeddings); splitting the head would split the embeddings too")
        model.set_output_embeddings(VocabParallelLMHead(head, self, invariant))

    def check_same_config(self, config) -> None:
        """Every rank runs the same config: gathered and compared before anything can fail on one
        rank only, so a mismatch is reported on every rank (never a hang in a later collective)."""
        if self.enabled:
            check_same_config(self, config.to_dict())

    def check_sizes(self, config) -> None:
        """Batch sizes that split evenly, no option FSDP cannot follow here (every rank raises)."""
        if self.enabled:
            check_sizes(self, config)


def head_group(head) -> dict:
    """The head ops' tensor-parallel keywords for an LM head: {} for a whole one."""
    group = getattr(head, "tp_group", None)
    return {} if group is None else {"tp_group": group, "tp_invariant": head.tp_invariant}


class VocabParallelLMHead(torch.nn.Module):
    """An LM head split by vocabulary over a tensor-parallel group: `weight` / `bias` hold this rank's
    rows (contiguous shards in rank order: vocab_parallel.vocab_shards), `tp_group` says where the
    rest is. Called, it returns the whole vocabulary's logits (the shards' logits gathered: what
    sampling needs); the loop's log-probs go through the head ops with tp_group, never through it."""

    def __init__(self, head: torch.nn.Linear, world: World, invariant: bool):
        from ppo_fast.ops.vocab_parallel import vocab_shards

        super().__init__()
        if head.weight.device.type == "meta":
            raise ConfigError("tensor_parallel: the LM head has no weights yet (meta)")
        self.shards = vocab_shards(head.out_features, world.tp_size, aligned=invariant)
        lo, hi = self.shards[world.tp_rank]
        self.weight = torch.nn.Parameter(head.weight.detach()[lo:hi].clone(), requires_grad=head.weight.requires_grad)
        self.bias = None if head.bias is None else torch.nn.Parameter(head.bias.detach()[lo:hi].clone(),
                                                                       requires_grad=head.bias.requires_grad)
        self.tp_group, self.tp_invariant = world.tp_group, invariant

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from ppo_fast.ops.vocab_parallel import shard_logits

        rows = hidden.reshape(-1, hidden.shape[-1])
        local = shard_logits(rows, self.weight, self.bias, self.tp_invariant).view(*hidden.shape[:-1], -1)
        return _GatherVocab.apply(local, self.tp_group, self.shards)


class _GatherVocab(torch.autograd.Function):
    """[..., V_r] shards -> [..., V] on every rank (padded to the widest shard for the all-gather);
    backward: this rank's columns of the whole logits' gradient (every rank's loss is the same)."""

    @staticmethod
    def forward(ctx, local, group, shards):
        widest = max(hi - lo for lo, hi in shards)
        padded = torch.nn.functional.pad(local, (0, widest - local.shape[-1])).contiguous()
        every = [torch.empty_like(padded) for _ in shards]
        dist.all_gather(every, padded, group=group)
        ctx.columns = shards[dist.get_rank(group)]
        return torch.cat([t[..., :hi - lo] for t, (lo, hi) in zip(every, shards)], -1)

    @staticmethod
    def backward(ctx, grad):
        lo, hi = ctx.columns
        return grad[..., lo:hi], None, None


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def setup(mode: str, device_type: str, tensor_parallel: int = 1, invariant: bool = False) -> World:
    """Join the process group torchrun set up (`mode` auto: when launched by torchrun; fsdp:
    required; none: never). NCCL for CUDA, gloo for CPU. tensor_parallel > 1 (or the invariant
    head, whose group may be of one): the data x tensor mesh (every rank raises the same error
    where the world size does not split)."""
    if mode == "none" or (mode == "auto" and not launched_by_torchrun()):
        if tensor_parallel > 1 or invariant:
            raise ConfigError(f"tensor_parallel={tensor_parallel}{' with tensor_parallel_invariant' * invariant} runs "
                              f"the LM head on a process group: it needs torchrun "
                              f"(`torchrun --nproc_per_node N -m ppo_fast.cli train ...`, N a multiple of it) and "
                              f"distributed=auto or fsdp (got {mode!r})")
        return World()
    if not launched_by_torchrun():
        raise ConfigError("distributed='fsdp' needs the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, "
                          "MASTER_ADDR): launch with `torchrun --nproc_per_node N -m ppo_fast.cli train ...`")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    size = dist.get_world_size()
    if tensor_parallel == 1 and not invariant:
        return World(dist.get_rank(), size, local_rank, True)
    if size % tensor_parallel:
        raise ConfigError(f"tensor_parallel={tensor_parallel} does not divide the world size {size}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (size // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp"))
    return World(dist.get_rank(), size, local_rank, True, tensor_parallel, mesh.get_group("dp"), mesh.get_group("tp"),
                 mesh["dp"], None if invariant or tensor_parallel == 1 else mesh["tp"])


def check_sizes(world: World, config) -> None:
    """The global batch sizes split evenly over the data shards (world size / tensor_parallel;
    every rank raises the same error)."""
    shards = world.dp_size
    what = "the world size" if world.tp_size == 1 else "the data-parallel size (world size / tensor_parallel)"
    for key in ("rollout_batch_size", "mini_batch_size"):
        value = getattr(config, key)
        if value % shards:
            raise ConfigError(f"{key}={value} is not divisible by {what} {shards}: each data shard takes "
                              f"{key} / {shards} rows")
    if (config.rollout_batch_size // shards) % config.samples_per_prompt:
        raise ConfigError(f"rollout_batch_size / {shards} = {config.rollout_batch_size // shards} rows per data "
                          f"shard is not a multiple of samples_per_prompt={config.samples_per_prompt}: a prompt's "
                          f"responses must be on one rank")
    per_rank = config.mini_batch_size // shards
    if config.micro_batch_size is not None and per_rank % config.micro_batch_size:
        raise ConfigError(f"mini_batch_size / {shards} = {per_rank} rows per data shard is not a multiple of "
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


def base_model(model: torch.nn.Module):
    """The transformers base model inside `model` (a *ForCausalLM's `.model`, a ValueModel's
    body), whose config holds the TP plan; None for a model without one."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel) and m.base_model is m), None)


def split_blocks(model: torch.nn.Module, tp_mesh) -> bool:
    """Apply the model's own transformers TP plan (config.base_model_tp_plan, e.g. Llama's and
    Qwen2's {"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.mlp.down_proj": "rowwise"}) with
    torch's parallelize_module on `tp_mesh`: a colwise linear keeps this rank's output columns
    (its heads), a rowwise one its input columns and all-reduces its output, so the residual
    stream stays whole and replicated. Returns False (blocks left whole) for a model without a plan;
    a plan entry of another style, or heads / MLP width the group does not divide, is refused."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    base = base_model(model)
    plan = getattr(getattr(base, "config", None), "base_model_tp_plan", None) or {}
    if not plan:
        return False
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    other = {key: style for key, style in plan.items() if style not in styles}
    if other:
        raise ConfigError(f"tensor_parallel: {type(base).__name__}'s TP plan has entries of styles ppo_fast does not "
                          f"apply: {other}; expected only {sorted(styles)}")
    size, config = tp_mesh.size(), base.config
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None and value % size:
            raise ConfigError(f"tensor_parallel={size} does not divide {type(base).__name__}'s {key}={value}: "
                              f"the TP plan splits it over the group")
    parallelize_module(base, tp_mesh, {key: styles[style]() for key, style in plan.items()})
    return True


def transformer_blocks(model: torch.nn.Module) -> list:
    """The repeated blocks of a transformer (the largest ModuleList), FSDP's unit of sharding."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


# ----------------------------------------------------------------------------- checkpoints
def sharded_state(optimizer, world: World) -> dict:
    """The tensors a checkpoint holds, by name: fp32 masters and AdamW moments (DTensor shards
    for the sharded parameters, whole tensors for the replicated ones, and for an LM head split
    over a tensor-parallel group each rank's rows under "<name>@tp<rank>")."""
    suffix = f"@tp{world.tp_rank}"
    masters = {optimizer.checkpoint_name(group, name, master, suffix): master for group in range(len(optimizer.names))
               for name, master in optimizer.named_masters(group)}
    return {"masters": masters, "optimizer": optimizer.named_state(suffix)}


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
    dcp.save(sharded_state(optimizer, world), checkpoint_id=os.path.join(tmp, "dcp"))
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
    state = sharded_state(optimizer, world)
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    optimizer.copy_masters_to_params()
    return torch.load(os.path.join(path, f"state_rank{world.rank}.pt"), map_location="cpu", weights_only=False)
