"""Benchmarks: timing.py (timers, device limits), cases.py (one function per op family),
ops.py (the op runner), e2e.py (the end-to-end runner), records.py (JSON, tables, plots)."""
import os

# The results folder of a source checkout; `ppo-fast bench --out DIR` writes elsewhere.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "benchmarks", "results")
