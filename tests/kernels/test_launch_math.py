"""kernels/launch_math.py: the launchers' integer helpers agree with Triton's own."""
from __future__ import annotations

import opt_fast.kernels  # noqa: F401  (the interpreter switch, before triton)
import triton

from opt_fast.kernels.launch_math import cdiv, next_pow2


def test_cdiv_and_next_pow2_agree_with_triton():
    for a in range(0, 300):
        assert next_pow2(a) == (1 if a == 0 else triton.next_power_of_2(a)), a
        for b in (1, 2, 3, 16, 32, 127):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
