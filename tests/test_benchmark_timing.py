"""The benchmarks' device timing (benchmarks/device_time.py) and the kernel table built from it
(benchmarks/report.py): the table gives ours against the peer both as synchronised wall time and
as device time, and the device time leaves out the host's launch path (CUDA only)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import device_time  # noqa: E402
import report  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _bench(group: str, impl: str, median_s: float, device_us: float | None) -> dict:
    info = dict(impl=impl, gbps=1.0, tflops=0.0, bandwidth_fraction=0.1, matmul_fraction=0.0, device="card")
    if device_us is not None:
        info.update(device_us=device_us, device_gbps=1e3 / device_us)
    return dict(name=f"{group}-{impl}", group=group, stats=dict(median=median_s), extra_info=info)


def test_report_gives_the_wall_and_the_device_speedups_of_each_peer(tmp_path):
    data = dict(datetime="2026-11-27T05:00:00", machine_info={}, benchmarks=[
        _bench("ln_qkv 1 token", "triton", 60e-6, 12.0),
        _bench("ln_qkv 1 token", "torch", 30e-6, 18.0),
        _bench("sample b256", "triton", 40e-6, None),     # not capturable: no device columns
        _bench("sample b256", "torch", 80e-6, 50.0)])
    source = tmp_path / "kernels.json"
    source.write_text(json.dumps(data))
    report.main(str(tmp_path / "kernels.md"), [str(source)])
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): [cell.strip() for cell in line.split("|")[3:-1]]
            for line in (tmp_path / "kernels.md").read_text().splitlines() if line.startswith("| ln_qkv")
            or line.startswith("| sample")}
    # wall: peer 30 / ours 60 = 0.50x; device: peer 18 / ours 12 = 1.50x
    assert rows[("ln_qkv 1 token", "torch")][5] == "0.50x"
    assert rows[("ln_qkv 1 token", "torch")][6:] == ["18.0", "56", "1.50x"]
    assert rows[("ln_qkv 1 token", "triton")][6:] == ["12.0", "83", ""]
    assert rows[("sample b256", "torch")][5] == "2.00x"
    assert rows[("sample b256", "torch")][8] == ""       # ours has no device time to divide by
    assert rows[("sample b256", "triton")][6:] == ["-", "-", ""]


def test_off_cuda_there_is_no_device_time():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert device_time.try_graph_us(lambda: None) is None


@cuda
def test_device_time_follows_the_work_and_not_the_launches():
    """A call of 50 one-element launches is mostly host time: synchronised it takes far longer
    than its device time. Device work that sleeps twice as long times about twice as long."""
    one = torch.zeros(1, device="cuda")

    def many_launches():
        for _ in range(50):
            one.add_(1)
    device_us = device_time.graph_us(many_launches)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        many_launches()
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    synced_us = start.elapsed_time(end) * 1e3 / 20
    assert 0 < device_us < synced_us
    short = device_time.graph_us(lambda: torch.cuda._sleep(200_000))
    long = device_time.graph_us(lambda: torch.cuda._sleep(400_000))
    assert 1.6 < long / short < 2.4, (short, long)


@cuda
def test_a_call_that_synchronises_is_not_captured():
    """It times as None, and leaves the process as it was: on its own stream, able to capture."""
    one = torch.zeros(1, device="cuda")
    stream = torch.cuda.current_stream()
    assert device_time.try_graph_us(lambda: one.add_(1).item()) is None
    assert torch.cuda.current_stream() == stream
    assert device_time.try_graph_us(lambda: one.add_(1)) > 0
