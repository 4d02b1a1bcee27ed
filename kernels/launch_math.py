"""Integer helpers for the launchers' grid and block sizes.

triton.cdiv and triton.next_power_of_2 are constexpr functions: every call from the host goes
through Triton's wrapper, microseconds each (about two thirds of the KV-write launcher's own
time on the dev box). Launchers run for every layer of every step, so they use these instead.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
