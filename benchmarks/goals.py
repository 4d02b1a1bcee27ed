"""The Triton-kernel speed goals (issue 3) read off a kernel benchmark run: one verdict per goal.

Reads the merged pytest-benchmark JSON that `benchmarks/report.py --merged-json` writes and
judges each goal at every shape it names, from device time (CUDA graph replays,
benchmarks/device_time.py) where both sides have one, else from the synchronised wall time;
each row says which. A shape the run did not measure on both sides counts as not met (a goal
is met at every shape, not at the shapes that happened to run). Usage:
python benchmarks/goals.py KERNELS.json [OUT.md]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from report import device_name, grouped   # benchmarks/, beside this script

SIZES = ("opt-1.3b", "opt-6.7b", "opt-13b")     # the issue's goal shapes: these models' heads and widths


@dataclass(frozen=True)
class Goal:
    name: str
    shapes: tuple[str, ...]   # the benchmark groups the goal covers, every one of which must meet it
    peer: str | None          # the peer's impl name; None: a bandwidth goal on ours alone
    target: float             # speedup (peer time / ours) or fraction of the copy bandwidth
    text: str


GOALS = (
    Goal("paged decode", ("paged_decode opt-6.7b b64 ctx1024",), None, 0.70,
         ">= 70% of the measured copy bandwidth at OPT-6.7B, batch 64, context 1024"),
    Goal("prefill attention", tuple(f"prefill_attention {size} b{batch} L{length}" for size in SIZES
                                    for batch in (1, 8, 64) for length in (128, 1024, 2048)),
         "sdpa", 0.90, ">= 0.9x SDPA"),
    Goal("fused LN+QKV", tuple(f"ln_qkv {size} tokens={tokens}" for size in SIZES for tokens in (1, 8, 64)),
         "torch", 1.10, ">= 1.1x F.layer_norm + F.linear at <= 64 tokens"),
    Goal("sampling", ("sampling b256 v50272",), "torch_sort", 3.00,
         ">= 3x sort-based top-k/top-p + multinomial at batch 256 over 50272 ids"),
)


def _seconds(bench: dict, device: bool) -> float:
    return bench["extra_info"]["device_us"] * 1e-6 if device else bench["stats"]["median"]


def _has_device_time(*benches: dict) -> bool:
    return all(b["extra_info"].get("device_us") for b in benches)


def judge(data: dict) -> list[dict]:
    """One row per goal and shape: value, target, met, and the timing it came from ("missing",
    value None, where the run lacks our row, the peer's or the copy bandwidth)."""
    rows = []
    measured = grouped(data)
    for goal in GOALS:
        for shape in goal.shapes:
            impls = measured.get(shape, {})
            ours, value, device = impls.get("triton"), None, False
            if ours is not None and goal.peer is None:
                copy = ours["extra_info"].get("copy_gbps")
                if copy:
                    device = _has_device_time(ours)
                    value = ours["extra_info"]["bytes"] / _seconds(ours, device) / 1e9 / copy
            elif ours is not None and impls.get(goal.peer) is not None:
                peer = impls[goal.peer]
                device = _has_device_time(ours, peer)
                value = _seconds(peer, device) / _seconds(ours, device)
            timing = "missing" if value is None else "device" if device else "wall"
            rows.append(dict(goal=goal.name, shape=shape, value=value, target=goal.target,
                             met=value is not None and value >= goal.target, timing=timing))
    return rows


def markdown(rows: list[dict], device_name: str = "?") -> str:
    lines = [f"## Goals (issue 3) — {device_name}", "",
             "`device`: device time from CUDA graph replays; `wall`: a call and a synchronise (where a "
             "side has no device time). Speedups are peer time / ours; decode is a fraction of the "
             "measured copy bandwidth.", "",
             "| goal | target | shapes met | worst shape | worst value |", "| --- | --- | --- | --- | --- |"]
    for goal in GOALS:
        mine = [r for r in rows if r["goal"] == goal.name]
        timed = [r for r in mine if r["value"] is not None]
        missing = len(mine) - len(timed)
        met = f"{sum(r['met'] for r in mine)} / {len(mine)}" + (f" ({missing} not measured)" if missing else "")
        if not timed:
            lines.append(f"| {goal.name} | {goal.text} | {met} | - | - |")
            continue
        worst = min(timed, key=lambda r: r["value"])
        lines.append(f"| {goal.name} | {goal.text} | {met} | {worst['shape']} | {worst['value']:.2f} "
                     f"({worst['timing']}) |")
    lines += ["", "| goal | shape | value | met | timing |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['goal']} | {r['shape']} | {'-' if r['value'] is None else format(r['value'], '.2f')} | "
              f"{'yes' if r['met'] else 'no'} | {r['timing']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(source: str, target: str | None = None) -> str:
    data = json.loads(open(source).read())
    text = markdown(judge(data), device_name(data))
    if target:
        open(target, "w").write(text)
    print(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a kernel run's merged JSON (report.py --merged-json)")
    parser.add_argument("target", nargs="?", help="also write the verdicts here (markdown)")
    args = parser.parse_args()
    main(args.source, args.target)
