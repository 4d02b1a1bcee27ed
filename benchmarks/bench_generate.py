"""End-to-end generation throughput: opt_fast `LLM.generate` against Hugging Face `generate`,
side by side in one process, on random-weight OPT checkpoints of the published shapes.

Both run greedy decoding of the same token-id prompts for exactly `--output-len` new tokens
(EOS ignored), in float16 on CUDA (float32 on CPU for the smoke mode). opt_fast runs with CUDA
graphs for decode where the engine uses them (its default on CUDA). `--modes` runs it once per
mode named, for each size (HF once), one row per run, so one report compares them: `default`,
`eager` (enforce_eager=True), `async` (async_scheduling=True), and `triton` / `triton-async`
(kernels="triton": the linear layers too run our fused Triton GEMMs, which `auto` leaves to
cuBLAS past the LayerNorm GEMMs of small batches, so the rows tell whether the fusions pay off
in whole decode steps), and `cublas-linears` (the defaults with every LayerNorm GEMM through
torch/cuBLAS, as `auto` ran them before it took the fused kernel at up to 64 rows: beside
`default`, what that choice is worth end to end). Writes a markdown table and a JSON file to
--out.
Run: `python benchmarks/bench_generate.py --sizes opt-125m opt-1.3b --modes default eager async`.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch

from opt_fast import LLM, SamplingParams
from opt_fast.bench import card_name
from opt_fast.config import preset_for
from opt_fast.demo import write_random_checkpoint


# opt_fast runs by name: the engine keyword arguments each adds to its defaults
MODES = {"default": {}, "eager": dict(enforce_eager=True), "async": dict(async_scheduling=True),
         "triton": dict(kernels="triton"), "triton-async": dict(kernels="triton", async_scheduling=True),
         "cublas-linears": dict(cublas_linears=True)}


def ln_gemms_on_cublas(on: bool) -> contextlib.AbstractContextManager:
    """With `on`, a context in which kernels="auto" runs LN+QKV and LN+fc1 through torch/cuBLAS
    at every batch size (its fused-kernel rule, kernels.takes_ln_options, says no)."""
    import opt_fast.kernels as kernels
    return mock.patch.object(kernels, "takes_ln_options", lambda *args, **kwargs: False) if on else contextlib.nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_config(size: str, smoke: bool):
    """The published shape `size`, or with --smoke a tiny model of the same kind (pre-LN, or
    350m's post-LN with project_in/out)."""
    config = preset_for(size)
    if smoke:
        config = replace(config, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                         word_embed_proj_dim=64 if config.word_embed_proj_dim == config.hidden_size else 32)
    return config


def mode_options(mode: str, kernels: str) -> tuple[str, dict, contextlib.AbstractContextManager]:
    """(kernels, the other engine options, the context the run goes in: ln_gemms_on_cublas) of
    `mode`; `kernels` unless the mode names its own."""
    options = dict(MODES[mode])
    return options.pop("kernels", kernels), options, ln_gemms_on_cublas(options.pop("cublas_linears", False))


def bench_opt_fast(ckpt: Path, prompts, output_len: int, device: str, dtype: str, kv_blocks: int,
                   kernels: str, warmups: list, **engine_kwargs):
    """(seconds, outputs) of one timed `LLM.generate(prompts)` after one warm-up call per entry
    of `warmups` (lists of prompts). Warm-up prompts must not share blocks with the timed ones,
    or the timed run would reuse them from the prefix cache."""
    llm = LLM(str(ckpt), device=device, dtype=dtype, kernels=kernels, num_kv_blocks=kv_blocks,
              max_num_seqs=len(prompts), **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for warmup in warmups:
        llm.generate(warmup, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync(device)
    elapsed = time.perf_counter() - start
    del llm
    _release()
    return elapsed, outs


def bench_hf(ckpt: Path, prompts, output_len: int, device: str, dtype: torch.dtype):
    from transformers import OPTForCausalLM
    model = OPTForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)   # equal lengths: no padding needed
    kwargs = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len,
                  pad_token_id=1, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        _sync(device)
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        _sync(device)
    elapsed = time.perf_counter() - start
    tokens = out[:, ids.shape[1]:].tolist()
    del model
    _release()
    return elapsed, tokens


def kernels_summary(kernels: str, device: str) -> str:
    """Which implementation each op of `kernels` runs on `device`, for a report's header."""
    from opt_fast.kernels import get_ops, implementations
    return ", ".join(f"{op}: {kind}" for op, kind in implementations(get_ops(kernels, device)).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["opt-125m", "opt-1.3b"])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--kernels", default="auto", help="opt_fast kernels: auto (Triton on CUDA) | torch")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["default"],
                        help="opt_fast runs, one row each: its defaults (CUDA graphs on CUDA), "
                             "enforce_eager=True, async_scheduling=True, kernels='triton' without and "
                             "with async_scheduling, the defaults with the LayerNorm GEMMs on cuBLAS")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, so the script cannot rot")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    card = card_name(torch.device(device))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        config = model_config(size, args.smoke)
        prompts = torch.randint(4, 50000, (args.num_prompts + 2, args.input_len), generator=g).tolist()
        prompts, warmup = [[2] + p[1:] for p in prompts[2:]], [[2] + p[1:] for p in prompts[:2]]
        kv_blocks = args.num_prompts * -(-(args.input_len + args.output_len) // 16) + 16
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ckpt = write_random_checkpoint(tmp, config, seed=0, dtype=dtype)
            write_s = time.perf_counter() - t0
            ours = []
            for mode in args.modes:
                kernels, options, context = mode_options(mode, args.kernels)
                with context:   # from the decode graphs' capture on
                    ours.append(bench_opt_fast(ckpt, prompts, args.output_len, device,
                                               str(dtype).removeprefix("torch."), kv_blocks, kernels, [warmup],
                                               **options))
            ours = [(seconds, [o.outputs[0].token_ids for o in outs]) for seconds, outs in ours]
            hf_s, hf_tokens = bench_hf(ckpt, prompts, args.output_len, device, dtype)
        generated = args.num_prompts * args.output_len
        for tokens in [hf_tokens] + [t for _, t in ours]:
            # tok/s counts what was asked for: every run must have made exactly that
            if sum(map(len, tokens)) != generated:
                raise RuntimeError(f"{size}: a run made {sum(map(len, tokens))} tokens, not {generated}")
        for mode, (ours_s, ours_tokens) in zip(args.modes, ours):
            agree = sum(a[:16] == b[:16] for a, b in zip(ours_tokens, hf_tokens)) / len(prompts)
            row = dict(size=size, mode=mode, device=device, card=card, dtype=str(dtype),
                       num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                       opt_fast_s=round(ours_s, 4), hf_s=round(hf_s, 4),
                       opt_fast_tok_s=round(generated / ours_s, 1), hf_tok_s=round(generated / hf_s, 1),
                       speedup_vs_hf=round(hf_s / ours_s, 3), first16_greedy_agreement=agree,
                       checkpoint_write_s=round(write_s, 1), smoke=args.smoke)
            rows.append(row)
            print(json.dumps(row), flush=True)
        # after every size: a run stopped from outside (gpu-check's timeout) keeps what it measured
        text = write_report(out_dir, rows, args, card, device, dtype)
    print(text)


def write_report(out_dir: Path, rows: list, args, card: str, device: str, dtype: torch.dtype) -> str:
    """Writes bench_generate.json and .md for the rows so far; returns the markdown."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kernels = kernels_summary(args.kernels, device)
    meta = dict(date=stamp, card=card, torch=torch.__version__, kernels=kernels,
                note="random weights; greedy; EOS ignored; one timed run after a warm-up")
    (out_dir / "bench_generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# LLM.generate vs HF generate — {card}, {stamp}", "",
             f"torch {torch.__version__}; opt_fast kernels: {kernels}; "
             f"{args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out, greedy, {dtype}.", "",
             "Modes: `default` is opt_fast's defaults (CUDA graphs for decode on CUDA), `eager` "
             "enforce_eager=True, `async` async_scheduling=True; `triton` and `triton-async` run every "
             f"op as a Triton kernel (kernels='triton': {kernels_summary('triton', device)}); "
             "`cublas-linears` the defaults with LN+QKV and LN+fc1 through torch/cuBLAS at every batch size.", "",
             "| size | mode | opt_fast tok/s | HF tok/s | opt_fast / HF | first-16 greedy agreement |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['size']} | {r['mode']} | {r['opt_fast_tok_s']} | {r['hf_tok_s']} | "
              f"{r['speedup_vs_hf']}x | {r['first16_greedy_agreement']:.2f} |" for r in rows]
    (out_dir / "bench_generate.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
