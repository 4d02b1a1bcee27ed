#!/usr/bin/env bash
# `make gpu-check`, on a lent GPU machine: no network; torch, triton, transformers, tokenizers,
# safetensors, pytest and pytest-xdist are already there. Installs opt_fast without touching them,
# runs the test suite on CUDA, each kernel benchmark against its torch peers, then LLM.generate
# against HF generate. Reports land in $OUT (benchmarks/results/ when unset), at most 8 files.
# Budget: under 8 minutes; every phase has its own timeout so one slow phase cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PARTS=$(mktemp -d)
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v -i warning | tail -3
{ date -u +"%Y-%m-%d %H:%M UTC"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/gpu_env.txt"
# xdist: the suite compiles many kernel specialisations; 8 workers compile them in parallel.
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests --deselect tests/kernels/test_compile_check.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}
kernels_rc=0
# The goals first: decode bandwidth, prefill vs SDPA, fused LN+QKV, sampling at batch 256.
for name in paged_decode attention layernorm_linear sampling; do
  timeout 50 python3 -m pytest -q -p no:cacheprovider "benchmarks/bench_$name.py" --benchmark-enable \
    --benchmark-json="$PARTS/$name.json" >> "$OUT/kernels.log" 2>&1 || kernels_rc=1
done
ls "$PARTS"/*.json >/dev/null 2>&1 && python3 benchmarks/report.py "$OUT/kernels.md" "$PARTS"/*.json \
  --merged-json "$OUT/kernels.json" | tail -70
timeout 120 python3 benchmarks/bench_generate.py --sizes opt-125m opt-1.3b --out "$OUT" 2>&1 | tail -8
bench_rc=${PIPESTATUS[0]}
echo "gpu-check: tests rc=$tests_rc, kernel benchmarks rc=$kernels_rc, generate rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$kernels_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
