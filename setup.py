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

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# -fopenmp: at::parallel_for is a header template over `omp parallel` (torch's CPU builds use
# OpenMP), so without it every kernel would run on one thread; it also makes the `omp simd
# reduction` loops vectorise without -ffast-math. -fno-trapping-math: branch-free selects on
# floats; results stay IEEE. PPO_FAST_CPU_FLAGS adds flags, e.g. "-march=native" for a build
# used only on the machine that compiles it.
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"] + os.environ.get("PPO_FAST_CPU_FLAGS", "").split()


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


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
    if cpu_sources:
        extensions.append(
            cpp_extension.CppExtension(
                "ppo_fast._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": CPU_FLAGS},
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


def _torch_has_cuda():
    import torch

    return torch.version.cuda is not None


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
