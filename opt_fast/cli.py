"""`opt-fast generate | bench`: the command-line front end over LLM and Engine."""
from __future__ import annotations

import argparse
import json
import math
import sys

from .config import KV_CACHE_DTYPES
from .sampling_params import SamplingParams


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _engine_flags() -> argparse.ArgumentParser:
    """Flags both commands share: the model and the Engine's settings. Unset ones (None) are not
    passed on, so the Engine's own defaults apply."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--model", default=None,
                       help="checkpoint directory, hub id (facebook/opt-125m) or FlagAI name (opt-125m-en); "
                            "default: the bundled model")
    flags.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default=None,
                       help="default auto: float16 on CUDA, float32 on CPU")
    flags.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    flags.add_argument("--kernels", choices=["auto", "triton", "torch"], default=None)
    flags.add_argument("--max-num-seqs", type=int, default=None, help="sequences run together per step")
    flags.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit per sequence")
    flags.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks of 16 tokens")
    flags.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    flags.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                       help="compute every prompt in full, even where its start was computed before")
    flags.add_argument("--async-scheduling", action="store_true", default=None,
                       help="overlap the host's work on each decode step with the GPU's on the next")
    flags.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=None,
                       help="auto: the model's dtype; fp8: float8 e4m3, twice the tokens per GiB")
    flags.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    return flags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opt-fast", description="Fast batch generation with OPT models")
    commands = parser.add_subparsers(dest="command", required=True)
    engine = _engine_flags()

    gen = commands.add_parser("generate", parents=[engine], help="generate text for one or more prompts")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", help="a file with one prompt per line (blank lines skipped; - reads stdin)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 or -1: off")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same tokens")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    gen.add_argument("--stop-token-ids", type=int, nargs="+", default=None, metavar="ID")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--logprobs", type=int, default=None, metavar="N",
                     help="report each output token's logprob and the top N")
    gen.add_argument("--beam-width", type=_positive_int, default=None, metavar="W",
                     help="beam search with W beams (greedy: the sampling flags other than --max-tokens "
                          "and --ignore-eos do not apply); prints every beam, best first")
    gen.add_argument("--length-penalty", type=float, default=1.0,
                     help="beam score: cumulative logprob / length ** this (default 1.0)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, no progress bars")

    bench = commands.add_parser("bench", parents=[engine],
                                help="throughput and latency on random prompts (all sent at once, or at a "
                                     "request rate)")
    bench.add_argument("--num-prompts", type=_positive_int, default=32, metavar="N",
                       help="requests (default 32)")
    bench.add_argument("--input-len", type=_positive_int, default=128, metavar="I",
                       help="prompt tokens, BOS included (default 128)")
    bench.add_argument("--output-len", type=_positive_int, default=128, metavar="O",
                       help="tokens generated per prompt, EOS ignored (default 128)")
    bench.add_argument("--random-weights", action="store_true",
                       help="random weights, nothing downloaded; --model may then be a size name (opt-1.3b)")
    bench.add_argument("--compare", choices=["hf"], default=None,
                       help="also time Hugging Face transformers' generate on the same prompts")
    bench.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                       help="draw each request's input and output lengths uniformly within +-R of "
                            "--input-len / --output-len (0 <= R < 1; default 0: all equal)")
    bench.add_argument("--request-rate", type=float, default=math.inf, metavar="RPS",
                       help="requests per second, sent at seeded Poisson arrival times (TTFT counts from "
                            "each arrival); default inf: all at once")
    bench.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    bench.add_argument("--seed", type=int, default=0, help="seeds the prompts and the engine")
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout, no progress bars")
    return parser


def _model(args) -> str:
    if args.model is not None:
        return args.model
    from .bundled import default_model_dir   # only when needed: an explicit --model never touches it
    return str(default_model_dir())


def _engine_kwargs(args) -> dict:
    names = dict(dtype="dtype", device="device", kernels="kernels", max_num_seqs="max_num_seqs",
                 max_model_len="max_model_len", num_kv_blocks="num_kv_blocks",
                 enforce_eager="enforce_eager", enable_prefix_caching="enable_prefix_caching",
                 async_scheduling="async_scheduling", kv_cache_dtype="kv_cache_dtype",
                 tp="tensor_parallel_size")
    return {kwarg: getattr(args, flag) for flag, kwarg in names.items() if getattr(args, flag) is not None}


def _generate(args) -> int:
    if args.prompts_file:
        # "-" reads standard input; utf-8-sig drops the byte-order mark some editors write
        if args.prompts_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.prompts_file, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file} holds no prompts")
    else:
        prompts = args.prompt
    params = SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
                            min_tokens=args.min_tokens, stop=args.stop, stop_token_ids=args.stop_token_ids,
                            ignore_eos=args.ignore_eos, seed=args.seed, logprobs=args.logprobs)
    from .llm import LLM
    if args.beam_width is not None:
        return _beam_search(args, prompts)
    llm = LLM(_model(args), progress=not args.json, **_engine_kwargs(args))
    outputs = llm.generate(prompts, params, use_tqdm=not args.json)
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                              "outputs": [{"text": c.text, "token_ids": c.token_ids,
                                           "finish_reason": c.finish_reason,
                                           "cumulative_logprob": c.cumulative_logprob,
                                           "logprobs": c.logprobs} for c in out.outputs]},
                             ensure_ascii=False))
        else:
            for c in out.outputs:
                label = f"[{c.index}] " if len(out.outputs) > 1 else ""
                print(f"{label}{out.prompt!r} -> {c.text!r} [{c.finish_reason}]")
    return 0


def _beam_search(args, prompts: list[str]) -> int:
    from .beam_search import BeamSearchParams
    from .llm import LLM
    sampling = [flag for flag, used in (("--n", args.n != 1), ("--temperature", args.temperature != 1.0),
                                        ("--top-k", args.top_k != 0), ("--top-p", args.top_p != 1.0),
                                        ("--repetition-penalty", args.repetition_penalty != 1.0),
                                        ("--min-tokens", args.min_tokens != 0), ("--seed", args.seed is not None),
                                        ("--stop", bool(args.stop)), ("--stop-token-ids", bool(args.stop_token_ids)),
                                        ("--logprobs", args.logprobs is not None)) if used]
    if sampling:
        raise ValueError(f"--beam-width does not combine with {', '.join(sampling)}")
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens,
                              ignore_eos=args.ignore_eos, length_penalty=args.length_penalty)
    llm = LLM(_model(args), progress=not args.json, **_engine_kwargs(args))
    for prompt, out in zip(prompts, llm.beam_search(prompts, params)):
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_token_ids": out.prompt_token_ids,
                              "beams": [{"text": b.text, "token_ids": b.token_ids, "finish_reason": b.finish_reason,
                                         "cumulative_logprob": b.cumulative_logprob, "score": b.score}
                                        for b in out.sequences]}, ensure_ascii=False))
        else:
            for rank, beam in enumerate(out.sequences):
                print(f"[{rank}] {prompt!r} -> {beam.text!r} [{beam.finish_reason}, score {beam.score:.4f}]")
    return 0


def _bench(args) -> int:
    from .bench import format_table, run_bench
    result = run_bench(_model(args), args.num_prompts, args.input_len, args.output_len,
                       random_weights=args.random_weights, compare=args.compare,
                       temperature=args.temperature, seed=args.seed,
                       random_range_ratio=args.random_range_ratio, request_rate=args.request_rate,
                       progress=not args.json,
                       **_engine_kwargs(args))
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _bench(args)
    except BrokenPipeError:
        # the reader went away (`... --json | head -1`): nothing is left to tell it
        sys.stdout = None
        return 0
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"opt-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
