# Each target creates .venv if missing and installs exactly what it needs (CPU torch first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-cpu
PYTEST_ARGS ?=

.PHONY: install test lint demo clean

$(STAMP): setup.py constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned to the CPU build: a plain `pip install torch` would pull CUDA (GBs).
	$(PIP) install -q -c constraints-cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

# The CPU suite: unit + 2-process gloo tests + short end-to-end runs (GPU tests skip without CUDA).
test: lint
	$(PY) -m pytest -m "not gpu" -q $(PYTEST_ARGS) tests

demo: install
	$(PY) -m megatron_t1 demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
