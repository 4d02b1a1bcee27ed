"""The benchmarks' device timing (benchmarks/device_time.py) and what is built from it: the kernel
table (benchmarks/report.py) gives ours against the peer both as synchronised wall time and as
device time, the goal verdicts (benchmarks/goals.py) judge from device time where both sides have
one, and the device time leaves out the host's launch path (CUDA only)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import device_time  # noqa: E402
import goals  # noqa: E402
import report  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _bench(group: str, impl: str, median_s: float, device_us: float | None, **info) -> dict:
    info.update(impl=impl, gbps=1.0, tflops=0.0, bandwidth_fraction=0.1, matmul_fraction=0.0, device="card")
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


def test_goals_judge_each_shape_from_device_time_where_both_sides_have_it():
    benches = [
        # decode: 1 GB in 300 us of device time = 3.33 TB/s, of a 4 TB/s copy: 0.83 (wall: 0.42)
        _bench("paged_decode opt-6.7b b64 ctx1024", "triton", 600e-6, 300.0, bytes=10 ** 9, copy_gbps=4000.0),
        _bench("paged_decode opt-6.7b b64 ctx1024", "sdpa", 250e-6, 240.0),
        _bench("paged_decode opt-1.3b b64 ctx1024", "triton", 1.0, 1.0, bytes=1, copy_gbps=4000.0),  # not the goal's
        # prefill: met on device time (1.0x) where wall says 0.5x; a shape without device time on
        # one side falls back to wall (0.8x)
        _bench("prefill_attention opt-1.3b b8 L1024", "triton", 100e-6, 50.0),
        _bench("prefill_attention opt-1.3b b8 L1024", "sdpa", 50e-6, 50.0),
        _bench("prefill_attention opt-13b b1 L2048", "triton", 100e-6, None),
        _bench("prefill_attention opt-13b b1 L2048", "sdpa", 80e-6, 70.0),
        # LN+QKV: only <= 64 tokens count
        _bench("ln_qkv opt-13b tokens=64", "triton", 60e-6, 40.0),
        _bench("ln_qkv opt-13b tokens=64", "torch", 50e-6, 48.0),
        _bench("ln_qkv opt-13b tokens=256", "triton", 1.0, 1.0),
        _bench("ln_qkv opt-13b tokens=256", "torch", 1e-6, 1e-3),
        _bench("sampling b256 v50272", "triton", 100e-6, 90.0),
        _bench("sampling b256 v50272", "torch_sort", 400e-6, 300.0)]
    judged = goals.judge(dict(benchmarks=benches))
    rows = {(r["goal"], r["shape"]): r for r in judged if r["timing"] != "missing"}
    assert set(rows) == {("paged decode", "paged_decode opt-6.7b b64 ctx1024"),
                         ("prefill attention", "prefill_attention opt-1.3b b8 L1024"),
                         ("prefill attention", "prefill_attention opt-13b b1 L2048"),
                         ("fused LN+QKV", "ln_qkv opt-13b tokens=64"), ("sampling", "sampling b256 v50272")}
    # every other goal shape (27 prefill, 9 LN+QKV) is there too, unmeasured and not met
    missing = [r for r in judged if r["timing"] == "missing"]
    assert len(missing) == 25 + 8 and not any(r["met"] or r["value"] is not None for r in missing)
    decode = rows[("paged decode", "paged_decode opt-6.7b b64 ctx1024")]
    assert decode["value"] == pytest.approx(10 ** 9 / 300e-6 / 1e9 / 4000)
    assert decode["met"] and decode["timing"] == "device"
    prefill = rows[("prefill attention", "prefill_attention opt-1.3b b8 L1024")]
    assert prefill["value"] == pytest.approx(1.0) and prefill["met"] and prefill["timing"] == "device"
    fallback = rows[("prefill attention", "prefill_attention opt-13b b1 L2048")]
    assert fallback["value"] == pytest.approx(0.8) and not fallback["met"] and fallback["timing"] == "wall"
    ln_qkv = rows[("fused LN+QKV", "ln_qkv opt-13b tokens=64")]
    assert ln_qkv["value"] == pytest.approx(1.2) and ln_qkv["met"]
    sampling = rows[("sampling", "sampling b256 v50272")]
    assert sampling["value"] == pytest.approx(300 / 90) and sampling["met"]
    text = goals.markdown(judged, "card")
    assert ("| prefill attention | >= 0.9x SDPA | 1 / 27 (25 not measured) | prefill_attention opt-13b b1 L2048 | "
            "0.80 (wall) |") in text
    assert "| fused LN+QKV | ln_qkv opt-1.3b tokens=1 | - | no | missing |" in text


def test_a_goal_shape_with_one_side_missing_is_not_met():
    """A shape whose peer (or ours) did not run, e.g. skipped for memory, is not met: a run that
    lost its slow shapes must not read as every shape met."""
    group = "prefill_attention opt-1.3b b1 L128"
    alone = [_bench(group, "triton", 10e-6, 5.0)]
    row = next(r for r in goals.judge(dict(benchmarks=alone)) if r["shape"] == group)
    assert row["timing"] == "missing" and not row["met"]
    both = alone + [_bench(group, "sdpa", 20e-6, 10.0)]
    row = next(r for r in goals.judge(dict(benchmarks=both)) if r["shape"] == group)
    assert row["timing"] == "device" and row["value"] == pytest.approx(2.0) and row["met"]


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


def test_copy_bandwidth_is_the_faster_copy_counting_bytes_read_and_written():
    """Both copies copy (their timer runs them), and the faster one's time gives the ceiling:
    2 x 1 MiB moved in 0.5 us is 4194 GB/s, whichever form was faster."""
    for times in ((1.0, 0.5), (0.5, 1.0)):
        calls = []

        def time_us(fn, times=times):
            fn()
            calls.append(fn)
            return times[len(calls) - 1]
        gbps = device_time.copy_gbps("cpu", nbytes=1 << 20, time_us=time_us)
        assert len(calls) == 2 and gbps == pytest.approx(2 * (1 << 20) / 0.5 / 1e3)
    copied = []

    def checking(fn):
        dst = fn()     # copy_ and add(out=) both return the destination
        copied.append(dst.clone())
        return 1.0
    device_time.copy_gbps("cpu", nbytes=4096, time_us=checking)
    assert len(copied) == 2 and torch.equal(copied[0], copied[1]) and copied[0].isfinite().all()


@cuda
def test_copy_bandwidth_runs_on_the_gpu():
    assert 100 < device_time.copy_gbps(nbytes=1 << 28) < 50_000
