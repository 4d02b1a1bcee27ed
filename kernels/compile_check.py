"""Ahead-of-time compile of every Triton kernel for real GPUs, with no GPU needed.

Each kernel module lists its specialisations in `compile_specs()`; this compiles each one for
its targets (sm_80 and sm_90, or sm_90 alone) with the ptxas inside the triton wheel, reads
registers and stack (spills) with its cuobjdump, checks that GEMM-like kernels use tensor-core
instructions, that TMA loads became bulk tensor copies, that loops marked warp_specialize were
split into producer and consumer, and that programmatic dependent launches touch no memory but
L2 prefetches before their griddepcontrol.wait. Run with `python -m opt_fast.kernels.compile_check`
(or `make compile-check`); exits non-zero on any compile error or spill, more shared memory than
one block may have on the target (a launch there would fail), more registers than a spec's cap
(max_registers, ptxas's maxnreg), a GEMM-like kernel without `mma` /
`wgmma`, TMA loads without them, a warp-specialised loop left whole, or a memory access before
the wait. `--covering` compiles a subset that still shows every kernel on each target with every
word of the specialisation labels and every pair of them (the CI test runs that).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .device import SHARED_LIMITS

TARGETS = ((80, "sm_80"), (90, "sm_90"))
# PTX that reads or writes global memory (any load or store but parameter, shared, local and
# constant ones; async and bulk copies; atomics and reductions). An L2 prefetch is not one. The
# check scans the PTX text before the first griddepcontrol.wait: text order, not control flow,
# and a qualified form such as ld.volatile.shared counts too, so it errs towards failing.
_MEMORY_ACCESS = re.compile(r"(?<![.\w])(?:(?:ld|st|atom|red)\.(?!param|shared|local|const)|cp\.(?:async|reduce))")


@dataclass
class CompileSpec:
    """One specialisation of one kernel: argument types by name, e.g. {"x_ptr": "*fp16",
    "n": "i32", "BLOCK": "constexpr"}, and the constexpr values by name."""
    kernel: object
    label: str
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    uses_mma: bool = False            # a GEMM-like kernel: must use tensor cores
    uses_tma: bool = False            # loads through TMA descriptors: must emit bulk tensor copies
    # A programmatic dependent launch: until its griddepcontrol.wait the launch before may still
    # run, so no memory access may come first (L2 prefetches of data nobody writes may).
    dependent_launch: bool = False
    # A loop marked warp_specialize: Triton must have split it into producer and consumer
    # partitions (it drops the mark silently where it cannot).
    uses_warp_specialize: bool = False
    # Integer arguments the JIT would see as multiples of 16 (strides of hidden-sized rows, ...).
    # Pointers are always marked 16-byte aligned, as the JIT marks torch's allocations.
    divisible_by_16: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    max_registers: int = 0            # ptxas's cap per thread (maxnreg); 0: none
    # Compute capabilities to build for: a launch configuration that only one architecture's
    # heuristics pick (sm_90-only attention tiles) is checked only there.
    targets: tuple[int, ...] = tuple(capability for capability, _ in TARGETS)


@dataclass
class CompileResult:
    kernel: str
    label: str
    target: str
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    tensor_cores: str = "-"
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0


def _cuobjdump() -> str:
    import triton
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not found:
        raise RuntimeError("cuobjdump not found inside the triton wheel")
    return found[0]


def compile_spec(spec: CompileSpec, capability: int):
    """Triton's compiled kernel for `spec` on sm_<capability> (its .asm holds ttgir, ptx and
    cubin); raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource
    arg_names = spec.kernel.arg_names
    attrs = {(arg_names.index(arg),): [["tt.divisibility", 16]] for arg, kind in spec.signature.items()
             if kind.startswith("*") or arg in spec.divisible_by_16}
    # Gluon kernels (kernels/attention_wgmma.py) start from their own front end
    source_type = GluonASTSource if getattr(spec.kernel, "is_gluon", lambda: False)() else ASTSource
    source = source_type(spec.kernel, spec.signature, spec.constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                   "maxnreg": spec.max_registers or None})


