"""`ppo-fast bench e2e`: the same PPO run twice in one process, on `ppo_fast.ops` and on
`ppo_fast.ops.reference` (the plain-PyTorch loop), reporting tokens/s and peak memory per phase."""
from __future__ import annotations

import gc
import tempfile

import torch

from ppo_fast.bench.timing import environment
from ppo_fast.ppo import PPOConfig, PPOTrainer

PHASES = ("rollout", "experience", "update")


def run_ops(config: PPOConfig, ops: str, steps: int, warmup: int) -> dict:
    """Timed steps after `warmup` untimed ones: tokens/s per phase and overall, peak memory."""
    with tempfile.TemporaryDirectory() as out:
        trainer = PPOTrainer(config.replace({"ops": ops, "steps": warmup + steps, "out": out, "progress": False,
                                             "tensorboard": False}))
        for _ in range(warmup):
            trainer.step()
        metrics = [trainer.step() for _ in range(steps)]
        model = trainer.policy.config
        shape = {"parameters": sum(p.numel() for p in trainer.policy.parameters()), "vocab": model.vocab_size,
                 "hidden": model.hidden_size, "layers": model.num_hidden_layers}
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tokens = sum(m["tokens"] for m in metrics)
    row = {"ops": ops, "policy": shape, "steps": steps, "tokens": tokens,
           "tokens_per_s": tokens / sum(m[f"time_{p}"] for m in metrics for p in PHASES),
           # on CPU the step's figure is the process's peak RSS so far, which a second run in the
           # same process cannot go below: not a per-run figure, so not reported
           "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics) if "peak_memory_update_gb" in metrics[0] else None,
           "reward_mean_last": metrics[-1]["reward_mean"]}
    for phase in PHASES:
        row[f"{phase}_tokens_per_s"] = tokens / sum(m[f"time_{phase}"] for m in metrics)
        key = f"peak_memory_{phase}_gb"
        row[key] = max(m[key] for m in metrics) if key in metrics[0] else None
    return row


def run(config: PPOConfig, steps: int = 5, warmup: int = 1) -> dict:
    config = config.validate()
    rows = [run_ops(config, ops, steps, warmup) for ops in ("reference", "fused")]
    return {
        "kind": "e2e", **environment(torch.device(config.resolved_device())),
        "model": config.policy or "embedded count task", "policy": rows[0]["policy"],
        "config": {k: getattr(config, k) for k in ("rollout_batch_size", "max_new_tokens", "mini_batch_size",
                                                   "micro_batch_size", "ppo_epochs", "critic", "dtype",
                                                   "gradient_checkpointing", "lora_rank")},
        "results": rows,
        "speedup": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
    }
