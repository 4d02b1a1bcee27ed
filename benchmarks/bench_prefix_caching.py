"""Prefix caching: `LLM.generate` with it (the default) and without, side by side in one process,
on prompts that share a long leading prefix (a system prompt or few-shot preamble) and end in
tokens of their own. Random-weight checkpoints of the published shapes, greedy, EOS ignored.

Every prompt is sent in one `generate` call, so the batch itself finds the sharing: the first
steps compute the prefix, later prompts reuse its blocks. The warm-up runs a different shared
prefix, so the timed batch starts with nothing of its own cached. Reports the seconds and tokens
per second (prompt + output) both ways, their ratio, the prompt tokens reused, and whether the
greedy tokens agree. Writes a markdown table and a JSON file to --out.

    python benchmarks/bench_prefix_caching.py --sizes opt-125m opt-1.3b
"""
from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench_generate import bench_opt_fast, kernels_summary, model_config
from opt_fast.bench import card_name
from opt_fast.demo import write_random_checkpoint


def shared_prefix_prompts(g: torch.Generator, count: int, prefix_len: int, suffix_len: int) -> list[list[int]]:
    prefix = [2] + torch.randint(4, 50000, (prefix_len - 1,), generator=g).tolist()
    return [prefix + torch.randint(4, 50000, (suffix_len,), generator=g).tolist() for _ in range(count)]


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    card = card_name(torch.device(device))
    g = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        prompts = shared_prefix_prompts(g, args.num_prompts, args.prefix_len, args.suffix_len)
        warmup = shared_prefix_prompts(g, 2, args.prefix_len, args.suffix_len)
        prompt_len = args.prefix_len + args.suffix_len
        kv_blocks = args.num_prompts * -(-(prompt_len + args.output_len) // 16) + 16
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = write_random_checkpoint(tmp, model_config(size, args.smoke), seed=0, dtype=dtype)
            for caching in (True, False):
                # two warm-up calls: the second reuses the first's prefix (that kernel path warms too)
                runs[caching] = bench_opt_fast(ckpt, prompts, args.output_len, device, str(dtype).removeprefix("torch."),
                                               kv_blocks, args.kernels, [warmup[:1], warmup[1:]],
                                               enable_prefix_caching=caching)
        (on_s, on), (off_s, off) = runs[True], runs[False]
        tokens = args.num_prompts * (prompt_len + args.output_len)
        row = dict(size=size, device=device, card=card, dtype=str(dtype), num_prompts=args.num_prompts,
                   prefix_len=args.prefix_len, suffix_len=args.suffix_len, output_len=args.output_len,
                   cached_s=round(on_s, 4), uncached_s=round(off_s, 4),
                   cached_tok_s=round(tokens / on_s, 1), uncached_tok_s=round(tokens / off_s, 1),
                   speedup=round(off_s / on_s, 3),
                   prompt_tokens_reused=sum(o.num_cached_tokens for o in on),
                   prompt_tokens=args.num_prompts * prompt_len,
                   greedy_agreement=sum(a.outputs[0].token_ids == b.outputs[0].token_ids
                                        for a, b in zip(on, off)) / len(on),
                   smoke=args.smoke)
        if any(o.num_cached_tokens for o in off):
            raise RuntimeError(f"{size}: the run without prefix caching reused blocks")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_report(rows: list[dict], out_dir: Path, kernels: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    card = rows[0]["card"] if rows else "?"
    meta = dict(date=stamp, card=card, torch=torch.__version__, kernels=kernels,
                note="random weights; greedy; EOS ignored; one timed run per mode after warm-up")
    (out_dir / "bench_prefix_caching.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Prefix caching on vs off, LLM.generate — {card}, {stamp}", "",
             f"torch {torch.__version__}; opt_fast kernels: {kernels}. Tokens/s count prompt + output tokens.", "",
             "| size | prompts | prefix + suffix -> output | cached tok/s | uncached tok/s | cached / uncached "
             "| prompt tokens reused | same greedy tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['size']} | {r['num_prompts']} | {r['prefix_len']} + {r['suffix_len']} -> {r['output_len']} | "
              f"{r['cached_tok_s']} | {r['uncached_tok_s']} | {r['speedup']}x | "
              f"{r['prompt_tokens_reused']} / {r['prompt_tokens']} | {r['greedy_agreement']:.2f} |" for r in rows]
    (out_dir / "bench_prefix_caching.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["opt-125m", "opt-1.3b"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024, help="tokens every prompt starts with, BOS included")
    parser.add_argument("--suffix-len", type=int, default=64, help="tokens of each prompt's own after the prefix")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--kernels", default="auto", help="opt_fast kernels: auto (Triton on CUDA) | torch")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, so the script cannot rot")
    return parser.parse_args(argv)


def test_prefix_caching_benchmark_smoke(tmp_path):
    """The script runs end to end (a timing proves nothing here). The eight prompts outgrow one
    step's 2048 tokens: the first four and a chunk of the fifth compute the prefix, the last
    three reuse it. Both runs agree."""
    args = parse_args(["--smoke", "--sizes", "opt-125m", "--num-prompts", "8", "--prefix-len", "500",
                       "--suffix-len", "5", "--output-len", "3", "--kernels", "torch", "--out", str(tmp_path)])
    rows = run(args)
    write_report(rows, tmp_path, kernels_summary(args.kernels, rows[0]["device"]))
    assert rows[0]["prompt_tokens_reused"] == 3 * 496 and rows[0]["greedy_agreement"] == 1.0
    assert "cached / uncached" in (tmp_path / "bench_prefix_caching.md").read_text()


def main() -> None:
    args = parse_args()
    rows = run(args)
    write_report(rows, Path(args.out), kernels_summary(args.kernels, "cuda" if torch.cuda.is_available() else "cpu"))


if __name__ == "__main__":
    main()
