"""LLM: the offline batch API over Engine."""
from __future__ import annotations

from itertools import count
from pathlib import Path

from .engine.engine import Engine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Batch generation with OPT (DESIGN.md §3).

    `model` is a local checkpoint directory (HF or FlagAI layout), a hub id like
    `facebook/opt-1.3b`, or a FlagAI/short name like `opt-1.3b-en`. Keyword arguments: dtype,
    device, kernels, tensor_parallel_size, block_size, num_kv_blocks, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, max_model_len, enforce_eager, seed.
    """

    def __init__(self, model: str | Path, progress: bool = True, **kwargs):
        # progress: a weight-loading bar (only on a terminal); the CLI turns it off under --json.
        self.engine = Engine(model, progress=progress, stream_outputs=False, **kwargs)
        self._ids = count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                                 f"{len(prompts)} prompts")
            params_list = sampling_params
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, params in zip(ids, prompts, params_list):
                self.engine.add_request(request_id, prompt, params)
        except ValueError:
            for request_id in ids:      # all or nothing: a bad prompt leaves no request behind
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
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
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]
