#!/usr/bin/env bash
# `make gpu-check`, on a lent GPU machine: no network; torch, triton, transformers, tokenizers,
# safetensors, pytest and pytest-xdist are already there. Installs opt_fast without touching them,
# then runs, each phase with its own timeout so one slow phase cannot eat the rest:
#   sweep     the tile sweep of the open speed goals (benchmarks/sweep_tiles.py), 90 s (see SWEEP_BUDGET)
#   tests     the test suite on CUDA, 110 s (TESTS_TIMEOUT)
#   kernels   each kernel benchmark against its torch peers (pytest-benchmark; wall time per call
#             and device time from CUDA graph replays), 4 x 34 s (KERNEL_BENCHES picks some,
#             KERNEL_TIMEOUT gives each more seconds)
#   generate  LLM.generate (defaults, eager, async scheduling; GENERATE_MODES picks others, e.g.
#             "default async triton triton-async" for every op in Triton, "default cublas-linears"
#             for what auto's fused LayerNorm GEMMs are worth) against HF generate,
#             100 s (GENERATE_TIMEOUT); GENERATE_ARGS adds bench_generate options, e.g.
#             "--num-prompts 256" for the batch a throughput user runs
#   serve     opt-fast bench (TTFT/TPOT) on OPT-1.3B, all at once and at 32 requests/s, then the
#             host-overhead benchmarks (per decode step, and per launch of each kernel beside its
#             torch peer), 140 s
#   prefix    (only when named) LLM.generate with prefix caching on vs off, 64 prompts sharing
#             1024 tokens, OPT-125m and 1.3B, 60 s; appended to bench_generate.md
#   kvfp8     (only when named) opt-fast bench on OPT-1.3B, 256 prompts x 1024 tokens in, 128 out,
#             with kv_cache_dtype auto then fp8; appended to bench_generate.md, 140 s
#   profile   (only when named) torch.profiler over LLM.generate on OPT-1.3B, default and async
#             modes: the kernels that hold the device time, and how busy it was; profile.md, 75 s
# Whole run: about 9 minutes at worst (the default phases). PHASES picks some, e.g. `PHASES="sweep generate" make gpu-check`;
# SWEEP_BUDGET (seconds, default 70) gives the sweep more time when it runs alone, e.g.
# `PHASES=sweep SWEEP_BUDGET=400 make gpu-check` to time every candidate at every shape, and
# SWEEP_ONLY (default "decode prefill ln_qkv") spends it on some kernels, e.g. the open goals;
# GPU_TESTS (default: tests) picks the test paths, e.g. "tests/kernels" when time is short (the
# whole suite needs about 2 minutes on 8 workers), and TESTS_TIMEOUT (seconds, default 110) bounds
# them.
# Reports land in $OUT (benchmarks/results/ when unset), 8 files at most: gpu_env.txt,
# gpu_tests.log, kernels.log, kernels.md (benchmarks, then the sweep), kernels.json, sweep.json,
# bench_generate.md, bench_generate.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PHASES=${PHASES:-sweep tests kernels generate serve}
mkdir -p "$OUT"
PARTS=$(mktemp -d)
export PYTHONUNBUFFERED=1
want() { [[ " $PHASES " == *" $1 "* ]]; }
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v -i warning | tail -3
{ date -u +"%Y-%m-%d %H:%M UTC"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "phases: $PHASES"
} | tee "$OUT/gpu_env.txt"
sweep_rc=0 tests_rc=0 kernels_rc=0 bench_rc=0

# First the sweep: the most information per second on the open goals, and its parallel compile
# fills Triton's cache for the phases after it.
if want sweep; then
  SWEEP_BUDGET=${SWEEP_BUDGET:-70}
  # shellcheck disable=SC2086  # SWEEP_ONLY is a list of words
  timeout $((SWEEP_BUDGET + 20)) python3 benchmarks/sweep_tiles.py --budget "$SWEEP_BUDGET" \
    --only ${SWEEP_ONLY:-decode prefill ln_qkv} --out "$PARTS/sweep" 2>&1 \
    | tee -a "$OUT/kernels.log" | grep -E "^(decode|prefill|ln_qkv|compiling| +[0-9]+ done)"
  sweep_rc=${PIPESTATUS[0]}
  # copied even after a timeout: the sweep rewrites its report after every shape
  [ -f "$PARTS/sweep/sweep.json" ] && cp "$PARTS/sweep/sweep.json" "$OUT/sweep.json"
  # the Gluon CUDA tests take the verdicts of the probe the sweep ran instead of probing again
  if [ -f "$OUT/sweep.json" ]; then
    WGMMA_PROBE_VERDICTS=$(realpath "$OUT/sweep.json")
    export WGMMA_PROBE_VERDICTS
  fi
fi

if want tests; then
  # xdist: the suite compiles many kernel specialisations; 8 workers compile them in parallel.
  # shellcheck disable=SC2086  # GPU_TESTS is a list of paths
  timeout "${TESTS_TIMEOUT:-110}" python3 -m pytest -q -p no:cacheprovider -n 8 ${GPU_TESTS:-tests} \
    --deselect tests/kernels/test_compile_check.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  tests_rc=${PIPESTATUS[0]}
fi

