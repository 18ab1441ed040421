"""Backend choice: PPO_FAST_BACKEND, use_backend, auto, and clear errors when forced."""
import pytest
import torch
from support import DEVICE

import ppo_fast
from ppo_fast.ops import logprobs_from_logits
from ppo_fast.ops.backend import BackendError, available_backends, requested_backend, resolve_backend

ALL = ("triton", "cuda", "cpp", "torch")


def test_env_variable_and_context_manager(monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "torch")
    assert requested_backend() == "torch"
    with ppo_fast.use_backend("triton"):
        assert requested_backend() == "triton"
        with ppo_fast.use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "triton"
    assert requested_backend() == "torch"
    monkeypatch.delenv("PPO_FAST_BACKEND")
    assert requested_backend() == "auto"


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'numba'"):
        with ppo_fast.use_backend("numba"):
            pass
    monkeypatch.setenv("PPO_FAST_BACKEND", "jax")
    with pytest.raises(ValueError, match=r"PPO_FAST_BACKEND must be one of .*got 'jax'"):
        requested_backend()


def test_auto_picks_by_device():
    with ppo_fast.use_backend("auto"):
        if DEVICE.type == "cuda":
            assert resolve_backend(DEVICE, "op", ALL) == "triton"
        expected_cpu = "cpp" if "cpp" in available_backends("cpu") else "torch"
        assert resolve_backend(torch.device("cpu"), "op", ALL) == expected_cpu


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    cpu = torch.device("cpu")
    with ppo_fast.use_backend("cuda"), pytest.raises(BackendError, match="runs on CUDA tensors only"):
        resolve_backend(cpu, "op", ALL)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ppo_fast.use_backend("triton"), pytest.raises(BackendError, match="or on CPU tensors under TRITON_INTERPRET=1"):
        resolve_backend(cpu, "op", ALL)
    with ppo_fast.use_backend("triton"), pytest.raises(BackendError, match="does not implement this op"):
        resolve_backend(cpu, "op", {"torch": None})


@pytest.mark.skipif("cpp" in available_backends("cpu"), reason="the C++ extension is built here")
def test_forced_cpp_without_extension_raises():
    with ppo_fast.use_backend("cpp"), pytest.raises(BackendError, match=r"ppo_fast._C was not built"):
        resolve_backend(torch.device("cpu"), "op", ALL)


def test_op_refuses_a_backend_it_lacks():
    logits, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with ppo_fast.use_backend("cuda"), pytest.raises(BackendError, match=r"logprobs_from_logits: backend 'cuda'"):
        logprobs_from_logits(logits, labels)


def test_readme_backends_column_is_each_ops_implementation_table():
    """The README's ops table states, per op, the backends of its table: a backend dropped from
    an op (or added without saying so) fails here, not silently in a skipped test."""
    import os
    import re

    from ppo_fast.ops import IMPLEMENTATIONS

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    documented = {m.group(1): tuple(b.strip() for b in m.group(2).split(","))
                  for m in re.finditer(r"^\| `(\w+)\(.*\| ([a-z, ]+) \|$", readme, re.M)}
    assert documented == {op: tuple(table) for op, table in IMPLEMENTATIONS.items()}


def test_every_op_file_has_the_same_shape_and_names():
    """Each op's table {backend: implementation} binds, for every kernel backend, the one function
    `_<op>_on_kernels` of the op's own file, whose `KERNELS` table has that backend; the "torch" entry
    is the reference of the same name. An op file with another layer name or a positional table
    fails here."""
    import functools
    import importlib

    from ppo_fast.ops import FAMILIES, IMPLEMENTATIONS, reference

    family_of = {op: family for family in FAMILIES
                 for op in importlib.import_module(f"ppo_fast.ops.{family}").IMPLEMENTATIONS}
    for op, table in IMPLEMENTATIONS.items():
        module = importlib.import_module(f"ppo_fast.ops.{family_of[op]}")
        assert table["torch"] is getattr(reference, op), op
        kernel_backends = [b for b in table if b != "torch"]
        for backend in kernel_backends:
            entry = table[backend]
            assert isinstance(entry, functools.partial) and entry.keywords == {"backend": backend}, (op, backend)
            assert entry.func is getattr(module, f"_{op}_on_kernels"), (op, backend, entry.func.__name__)
            assert backend in module.KERNELS, (op, backend)
        assert not kernel_backends or set(kernel_backends) == set(module.KERNELS), op


def test_readme_layout_names_every_module():
    """The README's Layout names every Python module of the package and every C++/CUDA source and
    header under csrc/ (an <op>.cpp / <op>.cu by its op name): a file added or renamed without the
    map saying so fails here."""
    import os
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    readme = open(os.path.join(root, "README.md")).read()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"[\w.]+", layout))
    missing = []
    for top in ("ppo_fast", "csrc"):
        for folder, _, files in os.walk(os.path.join(root, top)):
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext not in (".py", ".cpp", ".cu", ".h", ".cuh") or name == "__init__.py":
                    continue
                if name not in names and not (ext in (".cpp", ".cu") and stem in names):
                    missing.append(os.path.relpath(os.path.join(folder, name), root))
    assert not missing, f"README Layout does not name: {missing}"


def test_importing_the_ops_loads_neither_the_loop_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, ppo_fast.ops; loaded = [m for m in ('transformers', 'ppo_fast.ppo', 'ppo_fast.bench') "
            "if m in sys.modules]; print(loaded); sys.exit(1 if loaded else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
