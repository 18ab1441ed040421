"""Build script for the optional native backends of ppo_fast.

Pure-Python metadata lives in pyproject.toml. This file adds the C++ (CPU) extension
`ppo_fast._C` and the CUDA extension `ppo_fast._C_cuda`, built with
torch.utils.cpp_extension (ninja) from the sources under csrc/, when those sources exist.
Build without isolation so the torch already installed is the one compiled against:

    pip install --no-build-isolation -e .

Set PPO_FAST_NO_EXT=1 to skip the native build (the Triton and torch backends still work).
"""
import glob
import os
import platform

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# -fopenmp: at::parallel_for is a header template over `omp parallel` (torch's CPU builds use
# OpenMP), so without it every kernel would run on one thread; it also makes the `omp simd
# reduction` loops vectorise without -ffast-math. -fno-trapping-math: branch-free selects on
# floats; results stay IEEE. -ffp-contract=off: a product is rounded before it is added, as
# written (GCC's default fuses z * inv_t - m into one FMA, and then the row's max entry is
# off by the rounding of its own product: 6e22 at |z| = 1e30, whose exp overflows). PPO_FAST_CPU_FLAGS adds flags, e.g. "-march=native" for a build
# used only on the machine that compiles it.
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"] + os.environ.get("PPO_FAST_CPU_FLAGS", "").split()
# The CPU kernels are built once per instruction set, as ATen builds its own (CPU_CAPABILITY):
# ppo_fast._C for any x86-64 (and every other architecture), _C_avx2 and _C_avx512 with those
# instructions; ppo_fast.ops.native imports the best one the CPU runs (torch's own
# cpu_capability), so a wheel built with PPO_FAST_CPU_ISA=all runs on any x86-64 (a local build
# makes only the one this CPU loads: cpu_variants_to_build). at::vec::Vectorized takes its lane
# count and its Sleef exp from the CPU_CAPABILITY macros.
CPU_VARIANTS = {
    "_C": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "_C_avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_C_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cpu_variants_to_build(x86: bool) -> list:
    """The CPU builds: PPO_FAST_CPU_ISA=all (CI, wheels: a binary for any x86-64 CPU) builds every
    variant; the default, native, only the one this CPU runs best (torch's own cpu_capability), which
    is all a local install loads; other architectures build _C alone."""
    if not x86:
        return ["_C"]
    wanted = os.environ.get("PPO_FAST_CPU_ISA", "native").strip().lower()
    if wanted == "all":
        return list(CPU_VARIANTS)
    if wanted != "native":
        raise ValueError(f"PPO_FAST_CPU_ISA: expected 'native' or 'all', got {wanted!r}")
    import torch

    best = {"AVX512": "_C_avx512", "AVX2": "_C_avx2"}.get(torch.backends.cpu.get_cpu_capability(), "_C")
    return [best]


def native_extensions():
    if os.environ.get("PPO_FAST_NO_EXT") == "1":
        return [], {}
    cpu_sources = _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if not cpu_sources and not cuda_sources:
        return [], {}
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(HERE, "csrc")]
    extensions = []
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    for name in cpu_variants_to_build(x86) if cpu_sources else ():
        extensions.append(
            cpp_extension.CppExtension(
                f"ppo_fast.{name}",
                cpu_sources if name == "_C" else _variant_sources(name, cpu_sources),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": CPU_FLAGS + CPU_VARIANTS[name]},
                extra_link_args=["-fopenmp"],
            )
        )
    if cuda_sources and cpp_extension.CUDA_HOME is not None and _torch_has_cuda():
        extensions.append(
            cpp_extension.CUDAExtension(
                "ppo_fast._C_cuda",
                cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    return extensions, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _variant_sources(name, sources):
    """One-line wrappers build/isa/<name>/<file>.cpp including each source, so each ISA build
    compiles to its own object files (the same paths would share, and overwrite, one object)."""
    folder = os.path.join("build", "isa", name)
    os.makedirs(os.path.join(HERE, folder), exist_ok=True)
    wrappers = []
    for source in sources:
        wrapper = os.path.join(folder, os.path.basename(source))
        text = f'#include "{os.path.join(HERE, source)}"  // {name}: see setup.py\n'
        path = os.path.join(HERE, wrapper)
        if not os.path.isfile(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        wrappers.append(wrapper)
    return wrappers


def _torch_has_cuda():
    import torch

    return torch.version.cuda is not None


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