if want kernels; then
  # The goals first: decode bandwidth, prefill vs SDPA, fused LN+QKV, sampling at batch 256
  # (KERNEL_BENCHES picks some, e.g. "attention layernorm_linear" for the open goals).
  # shellcheck disable=SC2086  # KERNEL_BENCHES is a list of words
  for name in ${KERNEL_BENCHES:-paged_decode attention layernorm_linear sampling}; do
    timeout "${KERNEL_TIMEOUT:-34}" python3 -m pytest -q -p no:cacheprovider "benchmarks/bench_$name.py" --benchmark-enable \
      --benchmark-json="$PARTS/$name.json" >> "$OUT/kernels.log" 2>&1 || kernels_rc=1
  done
  ls "$PARTS"/*.json >/dev/null 2>&1 && python3 benchmarks/report.py "$OUT/kernels.md" "$PARTS"/*.json \
    --merged-json "$OUT/kernels.json" | tail -70
  # the issue's goals, one verdict each (device time where there is one), after the table
  [ -f "$OUT/kernels.json" ] && { echo; python3 benchmarks/goals.py "$OUT/kernels.json"; } >> "$OUT/kernels.md" \
    && sed -n '/^## Goals/,/^| goal | shape/p' "$OUT/kernels.md"
fi
if [ -f "$PARTS/sweep/sweep.md" ]; then
  if want kernels && [ -s "$OUT/kernels.md" ]; then
    { echo; cat "$PARTS/sweep/sweep.md"; } >> "$OUT/kernels.md"
  else
    cp "$PARTS/sweep/sweep.md" "$OUT/kernels.md"
  fi
fi

if want generate; then
  # shellcheck disable=SC2086  # GENERATE_MODES and GENERATE_ARGS are lists of words
  timeout "${GENERATE_TIMEOUT:-100}" python3 benchmarks/bench_generate.py --sizes opt-125m opt-1.3b \
    --modes ${GENERATE_MODES:-default eager async} ${GENERATE_ARGS:-} --out "$OUT" 2>&1 | tail -12
  bench_rc=${PIPESTATUS[0]}
fi

serve_rc=0
if want serve; then
  # The engine as a server sees it: TTFT/TPOT under load (opt-fast bench, CUDA graphs on), then
  # the host's CPU time per decode step. Both appended to bench_generate.md (8 files at most).
  { echo; echo "## opt-fast bench, OPT-1.3B random weights, 64 prompts x 128 in, 128 out"; echo
    echo '```json'
    timeout 42 python3 -m opt_fast.cli bench --model opt-1.3b --random-weights --num-prompts 64 --input-len 128 \
      --output-len 128 --json 2>&1 | tail -3
    echo '```'; echo; echo "## The same at 32 requests/s (Poisson arrivals: prompts join steps already decoding)"; echo
    echo '```json'
    timeout 45 python3 -m opt_fast.cli bench --model opt-1.3b --random-weights --num-prompts 64 --input-len 128 \
      --output-len 128 --request-rate 32 --json 2>&1 | tail -3
    echo '```'; echo; echo "## Host overhead per decode step (this machine's CPU)"; echo
    timeout 28 python3 benchmarks/bench_host_overhead.py --steps 30 2>&1 | tail -14
    echo; timeout 25 python3 benchmarks/bench_launch_overhead.py --calls 1000 --out "$PARTS" >/dev/null 2>&1
    [ -f "$PARTS/launch_overhead.md" ] && sed 's/^# /## /' "$PARTS/launch_overhead.md"
  } | tee -a "$OUT/bench_generate.md" | tail -35
  serve_rc=${PIPESTATUS[0]}
fi

prefix_rc=0
if want prefix; then
  timeout 60 python3 benchmarks/bench_prefix_caching.py --sizes opt-125m opt-1.3b --out "$PARTS" 2>&1 | tail -6
  prefix_rc=${PIPESTATUS[0]}
  [ -f "$PARTS/bench_prefix_caching.md" ] && { echo; cat "$PARTS/bench_prefix_caching.md"; } >> "$OUT/bench_generate.md"
fi

kvfp8_rc=0
if want kvfp8; then
  # decode at long contexts reads mostly KV cache: float8 halves those bytes
  ( rc=0
    echo; echo "## kv_cache_dtype auto vs fp8: opt-fast bench, OPT-1.3B random weights, 256 prompts x 1024 in, 128 out"
    echo; echo '```json'
    for kv in auto fp8; do
      timeout 70 python3 -m opt_fast.cli bench --model opt-1.3b --random-weights --num-prompts 256 --input-len 1024 \
        --output-len 128 --kv-cache-dtype "$kv" --json 2>&1 | tail -1 || rc=1
    done
    echo '```'
    exit $rc
  ) | tee -a "$OUT/bench_generate.md" | tail -6
  kvfp8_rc=${PIPESTATUS[0]}
fi

profile_rc=0
if want profile; then
  # which kernels hold the time of a whole generate (default and async modes): profile.md only
  timeout 75 python3 benchmarks/profile_generate.py --size opt-1.3b --modes default async --out "$PARTS" 2>&1 | tail -3
  profile_rc=${PIPESTATUS[0]}
  [ -f "$PARTS/profile.md" ] && cp "$PARTS/profile.md" "$OUT/profile.md"
fi

echo "gpu-check ($PHASES): sweep rc=$sweep_rc, tests rc=$tests_rc, kernel benchmarks rc=$kernels_rc, generate rc=$bench_rc, serve rc=$serve_rc, prefix rc=$prefix_rc, kvfp8 rc=$kvfp8_rc, profile rc=$profile_rc"
[ "$sweep_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$kernels_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$serve_rc" -eq 0 ] \
  && [ "$prefix_rc" -eq 0 ] && [ "$kvfp8_rc" -eq 0 ] && [ "$profile_rc" -eq 0 ]
