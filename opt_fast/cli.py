"""`opt-fast generate`: the command-line front end over LLM."""
from __future__ import annotations

import argparse
import json
import sys

from .sampling_params import SamplingParams


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opt-fast", description="Fast batch generation with OPT models")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("--model", required=True,
                     help="checkpoint directory, hub id (facebook/opt-125m) or FlagAI name (opt-125m-en)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default=None)
    gen.add_argument("--kernels", default="auto")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def _generate(args) -> int:
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = args.prompt
    params = SamplingParams(n=args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
                            min_tokens=args.min_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
                            seed=args.seed)
    from .llm import LLM
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels,
              tensor_parallel_size=args.tp)
    outputs = llm.generate(prompts, params, use_tqdm=not args.json)
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                              "outputs": [{"text": c.text, "token_ids": c.token_ids,
                                           "finish_reason": c.finish_reason} for c in out.outputs]},
                             ensure_ascii=False))
        else:
            for completion in out.outputs:
                print(f"{out.prompt!r} -> {completion.text!r} [{completion.finish_reason}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"opt-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
