"""`ppo-fast plot DIR`: PNG curves of a run's metrics.jsonl, one file per panel."""
from __future__ import annotations

import json
import os

PANELS = {  # file name: (title, metric keys)
    "reward": ("reward", ["reward_mean"]),
    "kl": ("KL to the reference (per sequence)", ["kl"]),
    "entropy": ("entropy (per token)", ["entropy"]),
    "clipfrac": ("clip fractions", ["clipfrac", "value_clipfrac"]),
    "losses": ("losses", ["policy_loss", "value_loss"]),
    "tokens_per_s": ("throughput (tokens/s)", ["tokens_per_s"]),
    # how off-policy: sampler vs experience, and the update's ratio (0 before its first step)
    "off_policy": ("max |log-prob gap| (symlog)", ["mismatch_max_abs", "onpolicy_max_log_ratio", "max_log_ratio"]),
}
SYMLOG = {"off_policy": 1e-9}  # panels whose values span 0 and tiny gaps: linear below this


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} has no metrics.jsonl (is it a ppo-fast train --out folder?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write OUT_DIR/<panel>.png (default RUN_DIR/plots) and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [m["step"] for m in metrics]
    paths = []
    for name, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            ax.plot(steps, [m.get(key, float("nan")) for m in metrics], label=key)
        ax.set(title=title, xlabel="step")
        if name in SYMLOG:
            ax.set_yscale("symlog", linthresh=SYMLOG[name])
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
