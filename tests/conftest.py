"""Fixtures. Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors;
TRITON_INTERPRET must be set before any kernel is defined, hence here.

A test that takes the `backend` fixture names its op (`@pytest.mark.op("gae")` or a module-level
`OP = "gae"`) and runs once per backend in that op's table (`ppo_fast.ops.IMPLEMENTATIONS`)
that targets this device, plus `auto`. The native backends are named explicitly: where
`cpp` (CPU) or `cuda` (GPU) was not built the test fails under PPO_FAST_REQUIRE_NATIVE=1 (CI, the
GPU run) and is skipped, with the reason, otherwise — never silently replaced by torch.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support import DEVICE, backends_for, on_backend  # noqa: E402


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    if any("backend" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test lists its (op, backend) pairs itself
    marker = metafunc.definition.get_closest_marker("op")
    op = marker.args[0] if marker else getattr(metafunc.module, "OP", None)
    if op is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a test using `backend` must name its op")
    metafunc.parametrize("backend", backends_for(op), indirect=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "op(name): the op whose backends the `backend` fixture runs over")


@pytest.fixture
def backend(request):
    with on_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A trainer sets torch's intra-op threads for its model (cpu_threads); each test starts from
    the suite's count."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
