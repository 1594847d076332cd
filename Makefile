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
	$(PY) sample.py --config configs/tests/tiny-inference.yaml --random_init --prompt "a red star on a blue background" \
		--H 64 --W 64 --n_samples 2 --n_iter 1 --ddim_steps 10 --seed 42 --outdir outputs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench_unet.py

.PHONY: setup demo test bench
