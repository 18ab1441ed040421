"""ppo_fast: fused, exact kernels for PPO, with a plain-PyTorch reference."""
from ppo_fast import backend, ops, reference
from ppo_fast.backend import BACKENDS, BackendError, available_backends, requested_backend, use_backend
from ppo_fast.config import PPOConfig
from ppo_fast.kl_controller import AdaptiveKLController, FixedKLController
from ppo_fast.trainer import PPOTrainer

__version__ = "0.1.0"
backend.warn_if_native_missing()
__all__ = [
    "AdaptiveKLController",
    "BACKENDS",
    "BackendError",
    "FixedKLController",
    "PPOConfig",
    "PPOTrainer",
    "available_backends",
    "ops",
    "reference",
    "requested_backend",
    "use_backend",
]
