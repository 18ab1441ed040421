"""`ppo-fast bench ops`: every op against the plain-PyTorch reference (cases in cases.py).

Each row reports milliseconds (median), peak memory above the inputs (GPU; on the CPU for the
cases that ask for it, measured in a fresh process by cpu_memory.py), and the achieved
GB/s over the bytes the op must move (TFLOP/s for the GEMM-bound fused linear op), which the
table states as a fraction of the device's copy bandwidth (matmul rate) measured in the same run.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ppo_fast.bench import cpu_memory, records
from ppo_fast.bench.cases import CASES, Case
from ppo_fast.bench.timing import copy_bandwidth_gbps, environment, matmul_tflops, peak_memory_mb, time_ms
from ppo_fast.ops.backend import BackendError


def achieved_rates(bytes_moved: int, flops: int, ms: float) -> tuple:
    """(GB/s, TFLOP/s or None) of a case that took `ms` milliseconds."""
    seconds = ms * 1e-3
    return round(bytes_moved / seconds / 1e9, 3), (round(flops / seconds / 1e12, 4) if flops else None)


def run_case(case: Case, device: torch.device, index: int = 0, preset: str = "full") -> list:
    """Rows for each implementation of `case`, the index-th case of its op family."""
    rows = []
    inputs = case.make_inputs()
    for impl, fn in case.impls.items():
        row = {"op": case.op, "fn": case.fn, "impl": impl, "mode": case.mode,
               "dtype": str(case.dtype).replace("torch.", ""), "shape": case.shape}
        try:
            ms = time_ms(lambda: fn(inputs), device)
            peak = peak_memory_mb(lambda: fn(inputs), device)
            if peak is None and case.cpu_memory:
                peak = cpu_memory.peak_mb(case.op, index, impl, preset)
        except BackendError:
            continue  # this backend does not implement the op
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "ms": None, "error": "out of memory"})
            continue
        except Exception as err:  # a peer library's API or build problem: record it, keep going
            if impl.startswith(("torch", "ppo_fast")):
                raise
            rows.append({**row, "ms": None, "error": f"{type(err).__name__}: {err}"[:200]})
            continue
        ms = round(ms, 4)  # the rates follow from the time the record reports
        gbps, tflops = achieved_rates(case.bytes_moved, case.flops, ms)
        rows.append({**row, "ms": ms, "peak_mem_mb": None if peak is None else round(peak, 1),
                     "gbps": gbps, "tflops": tflops})
    return rows


def run(device=None, *, ops=None, preset="full", save_to=None) -> dict:
    """The record of every case of the op families `ops` (default: all) in `preset` (cases.PRESETS).
    With `save_to` (a folder) the record is saved after every case, so a run stopped midway
    (a time limit) leaves the rows it measured."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = sorted(set(ops or ()) - set(CASES))
    if unknown:
        raise ValueError(f"--op: unknown op {unknown}; expected some of {list(CASES)}")
    cases_of = {op: CASES[op](device, preset) for op in ops or CASES}  # checks the preset too
    record = {"kind": "ops", **environment(device), "preset": preset,
              "copy_gbps": round(copy_bandwidth_gbps(device), 1), "matmul_tflops": round(matmul_tflops(device), 2),
              "results": []}
    cases = [(case, index) for op_cases in cases_of.values() for index, case in enumerate(op_cases)]
    progress = tqdm(cases, desc="bench", unit="case")
    for case, index in progress:
        progress.set_postfix_str(f"{case.fn} {case.mode} {' '.join(map(str, case.shape.values()))}")
        # dynamo counts recompiles per code object, not per torch.compile wrapper: without a reset
        # the cases of one function (objectives, modes) pass its limit and run eager, silently
        torch._dynamo.reset()
        record["results"].extend(run_case(case, device, index, preset))
        if save_to is not None:
            records.save(record, save_to, plots=False)
    return record
