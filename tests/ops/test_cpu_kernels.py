"""The C++ (CPU) kernels' own machinery: the vectorised exp's error in ulp, the choice of the
instruction-set build (setup.py CPU_VARIANTS, native.cpu_capability), and every build that this
CPU runs passing the op tests of the cpp backend (the suite itself runs the best one)."""
import os
import subprocess
import sys

import pytest
import torch
from support import DEVICE

from ppo_fast.ops import native
from ppo_fast.ops.native import CPU_CAPABILITIES, CPU_VARIANTS, cpu_capability, native_module

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or native_module("_C") is None,
                                reason="the C++ kernels run on CPU tensors, when built")
HERE = os.path.dirname(__file__)
OP_TESTS = ["test_logprobs.py", "test_fused_linear.py", "test_fused_linear_ppo_loss.py", "test_policy_loss.py",
            "test_objectives.py", "test_value_loss.py", "test_kl.py", "test_gae.py", "test_masked.py",
            "test_batch_invariance.py", "test_numeric_contract.py"]


def runnable_builds():
    """The capabilities at or below this CPU's whose build exists (x86: AVX512, AVX2, DEFAULT)."""
    best = torch.backends.cpu.get_cpu_capability()
    start = CPU_CAPABILITIES.index(best) if best in CPU_CAPABILITIES else len(CPU_CAPABILITIES) - 1
    return [c for c in CPU_CAPABILITIES[start:] if native._import_native(CPU_VARIANTS[c]) is not None]


def ulp_error(got, x):
    """|got - exp(x)| in units of the float32 spacing at exp(x) (float64 oracle)."""
    want = x.double().exp()
    spacing = (want.float().nextafter(torch.tensor(float("inf"))) - want.float()).double()
    return (got.double() - want).abs() / spacing


@pytest.mark.parametrize("capability", runnable_builds())
@pytest.mark.parametrize("in_range", [False, True])
def test_vectorised_exp_is_within_two_ulp(monkeypatch, capability, in_range):
    """fast_exp (every float) and exp_in_range (arguments a kernel has clamped) on a dense grid
    of their domain, through a lane loop as the kernels run them, on each build."""
    monkeypatch.setenv("PPO_FAST_CPU_CAPABILITY", capability.lower())
    module = native_module("_C")
    assert module.__name__ == f"ppo_fast.{CPU_VARIANTS[capability]}"
    top = 88.0 if in_range else 88.7228
    x = torch.cat([torch.linspace(-87.33, top, 1_000_003), torch.linspace(-1, 1, 100_001), torch.tensor([0.0, -0.0])])
    assert ulp_error(module.exp_values(x, in_range), x).max() <= 2.0
    if not in_range:
        special = torch.tensor([float("nan"), float("inf"), float("-inf"), 88.73, 1e30, -87.4, -1e30])
        got = module.exp_values(special, False)
        assert torch.isnan(got[0]) and got[1:].tolist() == [float("inf"), 0.0, float("inf"), float("inf"), 0.0, 0.0]
    else:
        assert torch.isnan(module.exp_values(torch.tensor([float("nan")]), True)).all()


def test_the_build_follows_the_cpu_and_can_be_lowered(monkeypatch):
    best = runnable_builds()[0]
    monkeypatch.delenv("PPO_FAST_CPU_CAPABILITY", raising=False)
    assert native_module("_C").__name__ == f"ppo_fast.{CPU_VARIANTS[best]}"
    monkeypatch.setenv("PPO_FAST_CPU_CAPABILITY", "default")
    assert cpu_capability() == "DEFAULT"
    if "DEFAULT" in runnable_builds():  # PPO_FAST_CPU_ISA=all (CI, wheels)
        assert native_module("_C").__name__ == "ppo_fast._C"
    else:  # a local build makes only the best one: lowered below it, the cpp backend is absent
        assert native_module("_C") is None


def test_a_build_the_cpu_cannot_run_or_an_unknown_one_is_refused(monkeypatch):
    monkeypatch.setenv("PPO_FAST_CPU_CAPABILITY", "avx1024")
    with pytest.raises(ValueError, match=r"PPO_FAST_CPU_CAPABILITY: expected one of \['avx512', 'avx2', 'default'\]"):
        cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setenv("PPO_FAST_CPU_CAPABILITY", "avx2")
    with pytest.raises(ValueError, match=r"PPO_FAST_CPU_CAPABILITY=avx2: this CPU runs at most default"):
        cpu_capability()


@pytest.mark.parametrize("capability", runnable_builds()[1:])
def test_each_lower_build_passes_the_op_tests(capability):
    """The op tests of the cpp backend (float64 oracles, NaN rules, padding invariance) in a fresh
    process on each build below the best one (which the rest of the suite runs), ~5 s each."""
    env = {**os.environ, "PPO_FAST_CPU_CAPABILITY": capability.lower()}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "cpp",
                             *(os.path.join(HERE, f) for f in OP_TESTS)], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(HERE)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
