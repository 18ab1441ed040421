# Two entry points, each doing all the set-up it needs in the active Python environment:
#   make test   install (with the `dev` extra: test tools, LoRA), then run the whole test suite
#   make demo   install (with the `train` extra only), then run the main job on its embedded default
#               (a fresh runs/demo-<time> each time)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed only where no torch is present; an existing (e.g. CUDA) torch is never replaced.
TORCH_SPEC ?= torch==2.13.0

# The peers the adapter tests compare with (tests/integrations): their own code, installed without
# their dependencies (never a second torch); omegaconf is the one light package the compared
# modules need, accelerate and datasets what TRL's trainers need to run (neither depends on torch,
# so the installed one is kept), tensordict (pure Python, --no-deps: it names torch) and pyvers,
# cloudpickle, codetiming what verl's DataProto needs, hydra-core and orjson what verl's worker
# configs import (tests/integrations/test_verl_actor.py). A peer that cannot be installed makes its tests skip,
# saying so.
PEERS ?= verl==0.9.1 trl==1.16.0 openrlhf==0.11.2 liger-kernel==0.8.5 tensordict==0.15.3
PEER_DEPS ?= "omegaconf>=2.3" "accelerate>=1.4" "datasets>=3" "pyvers>=0.2,<0.3" cloudpickle codetiming \
	"hydra-core>=1.3" orjson

.PHONY: install native peers cuda-check test demo bench clean

# Metadata-only editable install (fast), then the native extensions built in place: ninja
# keeps its objects under build/, so a rebuild compiles only what changed. A failed native
# build leaves the Triton and torch backends working; PPO_FAST_REQUIRE_NATIVE=1 makes it fatal.
# EXTRAS: the optional dependencies installed with it (`train` for the demo, `dev` for the tests).
EXTRAS ?= train
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.10" ninja
	PPO_FAST_NO_EXT=1 $(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@$(MAKE) --no-print-directory native

native:
	@mkdir -p build; $(PYTHON) setup.py build_ext --inplace > build/native.log 2>&1 || tail -n 30 build/native.log; \
	if $(PYTHON) -c "import sys; from ppo_fast.ops.native import cpu_kernel_module as m; print('native: ppo_fast.' + m() + ' built') if m() else sys.exit(1)" 2>/dev/null; then :; \
	elif [ "$$PPO_FAST_REQUIRE_NATIVE" = 1 ]; then echo "native: build failed" >&2; exit 1; \
	else echo "native: build failed; CPU tensors use the torch backend" >&2; fi

# Compile every CUDA kernel as CI does (no GPU or CUDA torch needed, only nvcc), and check the
# torch-facing bindings (csrc/cuda/*.cpp) for syntax against torch's headers and CUDA's (a CPU
# torch ships the c10/cuda headers they use; the generated cmake-macros header is skipped).
NVCC ?= nvcc
# nvcc's own include flags (-I.../targets/<arch>/include), as its --dryrun reports them
CUDA_INCLUDES = $(shell $(NVCC) --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="\([^"]*\)".*/\1/p' | head -n 1)
cuda-check:
	@mkdir -p build/cuda-check
	@for f in csrc/cuda/*.cu; do \
		echo "nvcc $$f"; \
		$(NVCC) -std=c++17 -gencode=arch=compute_90,code=sm_90 -Icsrc -c $$f -o build/cuda-check/$$(basename $$f).o || exit 1; \
	done
	@echo "nvcc csrc/policy_math.h (every surrogate in device code)"; \
	printf '%s\n' '#include "policy_math.h"' \
		'struct Exp { __device__ float operator()(float x) const { return __expf(x); } };' \
		'template <int S> __device__ float one(const float* v) {' \
		'  return ppo_fast::surrogate<S>(v[0], v[1], v[2], v[3], {0.8f, 1.2f, 3.0f, 1.0f, 1.05f}, Exp{}).loss; }' \
		'__global__ void all_surrogates(float* v) { v[0] = one<0>(v) + one<1>(v) + one<2>(v) + one<3>(v); }' \
		> build/cuda-check/policy_math.cu && \
	$(NVCC) -std=c++17 -gencode=arch=compute_90,code=sm_90 -Icsrc -c build/cuda-check/policy_math.cu \
		-o build/cuda-check/policy_math.o
	@inc=$$($(PYTHON) -c "import torch.utils.cpp_extension as c, sysconfig; print(' '.join(['-I' + p for p in c.include_paths()] + ['-I' + sysconfig.get_paths()['include']]))") && \
	for f in csrc/cuda/*.cpp; do \
		echo "g++ -fsyntax-only $$f"; \
		$(CXX) -std=c++20 -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C_cuda \
			-Icsrc $$inc $(CUDA_INCLUDES) $$f || exit 1; \
	done

peers:
	@$(PIP) install -q --no-deps $(PEERS) && $(PIP) install -q $(PEER_DEPS) \
		|| echo "peers: not installed; tests/integrations will skip" >&2

test: EXTRAS = dev
test: install peers
	$(PYTHON) -m pytest tests

demo: install
	$(PYTHON) -m ppo_fast.cli demo

bench: install
	$(PYTHON) -m ppo_fast.cli bench ops

clean:
	rm -rf build *.egg-info ppo_fast/*.so .pytest_cache .benchmarks
