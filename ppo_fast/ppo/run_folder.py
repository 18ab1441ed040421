"""A run's folder and its lifecycle: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/
and a lock. RunFolder is the one owner of it, used the same way by `ppo-fast train`, `ppo-fast rm`
and library users:

    with RunFolder(config.out).open(config, resume) as run:  # lock; a fresh run: refuse old checkpoints,
        trainer = PPOTrainer(config)                         #   write config.yaml before the models load
        trainer.train(resume, run=run)                       # run.begin(step) once the checkpoint loaded,
                                                             #   then run.log(metrics) after every step

(`trainer.train()` without `run` opens one itself.) On ranks other than 0 (`main=False`) nothing is
written; the checks that can fail still run there, so every rank raises the same error.

metrics.jsonl is the record of the run. It is only appended to, or rewritten whole through a
temporary file, fsync and rename (a kill mid-rewrite leaves the old file); a torn last line (a
kill mid-append) is dropped when read. Each line is strict JSON: a non-finite value is written as
null. The TensorBoard events are kept in one file per segment of SEGMENT_STEPS steps, so that a
resume at step S rewrites only S's segment from metrics.jsonl (and any segment that has no file):
the events hold exactly one point per step whatever happened before, and a resume costs the same
after 100 steps as after 100,000. Reading the end of metrics.jsonl works backwards from its end,
so trimming it costs the lines dropped, not the run's history.
"""
from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import warnings

from ppo_fast.ppo.checkpoint import fsync_path, refuse_earlier_run
from ppo_fast.ppo.config import ConfigError

SEGMENT_STEPS = 500  # TensorBoard steps per event file
_SEGMENT_SUFFIX = re.compile(r"\.seg(\d+)$")


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


def segment_of(step: int) -> int:
    return (step - 1) // SEGMENT_STEPS


class RunFolder:
    def __init__(self, out: str, *, main: bool = True):
        self.out, self.main = out, main
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.config_path = os.path.join(out, "config.yaml")
        self.config, self.resume = None, False
        self._lock_file = None
        self._tensorboard, self._writer, self._writer_segment = False, None, None

    # ------------------------------------------------------------------ lifecycle
    def open(self, config, resume: bool) -> "RunFolder":
        """Lock the folder; a fresh run refuses a folder holding checkpoints and writes config.yaml
        now (before any model loads, so a run killed while loading can be resumed); a resumed run
        writes its merged config in begin(), once its checkpoint has loaded."""
        self.config, self.resume = config, resume
        if self.main:
            self.lock()
        if not resume:
            refuse_earlier_run(self.out)
            if self.main:
                config.save(self.config_path)
        return self

    def begin(self, step: int) -> None:
        """The run goes on from `step` (0 for a fresh run): the resumed config is written, the
        metrics logged after `step` dropped, and TensorBoard made to hold steps 1..step."""
        if not self.main:
            return
        if self.resume:  # after the checkpoint has loaded: a failed resume leaves the old config
            self.config.save(self.config_path)
        self.keep_metrics_through(step)
        if self.config is None or getattr(self.config, "tensorboard", True):
            self.sync_tensorboard(step)

    def log(self, metrics: dict) -> None:
        """Append one step's metrics (and their TensorBoard points)."""
        if self.main:
            self.append_metrics(metrics)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.unlock()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the lock
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

    def metrics_after(self, step: int) -> tuple[list[dict], int]:
        """(the logged steps after `step`, oldest first, and the byte offset where they start),
        read backwards from the end of metrics.jsonl; a torn last line is left out."""
        if not os.path.exists(self.metrics_path):
            return [], 0
        rows = []
        with open(self.metrics_path, "rb") as f:
            for offset, line in _lines_backwards(f):
                row = _parse_line(line)
                if row is None:  # torn: the last line only (a damaged earlier one reads as a step)
                    continue
                if row["step"] <= step:
                    return rows[::-1], offset + len(line)
                rows.append(row)
        return rows[::-1], 0

    def keep_metrics_through(self, step: int) -> None:
        """Drop the steps after `step` (logged after the checkpoint a run resumes from) and a torn
        last line, atomically; the file is only rewritten when something is dropped."""
        if not os.path.exists(self.metrics_path):
            return
        _, keep_bytes = self.metrics_after(step)
        if keep_bytes == os.path.getsize(self.metrics_path):
            return
        tmp = self.metrics_path + ".tmp"
        with open(self.metrics_path, "rb") as src, open(tmp, "wb") as dst:
            _copy_bytes(src, dst, keep_bytes)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.metrics_path)
        fsync_path(os.path.dirname(os.path.abspath(self.metrics_path)))

    def append_metrics(self, metrics: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(strict_json(metrics) + "\n")
        if self._tensorboard:
            self._add_scalars(metrics)

    # ------------------------------------------------------------------ TensorBoard
    def sync_tensorboard(self, step: int) -> None:
        """Make the event files hold exactly steps 1..step (from metrics.jsonl), then go on writing
        one point per logged step. The segment holding `step`, and any earlier one without exactly
        one file, is rewritten (the last segment may have lost buffered points to a kill); earlier
        segments keep their files (closed when the run moved past them, so complete); files of later
        segments (steps logged after the checkpoint) or of another layout are removed."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - tensorboard must be installed
        except ImportError:
            warnings.warn("ppo_fast: tensorboard is not installed; metrics go to metrics.jsonl only", RuntimeWarning)
            return
        last = segment_of(step) if step > 0 else -1  # the segment holding `step`: rewritten
        files = {}
        for path in glob.glob(os.path.join(self.out, "events.out.tfevents.*")):
            found = _SEGMENT_SUFFIX.search(path)
            files.setdefault(int(found.group(1)) if found else -1, []).append(path)
        have = {segment for segment, paths in files.items() if 0 <= segment < last and len(paths) == 1}
        for segment, paths in files.items():
            if segment not in have:
                for path in paths:
                    os.remove(path)
        rewrite = {segment for segment in range(last + 1) if segment not in have}
        self._tensorboard = True
        if rewrite:
            rows, _ = self.metrics_after(min(rewrite) * SEGMENT_STEPS)
            for row in rows:
                if segment_of(row["step"]) in rewrite:
                    self._add_scalars(row)
            self._writer.flush()

    def _add_scalars(self, metrics: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = metrics["step"]
        if self._writer is None or segment_of(step) != self._writer_segment:
            if self._writer is not None:
                self._writer.close()  # the segment is complete on disk from here on
            self._writer = SummaryWriter(self.out, filename_suffix=f".seg{segment_of(step):07d}")
            self._writer_segment = segment_of(step)
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"ppo/{key}", value, step)


def _parse_line(line: bytes):
    """The metrics of one line, or None for a torn (not JSON) one."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _lines_backwards(f, block: int = 1 << 20):
    """(offset, line with its newline) of a binary file, last line first."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    tail = b""
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        chunk = f.read(end - start) + tail
        lines = chunk.split(b"\n")
        tail = lines[0]  # may continue in the block before
        offset = start + len(tail) + 1
        pieces = []
        for line in lines[1:]:
            pieces.append((offset, line))
            offset += len(line) + 1
        for off, line in reversed(pieces):
            if line.strip():
                yield off, line + b"\n"
        end = start
    if tail.strip():
        yield 0, tail + b"\n"


def _copy_bytes(src, dst, n: int) -> None:
    src.seek(0)
    while n > 0:
        chunk = src.read(min(n, 1 << 24))
        if not chunk:
            break
        dst.write(chunk)
        n -= len(chunk)
