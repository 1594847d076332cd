# Two entry points: `make demo` (set up, run the main job on the CPU) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --outdir outputs/demo

# The suite on every core: one pytest-xdist worker per core (each test file on one worker), one thread each.
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

# All but the tests marked slow (integration runs, and grid cases beyond a covering few), in parallel: for every edit.
# `make test` runs them all.
test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n auto --dist loadfile

# The generated files: configs/sd-inject-dreambooth/*.yaml and docs/adapter-forms.md (a test fails when they are stale).
configs: $(VENV)/.installed
	$(PY) scripts/make_adapter_configs.py

bench: $(VENV)/.installed
	$(PY) bench/bench_unet.py

# On a GPU machine: SD v1 speed, memory and numerics vs diffusers, appended to bench/RESULTS.md (<= 8 min).
gpu-check: $(VENV)/.installed
	$(PY) bench/gpu_check.py

# Here, for a lent device machine without network: the wheels it lacks, in .whl/ (see bench/gpu_run.sh).
gpu-wheels: $(VENV)/.installed
	PYTHON=$(PY) bash bench/gpu_run.sh wheels

.PHONY: setup demo test test-fast configs bench gpu-check gpu-wheels
