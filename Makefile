# opt_fast developer commands. `make test` and `make run` do all their own set-up.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA take the CPU build of torch (a bare `torch` pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test run bench compile-check gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; \
	else \
		$(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q "triton==3.6.0; sys_platform == 'linux'" "numpy<2.4"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

run: setup
	$(BIN)/python scripts/demo.py

bench:
	@echo "make bench: the kernel and throughput benchmarks arrive with the Triton kernels (issue 3)" >&2; exit 2

compile-check:
	@echo "make compile-check: the ahead-of-time kernel compile check arrives with the Triton kernels (issue 3)" >&2; exit 2

# On a lent GPU machine: no network, torch/triton/transformers already installed.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .demo
