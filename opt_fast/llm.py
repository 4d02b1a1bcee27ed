"""LLM: the offline batch API over Engine."""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from itertools import count
from pathlib import Path

from .beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from .config import EngineConfig
from .engine.engine import Engine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Batch generation with OPT (DESIGN.md §3).

    `model` is a local checkpoint directory (HF or FlagAI layout), a hub id like
    `facebook/opt-1.3b`, or a FlagAI/short name like `opt-1.3b-en`.
    - dtype: "auto" (float16 on CUDA, float32 on CPU), "float16", "bfloat16" or "float32";
    - device: None picks "cuda" where available, else "cpu";
    - kernels: "auto" (on CUDA the Triton attentions, sampler and, on Hopper, the small-batch
      LayerNorm GEMMs, cuBLAS for the other GEMMs; torch elsewhere), "triton" or "torch";
    - tensor_parallel_size: split each layer over so many ranks (processes; one GPU each on CUDA,
      consecutive from `device`); they stop on `close()`, or when this LLM is collected; one
      such LLM per process at a time;
    - block_size, num_kv_blocks (None: sized from gpu_memory_utilization on CUDA), the paged KV cache;
    - max_num_seqs, max_num_batched_tokens: at most so many sequences and tokens per step;
    - max_model_len: prompt + output tokens per request (None: the model's positions);
    - enforce_eager: no CUDA graphs; seed: the base of unseeded requests' draws;
    - load_format: "auto" reads the checkpoint, "dummy" draws random weights (benchmarks);
    - enable_prefix_caching: a prompt whose leading blocks of tokens match blocks computed before
      (a shared system prompt, few-shot preamble, or a preempted sequence's own) reuses their KV
      cache instead of computing them again;
    - async_scheduling: on the CUDA-graph decode path, launch each step before the host has read
      the previous step's tokens (they feed the next step on the device), so the host's work
      overlaps the GPU's; tokens are the same either way (see the README);
    - progress (keyword only): a weight-loading bar, on a terminal only.
    Bad values raise ValueError naming the field.
    """

    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None, kernels: str = "auto",
                 tensor_parallel_size: int = 1, block_size: int = 16, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
                 enforce_eager: bool = False, seed: int = 0, load_format: str = "auto",
                 enable_prefix_caching: bool = True, async_scheduling: bool = False,
                 kv_cache_dtype: str = "auto", *, progress: bool = True):
        # (EngineConfig's fields, in this order; validated there)
        config = EngineConfig(dtype, device, kernels, tensor_parallel_size, block_size, num_kv_blocks,
                              gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, max_model_len,
                              enforce_eager, seed, load_format, enable_prefix_caching, async_scheduling,
                              kv_cache_dtype)
        self.engine = Engine(model, progress=progress, stream_outputs=False, **asdict(config))
        self._ids = count()

    def close(self) -> None:
        """Free the model and its memory now and stop the tensor-parallel worker processes (if
        any), instead of when this LLM is garbage-collected. It cannot generate afterwards."""
        self.engine.close()

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache: later prompts reuse nothing computed before (Engine.reset_prefix_cache)."""
        self.engine.reset_prefix_cache()

    def get_tokenizer(self):
        """The model's `opt_fast.tokenizer.OPTTokenizer`, or None if its directory has no
        tokenizer files (token-id prompts still work)."""
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished RequestOutput per prompt, in order."""
        prompts = _prompt_list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                                 f"{len(prompts)} prompts")
            params_list = sampling_params
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        # Whole outputs, whatever output_kind says: an engine that an AsyncEngine also serves
        # streams, and would hand back only the last delta.
        params_list = [replace(p, output_kind="cumulative") if getattr(p, "output_kind", None) == "delta" else p
                       for p in params_list]
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, params in zip(ids, prompts, params_list):
                self.engine.add_request(request_id, prompt, params)
        except BaseException:
            # All or nothing: a bad prompt (or an interrupt) leaves no request behind.
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        try:
            return self._run(ids, use_tqdm)
        except BaseException:
            # An error or an interrupt (Ctrl-C) mid-run: these requests must not stay in the
            # engine, holding blocks and running in every later call. (Finished ids are ignored.)
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise

    def beam_search(self, prompts: str | list[str] | list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (`opt_fast.beam_search`): for each prompt, its best `params.beam_width`
        beams, best score first."""
        return beam_search(self, _prompt_list(prompts), params)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generating", unit=" prompts", disable=None)
        try:
            while len(finished) < len(ids):
                outputs = self.engine.step()
                if not outputs and not self.engine.has_unfinished_requests():
                    raise RuntimeError("engine stopped with requests unfinished")   # never hang
                for out in outputs:
                    # (requests added to self.engine directly may report here too)
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]


def _prompt_list(prompts) -> list:
    """One prompt (a string, or a list or tuple of token ids) as a list of one; any other
    collection of prompts (a list, a generator, ...) as a list. A number, a dict or bytes is a
    ValueError (each prompt is checked when added)."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], numbers.Integral)):
        return [prompts]
    if not isinstance(prompts, Iterable) or isinstance(prompts, (bytes, Mapping)):
        raise ValueError(f"prompts must be a string, a list of token ids, or a list of those, got "
                         f"{type(prompts).__name__} {prompts!r:.80}")
    return list(prompts)
