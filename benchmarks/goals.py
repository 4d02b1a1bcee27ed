"""The Triton-kernel speed goals (issue 3) read off a kernel benchmark run: one verdict per goal.

Reads the merged pytest-benchmark JSON that `benchmarks/report.py --merged-json` writes and
judges each goal at every shape it covers, from device time (CUDA graph replays,
benchmarks/device_time.py) where both sides have one, else from the synchronised wall time;
each row says which. Usage: python benchmarks/goals.py KERNELS.json [OUT.md]
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

from report import device_name, grouped   # benchmarks/, beside this script


@dataclass(frozen=True)
class Goal:
    name: str
    groups: str          # regex over benchmark group names: the shapes the goal covers
    peer: str | None     # the peer's impl name; None: a bandwidth goal on ours alone
    target: float        # speedup (peer time / ours) or fraction of the copy bandwidth
    text: str


GOALS = (
    Goal("paged decode", r"paged_decode opt-6\.7b b64 ctx1024$", None, 0.70,
         ">= 70% of the measured copy bandwidth at OPT-6.7B, batch 64, context 1024"),
    Goal("prefill attention", r"prefill_attention \S+ b\d+ L\d+$", "sdpa", 0.90, ">= 0.9x SDPA"),
    Goal("fused LN+QKV", r"ln_qkv .* tokens=([1-9]|[1-5][0-9]|6[0-4])$", "torch", 1.10,
         ">= 1.1x F.layer_norm + F.linear at <= 64 tokens"),
    Goal("sampling", r"sampling b256 v50272$", "torch_sort", 3.00,
         ">= 3x sort-based top-k/top-p + multinomial at batch 256 over 50272 ids"),
)


def _seconds(bench: dict, device: bool) -> float:
    return bench["extra_info"]["device_us"] * 1e-6 if device else bench["stats"]["median"]


def _has_device_time(*benches: dict) -> bool:
    return all(b["extra_info"].get("device_us") for b in benches)


def judge(data: dict) -> list[dict]:
    """One row per goal and shape: value, target, met, and the timing it came from."""
    rows = []
    for goal in GOALS:
        for group, impls in grouped(data).items():
            ours = impls.get("triton")
            if not re.search(goal.groups, group) or ours is None:
                continue
            if goal.peer is None:
                device = _has_device_time(ours)
                copy = ours["extra_info"].get("copy_gbps")
                if not copy:
                    continue
                value = ours["extra_info"]["bytes"] / _seconds(ours, device) / 1e9 / copy
            else:
                peer = impls.get(goal.peer)
                if peer is None:
                    continue
                device = _has_device_time(ours, peer)
                value = _seconds(peer, device) / _seconds(ours, device)
            rows.append(dict(goal=goal.name, shape=group, value=value, target=goal.target,
                             met=value >= goal.target, timing="device" if device else "wall"))
    return rows


def markdown(rows: list[dict], device_name: str = "?") -> str:
    lines = [f"## Goals (issue 3) — {device_name}", "",
             "`device`: device time from CUDA graph replays; `wall`: a call and a synchronise (where a "
             "side has no device time). Speedups are peer time / ours; decode is a fraction of the "
             "measured copy bandwidth.", "",
             "| goal | target | shapes met | worst shape | worst value |", "| --- | --- | --- | --- | --- |"]
    for goal in GOALS:
        mine = [r for r in rows if r["goal"] == goal.name]
        if not mine:
            lines.append(f"| {goal.name} | {goal.text} | not measured | - | - |")
            continue
        worst = min(mine, key=lambda r: r["value"])
        lines.append(f"| {goal.name} | {goal.text} | {sum(r['met'] for r in mine)} / {len(mine)} | "
                     f"{worst['shape']} | {worst['value']:.2f} ({worst['timing']}) |")
    lines += ["", "| goal | shape | value | met | timing |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['goal']} | {r['shape']} | {r['value']:.2f} | {'yes' if r['met'] else 'no'} | {r['timing']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(source: str, target: str | None = None) -> str:
    data = json.loads(open(source).read())
    text = markdown(judge(data), device_name(data))
    if target:
        open(target, "w").write(text)
    print(text)
    return text


if __name__ == "__main__":
    main(*sys.argv[1:3])
