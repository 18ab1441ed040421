"""Reward-model training on preference pairs: the step before PPO in classic RLHF.

    ppo-fast rm --config rm.yaml        # or no config: the embedded count-task pairs
    ppo-fast train reward_model=OUT/model

A sequence-classification model (an HF backbone and a scalar head) scores prompt + response at
its last token; the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) trains it on
pairs from a JSONL file ({"prompt", "chosen", "rejected"} per line); pairwise accuracy
(r_chosen > r_rejected) is measured on a held-out split. Same conventions as `train`: config
checked before loading, progress bar, metrics.jsonl, TensorBoard, checkpoints and --resume;
the trained model is saved as an HF directory (OUT/model) that `train reward_model=` loads.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

from ppo_fast.ppo import models, tasks
from ppo_fast.ppo.checkpoint import checkpoint_path, list_checkpoints, load_newest, save_checkpoint
from ppo_fast.ppo.config import DTYPES, ConfigError, ConfigFile, _require
from ppo_fast.ppo.rollout import left_pad
from ppo_fast.ppo.run_folder import RunFolder


@dataclass
class RMConfig(ConfigFile):
    model: Optional[str] = None  # HF directory (causal LM or sequence classification); None: the embedded task's tiny model
    tokenizer: Optional[str] = None  # default: the model directory
    data: Optional[str] = None  # JSONL of {"prompt", "chosen", "rejected"}; None: pairs made from the count task
    embedded_pairs: int = 4000  # pairs made for the embedded task
    eval_fraction: float = 0.1  # held-out pairs for the accuracy
    steps: int = 300
    batch_size: int = 32  # pairs per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    margin: float = 0.0  # -log sigmoid(r_c - r_r - margin)
    max_length: int = 512  # tokens of prompt + response kept (the last ones)
    eval_every: int = 50
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int = 0  # intra-op threads on the CPU; 0: 1 for a model under 10M parameters, else torch's
    out: str = "runs/rm"
    save_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True

    MODEL_KEY = "model"

    def validate(self) -> "RMConfig":
        for key in ("steps", "batch_size", "lr", "max_length", "eval_every", "embedded_pairs"):
            _require(getattr(self, key) > 0, f"{key}: expected a value > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "max_grad_norm", "margin", "save_every", "keep_checkpoints", "cpu_threads"):
            _require(getattr(self, key) >= 0, f"{key}: expected a value >= 0, got {getattr(self, key)}")
        _require(0 < self.eval_fraction < 1, f"eval_fraction: expected a value in (0, 1), got {self.eval_fraction}")
        _require(self.dtype in DTYPES, f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        self._validate_device()
        self._validate_out()
        for key in ("model", "data"):
            path = getattr(self, key)
            _require(path is None or os.path.exists(path), f"{key}: {path!r} does not exist")
        return self



# ----------------------------------------------------------------------------- data
def read_pairs(path: str) -> list[tuple[str, str, str]]:
    pairs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((row["prompt"], row["chosen"], row["rejected"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConfigError(f"data: {path}:{number}: expected a JSON object with prompt, chosen and rejected "
                                  f"({type(err).__name__}: {err})") from None
    _require(len(pairs) >= 2, f"data: {path} has {len(pairs)} pairs; need at least 2")
    return pairs


def count_task_pairs(n: int, generator: torch.Generator) -> list[tuple[str, str, str]]:
    """Pairs for the embedded count task: two corruptions of the right answer (digits changed,
    dropped or added), the one count_reward scores higher chosen; ties are skipped."""
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
    pairs = []
    while len(pairs) < n:
        prompt = tasks.count_prompts(1, generator)[0]
        a, b = (_corrupt(tasks.count_target(prompt), rng) for _ in range(2))
        score_a, score_b = tasks.count_reward([prompt, prompt], [a, b])
        if score_a != score_b:
            pairs.append((prompt, a, b) if score_a > score_b else (prompt, b, a))
    return pairs


def _corrupt(target: str, rng: random.Random) -> str:
    digits = list(target)
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(digits))
        digits[i] = str(rng.randrange(10))
    cut = rng.choice([0, 0, 0, 1, 2, -1, -2])
    digits = digits[:len(digits) + cut] if cut < 0 else digits + [str(rng.randrange(10)) for _ in range(cut)]
    return "".join(digits)


# ----------------------------------------------------------------------------- training
class RewardModelTrainer:
    def __init__(self, config: RMConfig):
        self.config = cfg = config.validate()
        self.device, self.dtype = torch.device(cfg.resolved_device()), cfg.resolved_dtype()
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        pairs = read_pairs(cfg.data) if cfg.data else count_task_pairs(cfg.embedded_pairs, self.generator)
        order = torch.randperm(len(pairs), generator=self.generator).tolist()
        n_eval = max(1, int(len(pairs) * cfg.eval_fraction))
        self.eval_pairs, self.train_pairs = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]]
        self._load_model()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.step_count = 0

    def _load_model(self) -> None:
        cfg = self.config
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if cfg.model is None:
            self.tokenizer = tasks.DigitTokenizer()
            model_config = tasks.tiny_policy_config(self.tokenizer)
            model_config.num_labels = 1
            self.model = AutoModelForSequenceClassification.from_config(model_config, dtype=self.dtype)
        else:  # a causal LM's backbone gets a fresh scalar head; a reward model keeps its own
            self.model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1, dtype=self.dtype,
                                                                            local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, local_files_only=True)
        self.pad_token_id = self.model.config.pad_token_id = _pad_id(self.tokenizer)
        self.model = models.disable_dropout(self.model).to(self.device)
        self.cpu_threads = models.set_cpu_threads(cfg.cpu_threads, self.device, self.model)

    def scores(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected) [B] for pairs of (prompt, chosen, rejected)."""
        rows = []
        for prompt, *responses in pairs:
            for response in responses:
                ids = self.tokenizer.encode(prompt + response, add_special_tokens=False) + [self.tokenizer.eos_token_id]
                rows.append(ids[-self.config.max_length:])
        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        r = models.reward_model_scores(self.model, ids, mask)
        return r[0::2], r[1::2]

    def step(self) -> dict:
        cfg = self.config
        start = (self.step_count * cfg.batch_size) % len(self.train_pairs)
        batch = [self.train_pairs[(start + i) % len(self.train_pairs)] for i in range(cfg.batch_size)]
        self.model.train()
        chosen, rejected = self.scores(batch)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected - cfg.margin).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.step_count += 1
        if start + cfg.batch_size >= len(self.train_pairs):  # an epoch is done: reshuffle
            order = torch.randperm(len(self.train_pairs), generator=self.generator).tolist()
            self.train_pairs = [self.train_pairs[i] for i in order]
        margin = (chosen - rejected).detach()
        metrics = {"step": self.step_count, "loss": float(loss.detach()), "accuracy": float((margin > 0).float().mean()),
                   "reward_margin": float(margin.mean()), "grad_norm": float(grad_norm)}
        if self.step_count % cfg.eval_every == 0 or self.step_count == cfg.steps:
            metrics["eval_accuracy"] = self.evaluate()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Pairwise accuracy on the held-out pairs."""
        right = 0
        for i in range(0, len(self.eval_pairs), self.config.batch_size):
            chosen, rejected = self.scores(self.eval_pairs[i:i + self.config.batch_size])
            right += int((chosen > rejected).sum())
        return right / len(self.eval_pairs)

    def train(self, resume: bool = False, run: RunFolder | None = None) -> list[dict]:
        """Train to config.steps (resume: from the newest checkpoint in OUT), logging each step to
        OUT/metrics.jsonl and TensorBoard; the model ends up in OUT/model. `run`: as in PPOTrainer.train."""
        import contextlib

        from tqdm.auto import tqdm

        cfg = self.config
        with contextlib.ExitStack() as stack:
            if run is None:
                run = stack.enter_context(RunFolder(cfg.out).open(cfg, resume))
            if resume and list_checkpoints(cfg.out):
                self.load_state_dict(load_newest(cfg.out)[1])
            run.begin(self.step_count)
            history = []
            bar = tqdm(range(self.step_count, cfg.steps), desc="rm", disable=not cfg.progress, dynamic_ncols=True)
            for _ in bar:
                metrics = self.step()
                history.append(metrics)
                run.log(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                if cfg.save_every and self.step_count % cfg.save_every == 0 and self.step_count < cfg.steps:
                    self.save()
            if not os.path.isdir(checkpoint_path(cfg.out, self.step_count)):
                self.save()
            self.save_model(os.path.join(cfg.out, "model"))
            return history

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"model": {k: v for k, v in self.model.state_dict().items()},
                "trainer": {"step": self.step_count, "optimizer": self.optimizer.state_dict(),
                            "generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                            "train_pairs": self.train_pairs}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        rest = state["trainer"]
        self.optimizer.load_state_dict(rest["optimizer"])
        self.step_count = rest["step"]
        self.generator.set_state(rest["generator"])
        torch.set_rng_state(rest["torch"])
        self.train_pairs = [tuple(p) for p in rest["train_pairs"]]

    def save(self) -> str:
        return save_checkpoint(self.state_dict(), self.config.out, self.step_count, self.config.keep_checkpoints)

    def save_model(self, path: str) -> None:
        """An HF directory that `ppo-fast train reward_model=PATH` loads (with the tokenizer,
        except for the embedded task, whose digit tokenizer the trainer builds itself)."""
        self.model.save_pretrained(path)
        if not isinstance(self.tokenizer, tasks.DigitTokenizer):
            self.tokenizer.save_pretrained(path)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return value
    raise ConfigError("tokenizer: has no pad, unk or EOS token to pad with")

