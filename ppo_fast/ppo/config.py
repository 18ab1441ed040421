"""PPOConfig: every knob of a run, checked before any model is loaded.

The defaults are the embedded default run (the `count` task of `ppo_fast.tasks` with a tiny
model built at random); `configs/hf_example.yaml` shows settings for a real model.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Optional

from ppo_fast.ops.reference import AGG_MODES, CORRECTION_LEVELS, CORRECTION_MODES, KL_ESTIMATOR_CHOICES

CRITIC_MODES = ("auto", "policy", "reward", "shared")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPS_MODES = ("fused", "reference")
PADDING_FREE = ("auto", "on", "off")
DISTRIBUTED_MODES = ("auto", "none", "fsdp")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_baseline", "dr_grpo")
# the ops' modes, and Dr. GRPO's: the token sum over (sequences x max_new_tokens), a constant
LOSS_AGG_MODES = AGG_MODES + ("seq-mean-token-sum-norm",)
ROLLOUT_CORRECTION = ("off",) + CORRECTION_LEVELS


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, inconsistent values, missing path."""


class ConfigFile:
    """YAML / key=value loading shared by the configs (PPOConfig, RMConfig): unknown keys and
    mistyped values are a ConfigError before anything loads."""

    # ------------------------------------------------------------------ building
    @classmethod
    def check_keys(cls, values: dict) -> None:
        """Every key names a field (a ConfigError listing the known keys otherwise)."""
        unknown = sorted({key.partition(".")[0] for key in values} - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(f.name for f in dataclasses.fields(cls))}")

    @classmethod
    def from_dict(cls, values: dict) -> "ConfigFile":
        """The config of a mapping; a mapping field's entries may also come as `field.key` (key=value
        overrides), merged over its mapping."""
        cls.check_keys(values)
        hints = typing.get_type_hints(cls)
        plain = {key: value for key, value in values.items() if "." not in key}
        for key, value in values.items():
            if "." in key:
                field, _, entry = key.partition(".")
                _require(hints[field] is dict and entry != "", f"{key}: {field} is not a mapping of entries")
                plain[field] = {**(plain.get(field) or {}), entry: value}
        return cls(**{key: _coerce(key, value, hints[key]) for key, value in plain.items()})

    @classmethod
    def from_file(cls, path: str) -> "ConfigFile":
        import yaml

        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path!r}: expected a mapping of key: value, got {type(values).__name__}")
        return cls.from_dict(values)

    def replace(self, overrides: dict) -> "ConfigFile":
        return type(self).from_dict({**dataclasses.asdict(self), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        import yaml

        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # the checks and resolution of the `device` and `out` fields every config has
    def _validate_device(self) -> None:
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                 f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            index = int(self.device.partition(":")[2] or 0)
            _require(torch.cuda.is_available() and index < torch.cuda.device_count(),
                     f"device: {self.device!r} asked for, but this machine has "
                     f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)")

    def _validate_out(self) -> None:
        _require(bool(self.out.strip()), "out: expected a folder path, got ''")
        parent = os.path.abspath(self.out)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        _require(os.path.isdir(parent), f"out: {self.out!r} would be under {parent!r}, which is a file")
        _require(not os.path.exists(self.out) or os.path.isdir(self.out), f"out: {self.out!r} is a file")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    MODEL_KEY = "policy"  # the field naming the model a config trains

    def resolved_dtype(self):
        """auto: bfloat16 on CUDA for real models; float32 on CPU and for the embedded task's
        0.1M-parameter model (bf16 rounding slows its learning and saves nothing there)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        real_model = getattr(self, self.MODEL_KEY) is not None
        return torch.bfloat16 if self.resolved_device().startswith("cuda") and real_model else torch.float32


@dataclass
class PPOConfig(ConfigFile):
    # models and data; policy None = the embedded `count` task and its tiny random model
    policy: Optional[str] = None  # HF causal-LM directory: weights, or only a config.json to build from
    tokenizer: Optional[str] = None  # HF tokenizer directory; default: the policy directory
    reward_model: Optional[str] = None  # HF sequence-classification directory (one score per sequence)
    reward_fn: Optional[str] = None  # "module:function", (prompts, responses) -> scores
    prompts: Optional[str] = None  # .txt (one prompt per line) or .jsonl (a "prompt" field per line)
    critic: str = "auto"  # initialised from "policy" / "reward" model, "shared" policy backbone; auto: reward if any
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU and for the embedded task's tiny model
    device: str = "auto"  # cuda if available, else cpu
    distributed: str = "auto"  # fsdp: torchrun + FSDP2 (ppo_fast/ppo/distributed.py); auto: when torchrun launched us; none
    # under torchrun: ranks per tensor-parallel group, which split the LM heads by vocabulary and the
    # blocks by the model's TP plan
    tensor_parallel: int = 1
    # the run bitwise the same at any tensor_parallel: 128-column head shards, blocks whole on each rank
    tensor_parallel_invariant: bool = False
    seed: int = 0
    steps: int = 200
    # rollout
    rollout_batch_size: int = 64  # prompts (= responses) per step
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    missing_eos_penalty: Optional[float] = None  # added to the score of a response that never ends
    # DAPO's overlong shaping: a response longer than max_new_tokens - overlong_buffer_len tokens loses
    # overlong_penalty_factor x (its excess / overlong_buffer_len), at most the factor; 0: off
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    # DAPO's dynamic sampling: drop the groups whose scores are all equal (no signal for group
    # advantages) and sample more prompts, up to dynamic_sampling_max_rounds rounds per step; a batch
    # still short after them is filled with dropped groups (counted in dynamic_sampling_filler_frac)
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    # off-policy correction against the sampler: weights pi_old / pi_rollout from the rollout's own
    # log-probs (ppo_fast.ops.rollout_correction) as the loss's is_weights; off, token, sequence, geometric
    rollout_correction: str = "off"
    rollout_correction_mode: str = "truncate"  # truncate (TIS) or mask (MIS / IcePop)
    rollout_correction_low: Optional[float] = None  # None: no lower bound
    rollout_correction_high: float = 2.0
    use_rollout_log_prob: bool = False  # old log-probs = the sampler's: no old-log-prob forward
    # rewards and advantages
    kl_coef: float = 0.01  # beta in r_t = -beta KL_t (+ score on the last token)
    kl_estimator: str = "k1"
    kl_target: Optional[float] = None  # set: adaptive beta towards this per-sequence KL (Ziegler et al.)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # gae and reinforce_baseline (grpo and rloo normalise within their groups)
    # gae: a critic; grpo / rloo / reinforce_baseline / dr_grpo: critic-free, advantages from the groups of
    # samples_per_prompt responses to one prompt (ppo_fast.ops.group_advantages); no critic loaded
    advantage_estimator: str = "gae"
    samples_per_prompt: int = 1  # responses per prompt in a rollout (rollout_batch_size counts responses)
    # update
    ppo_epochs: int = 4
    mini_batch_size: int = 32  # sequences per optimiser step
    micro_batch_size: Optional[int] = None  # sequences per forward/backward; None: a rank's share of a minibatch
    # the policy objective: a name of ppo_fast.ops.objectives.REGISTRY (clip = PPO, cispo, gpg, sapo, the
    # peers' objectives) and its parameters, e.g. {clip_low: 0.2, clip_high: 0.28, dual_clip: 3.0,
    # ratio_level: sequence} (YAML), objective_params.clip_high=0.28 (key=value); defaults: the objective's
    objective: str = "clip"
    objective_params: dict = dataclasses.field(default_factory=dict)
    value_clip: float = 0.2
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0  # KL(policy || reference) as a loss term (GRPO style), 0: off
    kl_loss_estimator: str = "low_var_kl"
    vf_coef: float = 1.0
    lr: float = 1e-3
    critic_lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0  # optimiser steps
    lr_schedule: str = "constant"
    max_consecutive_skips: int = 8  # stop (diverged) after this many non-finite optimiser steps in a row; 0: never
    # memory savers
    gradient_checkpointing: bool = False  # recompute activations in the backward (policy and critic)
    lora_rank: int = 0  # > 0: train LoRA adapters (PEFT) on the policy; the reference = adapters disabled
    lora_alpha: float = 16.0
    lora_target_modules: str = "all-linear"  # PEFT target_modules: "all-linear" or comma-separated names
    offload: bool = False  # keep the reference and reward model on the CPU outside the experience phase
    padding_free: str = "auto"  # pack sequences without padding for the no-cache forwards; auto: with flash-attn
    # execution and output
    ops: str = "fused"  # ppo_fast.ops, or "reference": ppo_fast.reference (the baseline loop)
    cpu_threads: int = 0  # intra-op threads on the CPU; 0: 1 for a policy under 10M parameters, else torch's
    out: str = "runs/ppo"
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    tensorboard: bool = True  # event files next to metrics.jsonl
    progress: bool = True

    @property
    def critic_free(self) -> bool:
        return self.advantage_estimator != "gae"

    # ------------------------------------------------------------------ checking
    def validate(self, check_sources: bool = True) -> "PPOConfig":
        """Raise ConfigError for anything that would fail later; returns self. check_sources=False
        skips the model / prompt / reward settings (the caller passes those objects itself)."""
        for key, choices in (("critic", CRITIC_MODES), ("dtype", DTYPES), ("lr_schedule", LR_SCHEDULES),
                             ("ops", OPS_MODES), ("loss_agg", LOSS_AGG_MODES), ("padding_free", PADDING_FREE),
                             ("distributed", DISTRIBUTED_MODES), ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                             ("rollout_correction", ROLLOUT_CORRECTION),
                             ("rollout_correction_mode", CORRECTION_MODES)):
            _require(getattr(self, key) in choices, f"{key}: expected one of {choices}, got {getattr(self, key)!r}")
        for key in ("kl_estimator", "kl_loss_estimator"):
            _require(getattr(self, key) in KL_ESTIMATOR_CHOICES,
                     f"{key}: expected one of {KL_ESTIMATOR_CHOICES}, got {getattr(self, key)!r}")
        for key in ("steps", "rollout_batch_size", "max_prompt_length", "max_new_tokens", "ppo_epochs",
                    "mini_batch_size", "kl_horizon", "temperature", "lr", "critic_lr", "samples_per_prompt",
                    "tensor_parallel"):
            _require(getattr(self, key) > 0, f"{key}: expected a value > 0, got {getattr(self, key)}")
        _require(self.micro_batch_size is None or self.micro_batch_size > 0,
                 f"micro_batch_size: expected None or a value > 0, got {self.micro_batch_size}")
        for key in ("top_k", "kl_coef", "value_clip", "entropy_coef", "kl_loss_coef",
                    "vf_coef", "weight_decay", "max_grad_norm", "warmup_steps", "lora_rank", "save_every",
                    "keep_checkpoints", "max_consecutive_skips", "overlong_buffer_len", "overlong_penalty_factor",
                    "cpu_threads"):
            _require(getattr(self, key) >= 0, f"{key}: expected a value >= 0, got {getattr(self, key)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _require(not isinstance(value, float) or math.isfinite(value),
                     f"{field.name}: expected a finite number, got {value}")
        _require(0 <= self.seed < 2**63, f"seed: expected an integer in [0, 2**63), got {self.seed}")
        self._validate_out()
        _require(self.lora_rank == 0 or self.lora_alpha > 0, f"lora_alpha: expected > 0, got {self.lora_alpha}")
        _require(0 < self.top_p <= 1, f"top_p: expected a value in (0, 1], got {self.top_p}")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma, lam: expected values in [0, 1], got {self.gamma}, {self.lam}")
        self._validate_objective()
        self._validate_recipes()
        _require(self.kl_target is None or self.kl_target > 0, f"kl_target: expected None or > 0, got {self.kl_target}")
        _require(self.rollout_batch_size % self.mini_batch_size == 0,
                 f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        _require(self.rollout_batch_size % self.samples_per_prompt == 0,
                 f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of samples_per_prompt "
                 f"({self.samples_per_prompt}): it counts responses")
        _require(self.advantage_estimator == "gae" or self.samples_per_prompt >= 2,
                 f"advantage_estimator={self.advantage_estimator!r} compares responses to one prompt: "
                 f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        _require(self.micro_batch_size is None or self.mini_batch_size % self.micro_batch_size == 0,
                 f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        _require(self.tensor_parallel == 1 or self.ops == "fused",
                 f"tensor_parallel={self.tensor_parallel}: ops=reference has no tensor-parallel head (the reference "
                 f"ops are one process's spec); use ops=fused")
        _require(self.tensor_parallel == 1 or self.distributed != "none",
                 f"tensor_parallel={self.tensor_parallel} needs distributed training (torchrun), not distributed=none")
        self._validate_device()
        if check_sources:
            self._validate_sources()
        return self

    def policy_objective(self):
        """The policy objective as one object (ppo_fast.ops.objectives.Objective), checked."""
        from ppo_fast.ops.objectives import resolve

        return resolve(self.objective, **self.objective_params)

    def _validate_objective(self) -> None:
        """The op's own rules for the objective and the correction's bounds, as config errors."""
        from ppo_fast.ops.rollout_correction import require_bounds

        try:
            self.policy_objective()
            if self.rollout_correction != "off":
                require_bounds(self.rollout_correction_low, self.rollout_correction_high)
        except (TypeError, ValueError) as err:
            key = str(err).split(":")[0]
            key = {"low": "rollout_correction_low", "high": "rollout_correction_high"}.get(key, key)
            raise ConfigError(f"{key}:{str(err).partition(':')[2]}") from None

    def _validate_recipes(self) -> None:
        _require(self.overlong_buffer_len < self.max_new_tokens,
                 f"overlong_buffer_len ({self.overlong_buffer_len}) must be below max_new_tokens "
                 f"({self.max_new_tokens})")
        _require(not self.dynamic_sampling or self.samples_per_prompt >= 2,
                 f"dynamic_sampling drops groups of responses to one prompt whose scores are all equal: "
                 f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        _require(self.dynamic_sampling_max_rounds >= 1,
                 f"dynamic_sampling_max_rounds: expected a value >= 1, got {self.dynamic_sampling_max_rounds}")
        _require(not (self.use_rollout_log_prob and self.rollout_correction != "off"),
                 f"rollout_correction={self.rollout_correction!r} weighs pi_old / pi_rollout, which is 1 with "
                 f"use_rollout_log_prob=true (old = rollout): set one of them off")
        _require(not (self.use_rollout_log_prob and self.critic == "shared" and not self.critic_free),
                 "use_rollout_log_prob=true saves the policy forward of the experience pass, but critic='shared' "
                 "needs it for the values: use another critic or use_rollout_log_prob=false")

    def resolved_micro_batch_size(self, world_size: int = 1) -> int:
        """micro_batch_size, or by default a rank's share of a minibatch (no accumulation)."""
        return self.micro_batch_size or self.mini_batch_size // world_size

    def _validate_sources(self) -> None:
        if self.policy is None:
            extra = [k for k in ("tokenizer", "reward_fn", "prompts") if getattr(self, k) is not None]
            _require(not extra, f"{extra} set without `policy`: the embedded count task brings its own tokenizer, "
                                f"prompts and reward (or a reward_model trained on it by `ppo-fast rm`); set "
                                f"`policy` to a model directory to use your own")
            _require(self.reward_model is None or os.path.isfile(os.path.join(self.reward_model, "config.json")),
                     f"reward_model: {self.reward_model!r} is not a model directory (no config.json there)")
            _require(self.critic in ("auto", "policy", "shared") or self.reward_model is not None,
                     f"critic={self.critic!r} needs a reward_model")
            return
        for key in ("policy", "tokenizer", "reward_model"):
            path = getattr(self, key)
            _require(path is None or os.path.isfile(os.path.join(path, "config.json"))
                     or (key == "tokenizer" and os.path.isdir(path)),
                     f"{key}: {path!r} is not a model directory (no config.json there)")
        _require(self.prompts is not None and os.path.isfile(self.prompts),
                 f"prompts: expected a .txt or .jsonl file of prompts, got {self.prompts!r}")
        _require((self.reward_model is None) != (self.reward_fn is None),
                 f"set exactly one of reward_model and reward_fn (got {self.reward_model!r}, {self.reward_fn!r})")
        _require(self.critic != "reward" or self.reward_model is not None, "critic='reward' needs a reward_model")
        if self.reward_fn is not None:
            load_function(self.reward_fn)


def load_function(spec: str):
    """The callable named by "package.module:function"."""
    module_name, _, attr = spec.partition(":")
    _require(bool(module_name and attr), f"reward_fn: expected 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_fn: cannot load {spec!r}: {e}") from None
    _require(callable(fn), f"reward_fn: {spec!r} is not callable")
    return fn


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(key: str, value, hint):
    """`value` (from YAML or a key=value string) as the field's type, or a ConfigError."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is dict:  # a mapping of entries (objective_params): strings from key=value read as YAML scalars
        _require(isinstance(value, dict) and all(isinstance(k, str) for k in value),
                 f"{key}: expected a mapping of names to values, got {value!r}")
        return {k: _scalar(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~"):
        value = None
    if value is None:
        _require(optional, f"{key}: expected {base.__name__}, got None")
        return None
    if base is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        _require(isinstance(value, bool), f"{key}: expected true or false, got {value!r}")
        return value
    scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    _require(scalar and not (base is int and isinstance(value, float)), f"{key}: expected {base.__name__}, got {value!r}")
    try:
        return base(value)
    except ValueError:
        raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}") from None


def _scalar(value):
    """A mapping entry: a string from key=value read as YAML reads a scalar (0.28 -> float, none -> None)."""
    if not isinstance(value, str):
        return value
    import yaml

    text = value.strip()
    return None if text.lower() in ("none", "null", "~") else yaml.safe_load(text) if text else text


def parse_overrides(items: list[str]) -> dict:
    """["lr=1e-5", "critic=shared"] -> {"lr": "1e-5", "critic": "shared"} (typed by from_dict)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        _require(bool(sep and key), f"override {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out