def compile_one(spec: CompileSpec, capability: int, target_name: str) -> CompileResult:
    result = CompileResult(kernel_name(spec), spec.label, target_name)
    try:
        compiled = compile_spec(spec, capability)
    except Exception as err:  # a compile error is a finding, reported in the table
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"
        return result
    result.shared_bytes = compiled.metadata.shared
    if result.shared_bytes > SHARED_LIMITS[capability]:
        result.error = f"{result.shared_bytes} B of shared memory > {SHARED_LIMITS[capability]} B on {target_name}"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    result.registers = int(regs.group(1)) if regs else -1
    result.spill_bytes = int(stack.group(1)) if stack else -1
    if spec.max_registers and result.registers > spec.max_registers:
        result.error = result.error or f"{result.registers} registers past the cap of {spec.max_registers}"
    ptx = compiled.asm["ptx"]
    found = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    result.tensor_cores = found
    if spec.uses_mma and found == "none":
        result.error = result.error or "GEMM-like kernel without tensor-core instructions"
    if spec.uses_tma and "cp.async.bulk.tensor" not in ptx:
        result.error = result.error or "TMA loads compiled to something else than bulk tensor copies"
    if spec.uses_warp_specialize and "ttg.warp_specialize" not in compiled.asm["ttgir"]:
        result.error = result.error or "loop marked warp_specialize was not warp-specialised"
    if spec.dependent_launch:
        wait = ptx.find("griddepcontrol.wait")
        early = _MEMORY_ACCESS.search(ptx, 0, wait if wait >= 0 else len(ptx))
        if wait < 0 or early:
            found = early.group(0) if early else "no griddepcontrol.wait"
            result.error = result.error or f"memory access before the dependent launch's wait: {found}"
    return result


def all_specs() -> list[CompileSpec]:
    from . import (attention, attention_wgmma, attention_wgmma_persistent, attention_wgmma_ws, kv_cache,
                   layernorm_linear, paged_decode, sampling)
    specs = []
    for module in (layernorm_linear, kv_cache, attention, attention_wgmma, attention_wgmma_ws,
                   attention_wgmma_persistent, paged_decode, sampling):
        if hasattr(module, "compile_specs"):
            specs += module.compile_specs()
    return specs


Job = tuple[CompileSpec, int, str]      # a spec, a compute capability, its target name
_JOBS: list[Job] = []


def _compile_job(index: int) -> CompileResult:
    return compile_one(*_JOBS[index])


def every_job(specs: list[CompileSpec]) -> list[Job]:
    """Each spec on each of its targets."""
    return [(spec, cap, name) for spec in specs for cap, name in TARGETS if cap in spec.targets]


def kernel_name(spec: CompileSpec) -> str:
    """The kernel's function name (Triton and Gluon kernels keep it in different places)."""
    return getattr(spec.kernel, "__name__", None) or spec.kernel.fn.__name__


def job_traits(job: Job) -> set[tuple]:
    """What a job exercises: each word of its label (dtype, head size, tiles, warps and stages,
    flags such as tma or pdl-wait) and each pair of words, per kernel and target."""
    spec, cap, _ = job
    words = spec.label.split()
    kernel = kernel_name(spec)
    return ({(kernel, cap, word) for word in words}
            | {(kernel, cap, a, b) for i, a in enumerate(words) for b in words[i + 1:]})


def covering_jobs(jobs: list[Job]) -> list[Job]:
    """A subset of `jobs` in which every trait of every job still appears (greedy set cover, in
    a fixed order): each kernel on each target, with every label word and every pair of them,
    in about a fifth of the compiles. The CI test runs this; `make compile-check` runs all."""
    traits = [job_traits(job) for job in jobs]
    uncovered = set().union(*traits) if traits else set()
    chosen = []
    while uncovered:
        best = max(range(len(jobs)), key=lambda i: len(traits[i] & uncovered))
        chosen.append(jobs[best])
        uncovered -= traits[best]
    return chosen


def run(specs: list[CompileSpec] | None = None, covering: bool = False) -> list[CompileResult]:
    """Compile every spec for every target (or, with `covering`, the covering_jobs subset), one
    process per core (each compile is single-threaded)."""
    import multiprocessing
    jobs = every_job(all_specs() if specs is None else specs)
    _JOBS[:] = covering_jobs(jobs) if covering else jobs
    # fork: the children inherit the kernel objects, which do not pickle.
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        return pool.map(_compile_job, range(len(_JOBS)), chunksize=4)


def format_table(results: list[CompileResult]) -> str:
    header = (f"{'kernel':<34} {'specialisation':<40} {'target':<6} {'regs':>4} {'spill':>5} {'smem':>7} "
              f"{'tc':<5} status")
    lines = [header, "-" * len(header)]
    for r in results:
        status = "ok" if r.ok else (r.error or f"SPILLS {r.spill_bytes} B")
        lines.append(f"{r.kernel:<34} {r.label:<40} {r.target:<6} {r.registers:>4} {r.spill_bytes:>5} "
                     f"{r.shared_bytes:>7} {r.tensor_cores:<5} {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Compile every Triton kernel for sm_80 and sm_90.")
    parser.add_argument("--covering", action="store_true",
                        help="compile only a subset that still shows every label word and pair of "
                             "words of each kernel on each target (the CI test's quicker run)")
    results = run(covering=parser.parse_args(argv).covering)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiles, {len(bad)} failing")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
