# Two entry points, each doing all the set-up it needs in the active Python environment:
#   make test   install, then run the whole test suite
#   make demo   install, then run the main job on its embedded default
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed only where no torch is present; an existing (e.g. CUDA) torch is never replaced.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.10" ninja
	$(PIP) install -q --no-build-isolation -e ".[dev]"

test: install
	$(PYTHON) -m pytest tests

demo: install
	$(PYTHON) -m ppo_fast.cli demo

bench: install
	$(PYTHON) -m ppo_fast.cli bench

clean:
	rm -rf build *.egg-info ppo_fast/*.so .pytest_cache .benchmarks
