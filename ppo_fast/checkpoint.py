"""Checkpoints: what a run needs to continue exactly where it stopped.

OUT/checkpoints/step_00000010/
    policy.safetensors   trainable policy parameters, fp32 masters (only the adapters under LoRA)
    critic.safetensors   trainable critic parameters, fp32 masters (the head only with a shared critic)
    state.pt             optimiser, LR schedule, KL coefficient, step, skipped steps,
                         RNG states (torch, sampling, data order, python, numpy), prompt order

A checkpoint is written to `step_N.tmp/`, flushed to disk, then renamed to `step_N/`: the
rename is atomic, so a run killed mid-write leaves only a `.tmp` folder, which loading ignores.
The reference policy is not saved: it is rebuilt, like the initial policy, from the config.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def trainable_state(named_params) -> dict:
    return {name: p.detach().contiguous().cpu() for name, p in named_params}


def load_trainable_state(named_params, tensors: dict, what: str) -> None:
    params = dict(named_params)
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{what} checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def rng_state(trainer) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "sample": trainer.sample_generator.get_state(),
        "data": trainer.data_generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(trainer, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    trainer.sample_generator.set_state(state["sample"])
    trainer.data_generator.set_state(state["data"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINT_DIR, f"step_{step:08d}")


def save_checkpoint(trainer, out: str, keep: int = 0) -> str:
    """Write the trainer's state to OUT/checkpoints/step_N atomically; keep the newest `keep`
    checkpoints (0: all). Returns the checkpoint's path."""
    from safetensors.torch import save_file

    final = checkpoint_path(out, trainer.step_count)
    root, tmp = os.path.dirname(final), final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(trainable_state(trainer.named_masters("policy")), os.path.join(tmp, "policy.safetensors"))
    save_file(trainable_state(trainer.named_masters("critic")), os.path.join(tmp, "critic.safetensors"))
    torch.save({
        "step": trainer.step_count, "skipped_steps": trainer.skipped_steps, "kl_coef": trainer.kl_controller.value,
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(trainer), "prompt_order": getattr(trainer.prompt_source, "order", None),
    }, os.path.join(tmp, "state.pt"))
    for name in os.listdir(tmp):  # the files are on disk before the rename makes them visible
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def load_checkpoint(trainer, path: str) -> None:
    """Restore a trainer built from the same config to the state saved at `path`."""
    from safetensors.torch import load_file

    load_trainable_state(trainer.named_masters("policy"), load_file(os.path.join(path, "policy.safetensors")), "policy")
    load_trainable_state(trainer.named_masters("critic"), load_file(os.path.join(path, "critic.safetensors")), "critic")
    trainer.copy_masters_to_params()
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.kl_controller.value = state["kl_coef"]
    trainer.step_count, trainer.skipped_steps = state["step"], state["skipped_steps"]
    set_rng_state(trainer, state["rng"])
    if state["prompt_order"] is not None:
        trainer.prompt_source.order = list(state["prompt_order"])
