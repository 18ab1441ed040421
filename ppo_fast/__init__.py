"""ppo_fast: fused, exact kernels for PPO, with a plain-PyTorch reference.

Three wings: `ppo_fast.ops` (the ops, their backends and the reference), `ppo_fast.ppo` (the
PPO loop) and `ppo_fast.bench` (benchmarks). Importing ppo_fast or ppo_fast.ops loads neither
the loop nor transformers; `ppo_fast.PPOTrainer` and friends load `ppo_fast.ppo` on first use.
"""
import importlib

from ppo_fast.ops import native, reference
from ppo_fast.ops.backend import BACKENDS, BackendError, available_backends, requested_backend, use_backend

__version__ = "0.1.0"
native.warn_if_native_missing()

_FROM_PPO = {"PPOConfig", "PPOTrainer", "FixedKLController", "AdaptiveKLController"}


def __getattr__(name):
    if name in _FROM_PPO:
        return getattr(importlib.import_module("ppo_fast.ppo"), name)
    if name in ("ops", "ppo", "bench"):
        return importlib.import_module(f"ppo_fast.{name}")
    raise AttributeError(f"module 'ppo_fast' has no attribute {name!r}")


__all__ = ["AdaptiveKLController", "BACKENDS", "BackendError", "FixedKLController", "PPOConfig", "PPOTrainer",
           "available_backends", "ops", "reference", "requested_backend", "use_backend"]
