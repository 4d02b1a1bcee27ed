"""Turn pytest-benchmark JSON files into one markdown table: each kernel beside its torch peer.

Benchmarks put the same `group` on ours and the peer for one shape, and `impl` in extra_info
("triton" for ours, anything else for a peer).
Usage: python benchmarks/report.py OUT.md [--merged-json OUT.json] RESULTS.json [RESULTS.json ...]
"""
from __future__ import annotations

import json
from collections import defaultdict


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
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]][bench["extra_info"].get("impl", bench["name"])] = bench
    machine = data.get("machine_info", {})
    device = data["benchmarks"][0]["extra_info"].get("device", "?") if data["benchmarks"] else "?"
    lines = [f"# Kernel benchmarks — {device}, {data.get('datetime', '')[:16]}", "",
             f"host CPU: {machine.get('cpu', {}).get('brand_raw', '?')}", "",
             "| group | impl | median us | GB/s | TFLOP/s | of copy BW | of matmul | ours / peer speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for group, impls in groups.items():
        ours = impls.get("triton")
        for impl, bench in impls.items():
            info, median = bench["extra_info"], bench["stats"]["median"]
            ratio = f"{median / ours['stats']['median']:.2f}x" if ours and impl != "triton" else ""
            lines.append(f"| {group} | {impl} | {median * 1e6:.1f} | {info.get('gbps', 0):.0f} | "
                         f"{info.get('tflops', 0):.1f} | {info.get('bandwidth_fraction', 0):.0%} | "
                         f"{info.get('matmul_fraction', 0):.0%} | {ratio} |")
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
