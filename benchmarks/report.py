"""Turn pytest-benchmark JSON files into one markdown table: each kernel beside its torch peer.

Benchmarks put the same `group` on ours and the peer for one shape, and `impl` in extra_info
("triton" for ours, anything else for a peer).
Usage: python benchmarks/report.py OUT.md [--merged-json OUT.json] RESULTS.json [RESULTS.json ...]
"""
from __future__ import annotations

import json
from collections import defaultdict


def grouped(data: dict) -> dict[str, dict[str, dict]]:
    """A pytest-benchmark run's benchmarks as group (one shape) -> impl -> benchmark."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]][bench["extra_info"].get("impl", bench["name"])] = bench
    return groups


def device_name(data: dict) -> str:
    """The device a run's benchmarks name ("?" for an empty run)."""
    return data["benchmarks"][0]["extra_info"].get("device", "?") if data["benchmarks"] else "?"


def main(target: str, sources: list[str], merged_json: str | None = None) -> None:
    data = None
    for source in sources:
        part = json.loads(open(source).read())
        if data is None:
            data = part
        else:
            data["benchmarks"] += part["benchmarks"]
    if merged_json:
        open(merged_json, "w").write(json.dumps(data, indent=1))
    groups = grouped(data)
    machine = data.get("machine_info", {})
    device = device_name(data)
    lines = [f"# Kernel benchmarks — {device}, {data.get('datetime', '')[:16]}", "",
             f"host CPU: {machine.get('cpu', {}).get('brand_raw', '?')}", "",
             "`median us` is the wall time of a call and a synchronise (the host's launch path included); "
             "`device us` is the device time of a call from CUDA graph replays with L2 flushed before it "
             "(benchmarks/device_time.py; `-` where the call cannot be captured), what a decode step "
             "replaying graphs pays. GB/s, TFLOP/s and the fractions are of the median.", "",
             "| group | impl | median us | GB/s | TFLOP/s | of copy BW | of matmul | ours / peer speedup "
             "| device us | device GB/s | device speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for group, impls in groups.items():
        ours = impls.get("triton")
        for impl, bench in impls.items():
            info, median = bench["extra_info"], bench["stats"]["median"]
            peer_row = ours and impl != "triton"
            ratio = f"{median / ours['stats']['median']:.2f}x" if peer_row else ""
            device_us = info.get("device_us")
            ours_device_us = ours["extra_info"].get("device_us") if ours else None
            device_ratio = f"{device_us / ours_device_us:.2f}x" if peer_row and device_us and ours_device_us else ""
            device = (f"{device_us:.1f} | {info['device_gbps']:.0f}" if device_us else "- | -")
            lines.append(f"| {group} | {impl} | {median * 1e6:.1f} | {info.get('gbps', 0):.0f} | "
                         f"{info.get('tflops', 0):.1f} | {info.get('bandwidth_fraction', 0):.0%} | "
                         f"{info.get('matmul_fraction', 0):.0%} | {ratio} | {device} | {device_ratio} |")
    open(target, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--merged-json")
    args = parser.parse_args()
    main(args.target, args.sources, args.merged_json)
