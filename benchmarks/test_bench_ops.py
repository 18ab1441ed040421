"""pytest-benchmark view of the op benchmarks: `pytest benchmarks/ --benchmark-only`.

The cases and implementations are those of `ppo-fast bench ops --quick` (ppo_fast.bench.cases),
so both entry points time the same code.
"""
import pytest
import torch

from ppo_fast.bench.cases import CASES as OP_CASES
from ppo_fast.bench.timing import synchronize
from ppo_fast.ops.backend import BackendError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [case for op_cases in OP_CASES.values() for case in op_cases(DEVICE, "quick")]


@pytest.mark.parametrize(
    "case, impl",
    [(c, impl) for c in CASES for impl in c.impls],
    ids=lambda x: x if isinstance(x, str) else f"{x.fn}-{x.mode}",
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
        synchronize(DEVICE)

    benchmark.group = f"{case.fn} {case.mode} {case.shape}"
    benchmark(run)
