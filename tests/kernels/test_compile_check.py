"""`make compile-check` as a test: every kernel compiles for sm_80 and sm_90 without spills.

Runs in a subprocess with TRITON_INTERPRET=0, because this test process defines its kernels as
interpreted functions, which cannot be compiled ahead of time. The test compiles the covering
subset (every kernel on each target with every label word and pair of words; a cold cache makes
the whole set of ~2000 compiles take over 20 minutes on two cores); `make compile-check` all.
"""
import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "opt_fast.kernels.compile_check", "--covering"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " sm_90 " in done.stdout and " sm_80 " in done.stdout


def test_the_covering_subset_keeps_every_kernel_target_and_label_word():
    """The subset the test above compiles: smaller than the whole, and every kernel, target,
    label word (dtype, head size, tiles, flags) and pair of words of the whole set is in it."""
    script = (
        "from opt_fast.kernels import compile_check as cc\n"
        "jobs = cc.every_job(cc.all_specs())\n"
        "subset = cc.covering_jobs(jobs)\n"
        "whole = set().union(*map(cc.job_traits, jobs))\n"
        "kept = set().union(*map(cc.job_traits, subset))\n"
        "kernels = lambda js: {(cc.kernel_name(s), cap) for s, cap, _ in js}\n"
        "print(len(subset) < len(jobs) / 3, kept == whole, kernels(subset) == kernels(jobs),\n"
        "      all(j in jobs for j in subset))\n")
    output = _run_outside_interpreter(script)
    assert output.split() == ["True"] * 4, output


def _passes_and_fails(setup: str, passing: str, failing: str) -> tuple[str, str, str]:
    """Compiles for sm_90, after the `setup` lines, the spec expressions `passing` and `failing`;
    returns their verdicts ("True" / "False") and the second one's error."""
    script = (setup + f"good = cc.compile_one({passing}, 90, 'sm_90')\n"
              f"bad = cc.compile_one({failing}, 90, 'sm_90')\nprint(good.ok, bad.ok, bad.error)\n")
    return tuple(_compiled_verdicts(script))


def _compiled_verdicts(script: str) -> list[str]:
    """Runs a compile-check script (printing two verdicts and an error) outside the interpreter."""
    return _run_outside_interpreter(script).strip().split(" ", 2)


