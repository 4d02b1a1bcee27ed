#!/usr/bin/env bash
# `make gpu-check`, on a lent GPU machine: no network; torch, triton, transformers, tokenizers,
# safetensors and pytest are already there. Installs opt_fast without touching them, runs the test
# suite on CUDA, the kernel benchmarks against their torch peers, then LLM.generate against HF
# generate. Reports land in $OUT (benchmarks/results/ when unset). Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v -i warning | tail -3
{ date -u +"%Y-%m-%d %H:%M UTC"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/gpu_env.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider -n 8 tests --deselect tests/kernels/test_compile_check.py \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 170 python3 -m pytest -q -p no:cacheprovider benchmarks --ignore=benchmarks/bench_generate.py \
  --benchmark-enable --benchmark-json="$OUT/kernels.json" 2>&1 | tail -25 > "$OUT/kernels.log"
kernels_rc=${PIPESTATUS[0]}
[ -f "$OUT/kernels.json" ] && python3 benchmarks/report.py "$OUT/kernels.json" "$OUT/kernels.md"
timeout 150 python3 benchmarks/bench_generate.py --sizes opt-125m opt-1.3b --out "$OUT" 2>&1 | tee "$OUT/bench_generate.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu-check: tests rc=$tests_rc, kernel benchmarks rc=$kernels_rc, generate rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$kernels_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
