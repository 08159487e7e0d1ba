# cellkern — the commands the README shows.
#   make test       set up (venv, torch, build) and run the test suite
#   make demo       set up and run the main job on its embedded data
#   make demo-qa    the text task: question -> answer through the lattice, scored by BLEU
#   make bench      run the benchmarks (results in benchmarks/results/)
#   make gpu-check  GPU tests and benchmarks where CUDA exists (skips elsewhere)
#
# Uses the active virtual environment if there is one, else creates .venv.
# torch: the one already installed, else torch==2.13.0 (the CPU build where
# the machine has it on local disk); the build never pulls a CUDA torch.

SHELL := /bin/bash
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
DEPS := numpy click matplotlib scikit-learn pyyaml chatterbot-corpus pytest hypothesis pytest-benchmark ninja pybind11 setuptools wheel
STAMP := $(VENV)/.cellkern-deps
EXT_STAMP := build/.cellkern-ext
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: setup test demo demo-qa bench gpu-check info clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q "$(TRITON_SPEC)" || echo "triton unavailable: the triton backend will be skipped"
	$(PIP) install -q $(DEPS)
	touch $@

$(EXT_STAMP): $(STAMP) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

setup: $(EXT_STAMP)

info: setup
	$(PY) -m cellkern.info

test: setup
	$(PY) -m cellkern.info
	$(PY) -m pytest -q python_tests

demo: setup
	$(PY) -m cellkern.train.cli run --out runs/demo

demo-qa: setup
	$(PY) -m cellkern.train.cli run --config examples/qa.toml --out runs/qa

bench: setup
	$(PY) -m benchmarks.propagate
	$(PY) -m benchmarks.plasticity
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.mixing
	$(PY) -m benchmarks.percall

gpu-check: setup
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		PY=$(PY) tools/gpu_check.sh; \
	else \
		echo "gpu-check: no CUDA device here, skipped"; \
	fi

clean:
	rm -rf build *.egg-info cellkern/*.so .pytest_cache .hypothesis
