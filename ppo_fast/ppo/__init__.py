"""The PPO loop: PPOConfig, PPOTrainer and their parts (ppo_fast/ppo/*.py). Needs the `train`
extra (transformers, safetensors, PyYAML, TensorBoard)."""
from ppo_fast.ppo.config import ConfigError, PPOConfig
from ppo_fast.ppo.kl_controller import AdaptiveKLController, FixedKLController
from ppo_fast.ppo.trainer import PPOTrainer, TrainingDiverged

__all__ = ["AdaptiveKLController", "ConfigError", "FixedKLController", "PPOConfig", "PPOTrainer", "TrainingDiverged"]
