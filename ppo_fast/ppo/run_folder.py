"""A run's folder: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/ and a lock.

metrics.jsonl is the record of the run. It is only appended to, or rewritten whole through a
temporary file, fsync and rename (a kill mid-rewrite leaves the old file); a torn last line
(a kill mid-append) is dropped when read. Each line is strict JSON: a non-finite value is
written as null. The TensorBoard events are rebuilt from metrics.jsonl whenever a run starts
or resumes, so they hold exactly one point per step whatever happened before.
"""
from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import warnings

from ppo_fast.ppo.config import ConfigError


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str, text: str) -> None:
    """Write `text` to `path` through path.tmp, fsync and rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def strict_json(metrics: dict) -> str:
    """One JSON line; NaN and inf become null (JSON has no non-finite numbers)."""
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})


class RunFolder:
    def __init__(self, out: str):
        self.out = out
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.config_path = os.path.join(out, "config.yaml")
        self._lock_file = None
        self._writer = None

    def lock(self) -> None:
        """Refuse a folder another live run holds. The lock is the OS's (flock), so a crashed
        or killed run never leaves it stuck."""
        os.makedirs(self.out, exist_ok=True)
        self._lock_file = open(os.path.join(self.out, ".lock"), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self._lock_file = None
            raise ConfigError(f"out: {self.out!r} is in use by a running ppo-fast train ({holder}); "
                              f"wait for it or choose another folder") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}\n")
        self._lock_file.flush()

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> list[dict]:
        """The logged steps; a torn last line (a kill mid-write) is dropped."""
        if not os.path.exists(self.metrics_path):
            return []
        rows = []
        with open(self.metrics_path) as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 2:  # not the last line: the file is damaged, not torn
                    raise ConfigError(f"{self.metrics_path}: line {i + 1} is not JSON") from None
        return rows

    def keep_metrics_through(self, step: int) -> list[dict]:
        """Drop the steps after `step` (logged after the checkpoint a run resumes from), atomically."""
        kept = [m for m in self.read_metrics() if m["step"] <= step]
        replace_atomically(self.metrics_path, "".join(strict_json(m) + "\n" for m in kept))
        return kept

    def append_metrics(self, metrics: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(strict_json(metrics) + "\n")
        if self._writer is not None:
            self._add_scalars(metrics)

    # ------------------------------------------------------------------ TensorBoard
    def start_tensorboard(self, history: list[dict]) -> None:
        """Fresh event files holding `history` (the kept metrics), then one point per new step."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("ppo_fast: tensorboard is not installed; metrics go to metrics.jsonl only", RuntimeWarning)
            return
        for path in glob.glob(os.path.join(self.out, "events.out.tfevents.*")):
            os.remove(path)
        self._writer = SummaryWriter(self.out)
        for metrics in history:
            self._add_scalars(metrics)
        self._writer.flush()

    def _add_scalars(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"ppo/{key}", value, metrics["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.unlock()
