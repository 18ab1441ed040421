"""AdamW on fp32 master copies of the trained parameters, with gradient clipping per model, a
warm-up + decay schedule, and non-finite steps skipped.

An update of lr ~ 1e-6 would round away in bf16 weights, so the optimiser steps fp32 masters
and copies them back into the (bf16/fp16) parameters after each step, as DeepSpeed and FSDP's
mixed precision do. fp32 parameters are their own masters.
"""
from __future__ import annotations

import math
import warnings

import torch


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` optimiser steps, then constant / linear / cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def clip_grad_norm_(params: list, max_norm: float, tp_group=None, tp_split=()) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also over a mix of sharded (FSDP's DTensor) and whole
    gradients: the norm is over every rank's gradients (the shards' squares summed over ranks);
    the squares of `tp_split` (plain tensors holding a tensor-parallel group's shards, an LM head
    split by vocabulary) summed over tp_group."""
    grads = [p.grad for p in params if p.grad is not None]
    split = [p.grad for p in params if p.grad is not None and any(p is q for q in tp_split)]
    if not any(hasattr(g, "full_tensor") for g in grads) and not split:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # float64 sums of the (exact in float64) squares: a norm that does not depend, beyond float64
    # rounding, on how the gradients are split (FSDP's or tensor parallelism's shards)
    squares = [g.detach().double().pow(2).sum() for g in grads if not any(g is h for h in split)]
    squares = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in squares]
    if split:
        split_squares = torch.stack([g.detach().double().pow(2).sum() for g in split]).sum()
        torch.distributed.all_reduce(split_squares, group=tp_group)
        squares.append(split_squares)
    total = (torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)).float()
    coef = min(max_norm / (float(total) + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)
    return total


class MasterAdamW:
    """AdamW over groups of (name, parameter) pairs, one group per model, each with its lr."""

    def __init__(self, named_groups: list, lrs: list, *, weight_decay: float, max_grad_norm: float,
                 total_steps: int, warmup_steps: int, schedule: str, fused: bool, sharded: bool = False,
                 tp_split=(None, ())):
        """tp_split: (the tensor-parallel group, the parameters split over it): their gradient norm
        is summed over the group, and checkpoints name their masters per tensor-parallel rank."""
        self.names = [[name for name, _ in group] for group in named_groups]
        self.params = [[p for _, p in group] for group in named_groups]
        self.masters = [[p if p.dtype == torch.float32 else p.detach().float() for p in group] for group in self.params]
        self.tp_group = tp_split[0]
        self.tp_split = [m for params, masters in zip(self.params, self.masters) for p, m in zip(params, masters)
                         if any(p is q for q in tp_split[1])]
        self.max_grad_norm = max_grad_norm or float("inf")
        # sharded (FSDP): a group mixes DTensor shards and whole tensors, so one tensor at a time
        self.optimizer = torch.optim.AdamW([{"params": m, "lr": lr} for m, lr in zip(self.masters, lrs)],
                                           weight_decay=weight_decay, fused=fused and not sharded,
                                           foreach=False if sharded else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: lr_factor(i, warmup_steps, total_steps, schedule))
        self.skipped = 0

    def step(self, loss: torch.Tensor) -> list:
        """Gradients to the masters, clip each group, then apply the step unless the loss or a
        gradient norm is not finite (counted in `skipped`). Returns the groups' gradient norms."""
        for p, master in self._separate_masters():
            master.grad, p.grad = (None if p.grad is None else p.grad.float()), None
        norms = [clip_grad_norm_(group, self.max_grad_norm, self.tp_group, self.tp_split) for group in self.masters]
        if bool(torch.isfinite(torch.stack([loss.detach().float(), *norms])).all()):
            self.optimizer.step()
            self.copy_masters_to_params()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return norms

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def named_masters(self, group: int) -> list:
        """(name, fp32 master) pairs of a group: what checkpoints hold."""
        return list(zip(self.names[group], self.masters[group]))

    def copy_masters_to_params(self) -> None:
        with torch.no_grad():
            for p, master in self._separate_masters():
                p.copy_(master)

    def _separate_masters(self):
        return [(p, m) for params, masters in zip(self.params, self.masters) for p, m in zip(params, masters)
                if m is not p]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **self.schedule_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_schedule_state(state)

    def schedule_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "skipped": self.skipped}

    def load_schedule_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped = state["skipped"]

    def checkpoint_name(self, group: int, name: str, master, tp_suffix: str = "") -> str:
        """A master's name in a sharded checkpoint: "<group>.<name>", + tp_suffix for a tensor-parallel
        shard (each rank of the group holds different rows under the same parameter name)."""
        return f"{group}.{name}" + (tp_suffix if any(master is m for m in self.tp_split) else "")

    def named_state(self, tp_suffix: str = "") -> dict:
        """{"<checkpoint name>.<field>": tensor}: the AdamW moments and step counts by parameter name
        (what a sharded checkpoint stores), created as zeros if no step has run yet."""
        if not self.optimizer.state:
            self._create_state()
        return {f"{self.checkpoint_name(group, name, master, tp_suffix)}.{field}": value
                for group in range(len(self.names)) for name, master in self.named_masters(group)
                for field, value in self.optimizer.state[master].items()}

    def _create_state(self) -> None:
        """Zero moments for every master: one step at lr 0 on zero gradients (no parameter moves)."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
