"""`make compile-check` as a test: every kernel compiles for sm_80 and sm_90 without spills.

Runs in a subprocess with TRITON_INTERPRET=0, because this test process defines its kernels as
interpreted functions, which cannot be compiled ahead of time.
"""
import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "opt_fast.kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " sm_90 " in done.stdout and " sm_80 " in done.stdout