def _run_outside_interpreter(script: str) -> str:
    """The standard output of a Python script run with TRITON_INTERPRET=0 (so it can compile)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_shared_memory_beyond_a_blocks_limit_is_a_failure():
    """A specialisation needing more shared memory than the target's limit is reported as failing
    (the limit is lowered here, so that a real tile of the prefill kernel exceeds it)."""
    script = (
        "from opt_fast.kernels import attention, compile_check as cc\n"
        "spec = attention.compile_specs()[0]\n"
        "fits = cc.compile_one(spec, 90, 'sm_90')\n"
        "cc.SHARED_LIMITS[90] = fits.shared_bytes - 1\n"
        "over = cc.compile_one(spec, 90, 'sm_90')\n"
        "print(fits.ok, over.ok, over.error)\n")
    fits_ok, over_ok, error = _compiled_verdicts(script)
    assert fits_ok == "True" and over_ok == "False" and "shared memory" in error


def test_tma_specs_are_checked_for_bulk_tensor_copies():
    """The prefill kernel's TMA twin compiles to bulk tensor copies; the same check on a pointer-
    load specialisation (marked as if it used TMA) reports a failure."""
    verdicts = _passes_and_fails(
        "import dataclasses\n"
        "from opt_fast.kernels import attention, compile_check as cc\n"
        "specs = attention.compile_specs()\n"
        "tma = next(s for s in specs if s.uses_tma and 'sweep d64 fp16' in s.label)\n"
        "plain = next(s for s in specs if not s.uses_tma and 'narrow d64 fp16 bs16' in s.label)\n",
        "tma", "dataclasses.replace(plain, uses_tma=True)")
    assert verdicts[:2] == ("True", "False") and "bulk tensor copies" in verdicts[2]


def test_what_each_spec_must_show_follows_its_variant():
    """The checks a spec asks for (bulk copies, nothing before the wait) follow the variant it
    builds: a spec that stopped asking would only make the compile check weaker, unnoticed."""
    from opt_fast.kernels import attention, attention_persistent, attention_ws, layernorm_linear as ll
    specs = ll.compile_specs()
    for spec in specs:
        if "USE_TMA" in spec.constexprs:
            assert spec.uses_tma == spec.constexprs["USE_TMA"], spec.label
        if "PDL_WAIT" in spec.constexprs:
            assert spec.dependent_launch == spec.constexprs["PDL_WAIT"], spec.label
    assert any(s.uses_tma for s in specs) and any(s.dependent_launch for s in specs)
    assert any(s.dependent_launch and s.kernel is ll._split_k_reduce_kernel for s in specs)
    always_tma = {attention_ws._prefill_attention_ws_kernel: True,
                  attention_persistent._prefill_persistent_kernel: False}
    for spec in attention.compile_specs():
        # (the warp-specialised kernel always loads by TMA, the persistent one never: no USE_TMA there)
        assert spec.uses_tma == spec.constexprs.get("USE_TMA", always_tma.get(spec.kernel)), spec.label


def test_q_smem_keeps_q_in_shared_memory_and_register_caps_reach_ptxas():
    """The point of Tiles.q_smem and max_registers, in the compiled code: the QK^T wgmma of a
    q_smem candidate reads q from shared memory, where its twin with the 3-D box reads it from
    registers; the capped candidate (with its context loops and the cache write, as the engine
    would launch it) compiles within its cap and no spill, and the same tiles uncapped take more
    registers (so the cap is what lets two programs share an SM)."""
    script = (
        "import dataclasses, re\n"
        "from opt_fast.kernels import attention, compile_check as cc\n"
        "spec = next(s for s in attention.compile_specs() if s.max_registers and 'd128 fp16' in s.label\n"
        "            and 'q-smem' in s.label and 'no-ctx' not in s.label)\n"
        "box = dict(spec.signature, q_desc=spec.signature['q_desc'].replace(',128]', ',1,128]'))\n"
        "twin = dataclasses.replace(spec, signature=box, constexprs=dict(spec.constexprs, Q_2D=False))\n"
        "def q_operand(s):\n"
        "    ttgir = cc.compile_spec(s, 90).asm['ttgir']\n"
        "    first = re.search(r'warp_group_dot %\\S+, %\\S+, %\\S+[^:]*: (\\S+)', ttgir).group(1)\n"
        "    return 'shared' if first.startswith('!ttg.memdesc') else 'registers'\n"
        "capped = cc.compile_one(spec, 90, 'sm_90')\n"
        "free = cc.compile_one(dataclasses.replace(spec, max_registers=0), 90, 'sm_90')\n"
        "print(q_operand(spec), q_operand(twin), capped.ok, capped.registers <= spec.max_registers < free.registers)\n")
    output = _run_outside_interpreter(script)
    assert output.split() == ["shared", "registers", "True", "True"], output


def test_dependent_launch_reading_before_its_wait_is_a_failure(tmp_path):
    """A programmatic dependent launch (dependent_launch) passes only if it touches no memory before
    griddepcontrol.wait but L2 prefetches: the same kernel with the wait before and after its
    load, and the fused GEMM's own PDL variant."""
    (tmp_path / "pdl_probe.py").write_text(
        "import triton\n"
        "import triton.language as tl\n"
        "from triton.language.extra.cuda import gdc_wait\n\n\n"
        "@triton.jit\n"
        "def probe(x_ptr, out_ptr, WAIT_FIRST: tl.constexpr):\n"
        "    if WAIT_FIRST:\n"
        "        gdc_wait()\n"
        "    x = tl.load(x_ptr + tl.arange(0, 128))\n"
        "    if not WAIT_FIRST:\n"
        "        gdc_wait()\n"
        "    tl.store(out_ptr + tl.arange(0, 128), x)\n")
    verdicts = _passes_and_fails(
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from pdl_probe import probe\n"
        "from opt_fast.kernels import compile_check as cc, layernorm_linear as ll\n"
        "def spec(wait_first):\n"
        "    return cc.CompileSpec(probe, 'probe', dict(x_ptr='*fp16', out_ptr='*fp16', WAIT_FIRST='constexpr'),\n"
        "                          dict(WAIT_FIRST=wait_first), dependent_launch=True, targets=(90,))\n"
        "gemm = next(s for s in ll.compile_specs() if s.dependent_launch and 'fp16' in s.label and 'stats' in s.label)\n"
        "assert cc.compile_one(gemm, 90, 'sm_90').ok, gemm.label\n",
        "spec(True)", "spec(False)")
    assert verdicts[:2] == ("True", "False") and "before the dependent launch's wait" in verdicts[2]


def test_warp_specialized_specs_are_checked_for_the_split():
    """The warp-specialised prefill kernel compiles to producer and consumer partitions at its
    candidate tiles; at a tile where Triton leaves the loop whole (32 query rows), the check
    fails."""
    verdicts = _passes_and_fails(
        "from opt_fast.kernels import attention, attention_ws, compile_check as cc\n"
        "from opt_fast.kernels.attention import Tiles\n",
        "attention_ws.compile_spec('fp16', 128, attention.WS_CANDIDATES[128][0], True)",
        "attention_ws.compile_spec('fp16', 64, Tiles(32, 16, 4, 2, warp_specialize=True), True)")
    assert verdicts[:2] == ("True", "False") and "not warp-specialised" in verdicts[2]
