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

# One test worker per core (pytest-xdist): most of the suite is the single-threaded Triton
# interpreter. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

run: setup
	$(BIN)/python scripts/demo.py

# Kernel benchmarks against their torch peers (full shapes on CUDA, a smoke run elsewhere),
# then end-to-end generation against HF.
bench: setup
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest -q benchmarks --benchmark-enable --benchmark-json=benchmarks/results/kernels.json
	$(BIN)/python benchmarks/report.py benchmarks/results/kernels.md benchmarks/results/kernels.json

# Compile every kernel for sm_80 and sm_90 with no GPU; fails on compile errors or spills.
compile-check: setup
	TRITON_INTERPRET=0 $(BIN)/python -m opt_fast.kernels.compile_check

# On a lent GPU machine: no network, torch/triton/transformers already installed.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
