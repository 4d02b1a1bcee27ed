"""Fixtures of the kernel tests (their helpers are in kernel_testing.py)."""
from __future__ import annotations

import pytest

from kernel_testing import fill_empty


@pytest.fixture
def nan_empty(monkeypatch):
    """An output element the kernel never writes shows up as NaN."""
    fill_empty(monkeypatch, float("nan"))
