"""Checkpoints on disk: what `PPOTrainer.state_dict()` returns, in files.

OUT/checkpoints/step_00000010/
    policy.safetensors   trainable policy parameters, fp32 masters (only the adapters under LoRA)
    critic.safetensors   trainable critic parameters, fp32 masters (the head only with a shared critic)
    state.pt             the rest: optimiser, LR schedule, KL coefficient, step, RNG states, prompt order

A checkpoint is written to `step_N.tmp/`, flushed to disk, then renamed to `step_N/`: the
rename is atomic, so a run killed mid-write leaves only a `.tmp` folder, which loading ignores.
A checkpoint that is damaged anyway (a truncated file, a missing state.pt) is skipped, with a
warning, for the newest one that loads. Distributed runs write sharded checkpoints instead
(ppo_fast.ppo.distributed: a `dcp/` folder and one state_rank<r>.pt per rank), in the same
step_N folders, with the same atomic rename.
"""
from __future__ import annotations

import os
import re
import shutil
import warnings

import torch

from ppo_fast.ppo.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINT_DIR, f"step_{step:08d}")


def save_checkpoint(state: dict, out: str, step: int, keep: int = 0) -> str:
    """Write `state` ({<name>: tensors, ..., "trainer": anything torch.save takes}, e.g. policy and critic)
    to OUT/checkpoints/step_N atomically; keep the newest `keep` checkpoints (0: all)."""
    from safetensors.torch import save_file

    final = checkpoint_path(out, step)
    root, tmp = os.path.dirname(final), final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, tensors in state.items():
        if name != "trainer":
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      os.path.join(tmp, f"{name}.safetensors"))
    torch.save(state["trainer"], os.path.join(tmp, "state.pt"))
    for name in os.listdir(tmp):  # the files are on disk before the rename makes them visible
        fsync_path(os.path.join(tmp, name))
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(root)
    prune_checkpoints(out, keep)
    return final


def prune_checkpoints(out: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all)."""
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out: str) -> list[str]:
    """Checkpoint folders of a run, oldest first (finished renames only)."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def refuse_earlier_run(out: str) -> None:
    """A fresh run must not mix with the checkpoints of an earlier one in the same folder."""
    if list_checkpoints(out):
        raise ConfigError(f"out: {out!r} holds checkpoints of an earlier run; resume it (--resume) "
                          f"or choose another folder")


def load_checkpoint(path: str) -> dict:
    """The state saved at `path` (tensors on the CPU)."""
    from safetensors.torch import load_file

    state = {name[:-len(".safetensors")]: load_file(os.path.join(path, name))
             for name in os.listdir(path) if name.endswith(".safetensors")}
    state["trainer"] = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    return state


def load_newest(out: str):
    """(path, state) of the newest checkpoint that loads, or (None, None). A damaged newer one
    is reported and skipped."""
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - any damage: truncated, missing, unpickling
            warnings.warn(f"ppo_fast: checkpoint {path} is damaged ({type(err).__name__}: {err}); "
                          f"trying the one before it", RuntimeWarning)
    return None, None
