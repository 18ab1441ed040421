"""pytest-benchmark view of the op benchmarks: `pytest benchmarks/ --benchmark-only`.

The cases and implementations are those of `ppo-fast bench --quick` (ppo_fast.bench), so
both entry points time the same code.
"""
import pytest
import torch

from ppo_fast import bench
from ppo_fast.backend import BackendError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [case for op_cases in bench.CASES.values() for case in op_cases(DEVICE, quick=True)]


@pytest.mark.parametrize(
    "case, impl",
    [(c, impl) for c in CASES for impl in c.impls],
    ids=lambda x: x if isinstance(x, str) else f"{x.op}-{x.mode}",
)
def test_op(benchmark, case, impl):
    inputs = case.make_inputs()
    fn = case.impls[impl]
    try:
        fn(inputs)
    except BackendError as err:  # this backend does not implement the op
        pytest.skip(str(err))

    def run():
        fn(inputs)
        bench.synchronize(DEVICE)

    benchmark.group = f"{case.op} {case.mode} {case.shape}"
    benchmark(run)
