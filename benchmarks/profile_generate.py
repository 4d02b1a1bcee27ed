"""Where one `LLM.generate` spends its time: a torch.profiler trace of a timed run, summed per
kernel, with how busy the device was.

The same run as bench_generate.py (random-weight OPT checkpoint of a published shape, greedy,
EOS ignored, one warm-up call first), under torch.profiler with CPU and, on CUDA, device
activity; kernels replayed from CUDA graphs are traced too. The report gives per mode the wall
time, the device's total kernel time and their ratio (how busy the GPU was: below 1 the host or
launch latency held it up), then the kernels that took the most device time, each with its
calls and its share. On CPU (--smoke) the table lists CPU ops instead, so the script cannot rot.
It answers "which kernel is worth the next hour", not "how fast is it": timings under the
profiler run slower than bench_generate's.

    python benchmarks/profile_generate.py --size opt-1.3b --modes default async --out DIR
    # writes DIR/profile.md and DIR/profile.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generate import MODES, mode_options, model_config
from opt_fast import LLM, SamplingParams
from opt_fast.bench import card_name
from opt_fast.demo import write_random_checkpoint


def _self_time_us(event, on_gpu: bool) -> float:
    # torch renamed cuda_* to device_* (2.4); the CPU run reads the ops' own CPU time
    if on_gpu:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def profile_mode(ckpt: Path, prompts: list, output_len: int, device: str, dtype: str, mode: str,
                 top: int) -> dict:
    """Profile one timed `LLM.generate(prompts)` of `mode` (bench_generate.MODES) after a warm-up."""
    on_gpu = device == "cuda"
    blocks = len(prompts) * -(-(len(prompts[0]) + output_len) // 16) + 16
    kernels, options, context = mode_options(mode, "auto")
    with context:   # the whole run, from the decode graphs' capture on
        return _profile(LLM(str(ckpt), device=device, dtype=dtype, num_kv_blocks=blocks, max_num_seqs=len(prompts),
                            kernels=kernels, **options), prompts, output_len, on_gpu, mode, top)


def _profile(llm: LLM, prompts: list, output_len: int, on_gpu: bool, mode: str, top: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # a warm-up of other prompts (the timed ones must not come from the prefix cache)
    warmup = [[2] + [5 + (i + j) % 40000 for j in range(len(prompts[0]) - 1)] for i in range(2)]
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        if on_gpu:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    made = sum(len(o.outputs[0].token_ids) for o in outs)
    if made != len(prompts) * output_len:
        raise RuntimeError(f"{mode}: made {made} tokens, not {len(prompts) * output_len}")
    del llm
    events = [e for e in prof.key_averages() if _self_time_us(e, on_gpu) > 0]
    if on_gpu:   # device kernels and copies only: CPU ops have no self device time
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: _self_time_us(e, on_gpu), reverse=True)
    total_us = sum(_self_time_us(e, on_gpu) for e in events)
    rows = [dict(name=e.key[:120], calls=e.count, total_us=round(_self_time_us(e, on_gpu), 1),
                 share=round(_self_time_us(e, on_gpu) / total_us, 4) if total_us else 0.0)
            for e in events[:top]]
    return dict(mode=mode, wall_s=round(wall_s, 4), traced_us=round(total_us, 1),
                busy=round(total_us / 1e6 / wall_s, 3), tokens=made, rows=rows)


def to_markdown(meta: dict, results: list[dict], on_gpu: bool) -> str:
    what = "device kernel time" if on_gpu else "CPU op self time (no GPU: a smoke run)"
    lines = [f"# Profile of LLM.generate — {meta['card']}, {meta['date']}", "",
             f"{meta['size']}, {meta['num_prompts']} prompts x {meta['input_len']} tokens in, "
             f"{meta['output_len']} out, greedy, {meta['dtype']}; torch {meta['torch']}. Summed: {what}. "
             "Times under the profiler, slower than bench_generate's.", ""]
    for r in results:
        lines += [f"## mode `{r['mode']}`: {r['wall_s'] * 1e3:.1f} ms wall, {r['traced_us'] / 1e3:.1f} ms traced, "
                  f"busy {r['busy']:.2f}", "",
                  "| kernel | calls | total us | share |", "| --- | --- | --- | --- |"]
        lines += [f"| `{row['name']}` | {row['calls']} | {row['total_us']} | {row['share']:.1%} |"
                  for row in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="opt-1.3b")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["default", "async"])
    parser.add_argument("--top", type=int, default=25, help="kernels listed per mode")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU, so the script cannot rot")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    prompts = [[2] + p for p in torch.randint(4, 50000, (args.num_prompts, args.input_len - 1), generator=g).tolist()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(tmp, model_config(args.size, args.smoke), seed=0, dtype=dtype)
        for mode in args.modes:
            results.append(profile_mode(ckpt, prompts, args.output_len, device, str(dtype).removeprefix("torch."),
                                        mode, args.top))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "rows"}), flush=True)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), card=card_name(torch.device(device)),
                size=args.size, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                dtype=str(dtype), torch=torch.__version__, smoke=args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    report = to_markdown(meta, results, device == "cuda")
    (out / "profile.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
