"""kernels/device.py: the Triton version the kernels need, said at import rather than deep inside."""
import re
from pathlib import Path

import pytest
import triton

from opt_fast.kernels import device


@pytest.mark.parametrize("version", ["3.4.0", "3.5.1", "2.3.1", "3.0.0+git1234abcd"])
def test_older_triton_is_refused_with_the_version_and_the_way_out(version):
    with pytest.raises(ImportError, match=rf"triton >= 3\.6, found triton {re.escape(version)}.*pip install"):
        device.check_triton_version(version)


@pytest.mark.parametrize("version", ["3.6.0", "3.6.0+gitabc", "3.10.1", "4.0.0", triton.__version__])
def test_supported_triton_passes(version):
    # 3.10 sorts before 3.6 as a string: the check compares numbers
    device.check_triton_version(version)


def test_declared_floor_is_the_checked_one():
    """pyproject.toml's triton requirement says what the import check enforces."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    floors = [re.match(r"triton>=([\d.]+)", dep.replace(" ", "")) for dep in project["dependencies"]]
    declared = [tuple(map(int, m.group(1).split("."))) for m in floors if m]
    assert declared == [device.MIN_TRITON]
