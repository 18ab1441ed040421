"""Peak host memory of one benchmark case on the CPU, where torch keeps no allocator statistics.

Each measurement runs in a fresh process (`python -m ppo_fast.bench.cpu_memory OP INDEX IMPL
PRESET`): it builds the case's inputs, runs the implementation once (warm-up), returns freed
heap pages to the OS (malloc_trim), resets the kernel's peak-RSS mark (/proc/self/clear_refs),
runs it again and reports VmHWM minus the RSS before that run: the peak the call itself adds
above its inputs, the CPU counterpart of the GPU's max_memory_allocated.
"""
from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_in_this_process(fn, inputs) -> float:
    """MB the call fn(inputs) adds to the resident set at its peak (Linux)."""
    fn(inputs)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn(inputs)
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(op: str, index: int, impl: str, preset: str) -> float | None:
    """Peak MB of CASES[op](cpu, preset)[index].impls[impl] measured in a fresh process; None if
    the platform cannot say (no /proc)."""
    out = subprocess.run([sys.executable, "-m", "ppo_fast.bench.cpu_memory", op, str(index), impl, preset],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main(argv) -> None:
    import torch

    from ppo_fast.bench.cases import CASES

    op, index, impl, preset = argv[0], int(argv[1]), argv[2], argv[3]
    case = CASES[op](torch.device("cpu"), preset)[index]
    print(json.dumps({"peak_mb": measure_in_this_process(case.impls[impl], case.make_inputs())}))


if __name__ == "__main__":
    main(sys.argv[1:])
