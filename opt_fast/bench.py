"""`opt-fast bench`: serving-style throughput and latency of the Engine, optionally beside HF.

All requests enter the engine at t0, or with a request rate at Poisson arrival times from t0 (as
vLLM's serving benchmark sends them); `step()` runs until every one is done. Each request's
arrival, first-token time and finish time give time-to-first-token (TTFT, from its arrival) and
time-per-output-token (TPOT). Every request produces exactly `output_len` tokens (EOS ignored),
so runs compare.
"""
from __future__ import annotations

import json
import math
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .config import OPT_PRESETS, OPTConfig, preset_for
from .engine.engine import Engine
from .kernels import implementations
from .sampling_params import SamplingParams

_FIRST_ORDINARY_ID = 4      # ids 0-3 are <s> <pad> </s> <unk>; prompts draw from the rest
_BOS = 2


def run_bench(model: str | Path, num_prompts: int, input_len: int, output_len: int, *,
              random_weights: bool = False, compare: str | None = None, temperature: float = 0.0,
              seed: int = 0, random_range_ratio: float = 0.0, request_rate: float = math.inf,
              progress: bool = False, **engine_kwargs) -> dict:
    """Time `num_prompts` requests of `input_len` random token ids, `output_len` tokens each.

    `model` is a checkpoint directory or name, as for `Engine`; with `random_weights` it may also
    be a size name (`opt-1.3b`), and the weights are drawn at random, so nothing is downloaded.
    `compare="hf"` also times transformers' `generate` on the same prompts. `random_range_ratio`
    r in [0, 1) draws each request's input and output lengths uniformly from [len * (1 - r),
    len * (1 + r)] instead (seeded; vLLM's benchmark option of the same name), which batches of
    unequal requests need; not with compare. `request_rate` (requests per second, > 0; inf: all
    at t0) sends request i at the i-th arrival of a seeded Poisson process from t0 (the first at
    t0), and TTFT counts from each request's arrival; not with compare. `engine_kwargs` go to
    `Engine` (dtype, device, kernels, max_num_seqs, ...). Returns one flat dict (see format_table).
    """
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if compare not in (None, "hf"):
        raise ValueError(f"compare must be None or 'hf', got {compare!r}")
    if isinstance(random_range_ratio, bool) or not isinstance(random_range_ratio, (int, float)) or \
            not 0 <= random_range_ratio < 1:
        raise ValueError(f"random_range_ratio must be in [0, 1), got {random_range_ratio!r}")
    if random_range_ratio and compare:
        raise ValueError("random_range_ratio > 0 cannot compare with HF: its batched generate needs equal lengths")
    if isinstance(request_rate, bool) or not isinstance(request_rate, (int, float)) or not request_rate > 0 \
            or not math.isfinite(1 / request_rate):
        raise ValueError(f"request_rate must be a number > 0 whose inverse is finite (inf: all requests at once), "
                         f"got {request_rate!r}")
    if compare and request_rate != math.inf:
        raise ValueError("a finite request_rate cannot compare with HF: its generate takes the whole batch at once")
    if compare == "hf":
        _require_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        path = _model_dir(model, random_weights, Path(tmp))
        engine = Engine(path, progress=progress, seed=seed, **engine_kwargs,
                        **({"load_format": "dummy"} if random_weights else {}))
        in_lens, out_lens = (_random_lengths(num_prompts, length, random_range_ratio, seed + i)
                             for i, length in enumerate((input_len, output_len)))
        if max(in_lens) + max(out_lens) > engine.max_model_len:
            raise ValueError(f"input_len ({max(in_lens)}) + output_len ({max(out_lens)}) exceeds max_model_len="
                             f"{engine.max_model_len}")
        prompts = [_random_prompts(1, n, engine.vocab_size, seed * 1_000_003 + i)[0] for i, n in enumerate(in_lens)] \
            if random_range_ratio else _random_prompts(num_prompts, input_len, engine.vocab_size, seed)
        params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for n in out_lens]
        # Other prompts than the timed ones: the same would find their blocks in the prefix cache.
        # A seed of its own kind: an int one (seed + 1) was the seed of a timed prompt at
        # --random-range-ratio with seed 0, whose blocks the warm-up then supplied.
        _warm_up(engine, _random_prompts(2, input_len, engine.vocab_size, f"warm-up {seed}"), params[0])
        arrivals = _arrival_times(num_prompts, request_rate, seed)
        timing = _time_engine(engine, prompts, params, arrivals, progress)
        result = _settings(engine, model, random_weights, num_prompts, input_len, output_len,
                           temperature, seed)
        result.update(random_range_ratio=random_range_ratio, input_tokens=sum(in_lens),
                      request_rate=None if request_rate == math.inf else request_rate)
        result.update(timing)
        source = "torch.cuda.max_memory_allocated" if engine.runner.device.type == "cuda" else "peak RSS"
        if engine.cfg.tensor_parallel_size > 1:
            source += " of rank 0 (each rank holds its share)"
        result.update(peak_memory_mib=_peak_memory_mib(engine.runner.device), peak_memory_source=source)
        if compare == "hf":
            device, dtype = engine.runner.device, engine.runner.dtype
            config, batch = engine.model_config, engine.cfg.max_num_seqs
            engine.close()  # free its weights and KV cache (and workers) before HF loads its copy
            _release(device)
            hf_s = _time_hf(path, config, random_weights, prompts, output_len, device, dtype, batch,
                            progress)
            hf_tok_s = num_prompts * output_len / hf_s
            result.update(hf_elapsed_s=round(hf_s, 6), hf_batch_size=min(batch, num_prompts),
                          hf_output_tokens_per_s=round(hf_tok_s, 2),
                          speedup_vs_hf=round(hf_s / result["elapsed_s"], 3))   # same tokens: time ratio
    return result


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("--compare hf needs Hugging Face transformers, which is not installed "
                         "(pip install transformers, or the test extra: "
                         "pip install 'opt_fast[test]')") from None


def _model_dir(model: str | Path, random_weights: bool, tmp: Path) -> str | Path:
    """Where the Engine reads config.json: the model itself, or for a size name with random
    weights a temporary directory holding only that preset's config.json."""
    if not random_weights or Path(model).expanduser().is_dir():
        return model
    (tmp / "config.json").write_text(json.dumps(preset_for(str(model)).to_hf_dict()))
    return tmp


def _random_lengths(count: int, length: int, ratio: float, seed: int) -> list[int]:
    """`count` lengths, each `length` or, with `ratio` > 0, uniform in [length * (1 - ratio),
    length * (1 + ratio)] (at least 1)."""
    if not ratio:
        return [length] * count
    rng = random.Random(seed)
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def _arrival_times(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from t0 at which each of `count` requests arrives: all at 0 for an infinite rate,
    else 0 and then exponential gaps of mean 1 / rate (a Poisson process), seeded."""
    if rate == math.inf:
        return [0.0] * count
    rng = random.Random(seed * 7919 + 17)
    times, now = [], 0.0
    for i in range(count):
        if i:
            now += rng.expovariate(rate)
        times.append(now)
    return times


def _random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int | str) -> list[list[int]]:
    if vocab_size <= _FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token ids for random prompts")
    rng = random.Random(seed)
    return [[_BOS] + [rng.randrange(_FIRST_ORDINARY_ID, vocab_size) for _ in range(input_len - 1)]
            for _ in range(num_prompts)]


def _warm_up(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> None:
    """A short run through a batched prefill and decode, so one-time costs (allocator growth,
    kernel compilation, lazy imports) stay out of the timed run."""
    short = SamplingParams(temperature=params.temperature, max_tokens=min(2, params.max_tokens),
                           ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"warmup-{i}", prompt, short)
    while engine.has_unfinished_requests():
        engine.step()


def _time_engine(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], arrivals: list[float],
                 progress: bool) -> dict:
    """Sends request i at t0 + arrivals[i] (the engine steps in between; idle, it waits for the
    next arrival) and times every request from its arrival."""
    ids = [f"bench-{i}" for i in range(len(prompts))]
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    tokens: dict[str, int] = {}
    seen: dict[str, tuple[int, float]] = {}    # tokens received so far, and when the last came
    gaps: list[float] = []                     # inter-token latencies: between a request's outputs
    reused = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids), desc="benchmarking", unit=" requests", disable=None)
    sent = 0
    try:
        t0 = time.perf_counter()
        while len(finish) < len(ids):
            now = time.perf_counter()
            while sent < len(ids) and t0 + arrivals[sent] <= now:
                engine.add_request(ids[sent], prompts[sent], params[sent])
                sent += 1
            if not engine.has_unfinished_requests():
                if sent == len(ids):
                    raise RuntimeError("engine stopped with requests unfinished")
                time.sleep(max(0.0, t0 + arrivals[sent] - time.perf_counter()))   # idle until the next arrival
                continue
            outputs = engine.step()     # returns host token ids, so the device work is done
            now = time.perf_counter()
            for out in outputs:
                count = len(out.outputs[0].token_ids)
                if count:    # a step may advance a prompt without sampling
                    first.setdefault(out.request_id, now)
                    before, last = seen.get(out.request_id, (0, None))
                    if count > before:
                        if last is not None:
                            gaps.append(now - last)
                        seen[out.request_id] = (count, now)
                if out.finished:
                    finish[out.request_id] = now
                    tokens[out.request_id] = count
                    reused += out.num_cached_tokens
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    asked = {i: p.max_tokens for i, p in zip(ids, params)}
    wrong = {i: n for i, n in tokens.items() if n != asked[i]}
    if wrong:
        raise RuntimeError(f"requests stopped early, the numbers would not compare: {wrong}")
    elapsed = max(finish.values()) - t0
    output_tokens = sum(tokens.values())
    ttft = [first[i] - (t0 + arrival) for i, arrival in zip(ids, arrivals)]
    # TPOT excludes the first token (that is TTFT); one-token requests have no decode to time.
    tpot = [(finish[i] - first[i]) / (tokens[i] - 1) for i in ids if tokens[i] > 1]
    result = dict(elapsed_s=round(elapsed, 6), output_tokens=output_tokens,
                  requests_per_s=round(len(ids) / elapsed, 3),
                  output_tokens_per_s=round(output_tokens / elapsed, 2), prompt_tokens_reused=reused)
    # mean, p50, p99 of each latency (vLLM's serving benchmark reports the same three); ITL: the
    # time between two outputs of one request, so a step that stalls some requests shows in it
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", gaps)):
        result.update(zip((f"{name}_mean_ms", f"{name}_p50_ms", f"{name}_p99_ms"),
                          _summary_ms(values) if values else (None, None, None)))
    return result


def _summary_ms(seconds: list[float]) -> tuple[float, float, float]:
    """Mean, p50 and p99 in milliseconds (percentiles linearly interpolated between samples)."""
    values = torch.tensor(seconds, dtype=torch.float64)
    q = values.quantile(torch.tensor([0.5, 0.99], dtype=torch.float64))
    return round(values.mean().item() * 1e3, 3), round(q[0].item() * 1e3, 3), round(q[1].item() * 1e3, 3)


def _time_hf(path, config: OPTConfig, random_weights: bool, prompts: list[list[int]], output_len: int,
             device: torch.device, dtype: torch.dtype, batch_size: int, progress: bool) -> float:
    """Seconds for transformers' greedy `generate` over all prompts, `batch_size` at a time (the
    engine's max_num_seqs, so both run the same concurrency)."""
    import transformers
    from transformers.utils import logging as hf_logging
    # transformers draws its loading bar whether or not stderr is a terminal; hold it to our rule.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not (progress and sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    try:
        model = _hf_model(transformers, path, config, random_weights, device, dtype)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    kwargs = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len,
                  eos_token_id=None, pad_token_id=config.pad_token_id)
    ids = torch.tensor(prompts, device=device)     # equal lengths: no padding, mask all ones
    with torch.inference_mode():
        warm = min(2, output_len)     # as the engine's warm-up: a prefill and a decode step
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]),
                       **{**kwargs, "max_new_tokens": warm, "min_new_tokens": warm})
        _sync(device)
        start = time.perf_counter()
        for chunk in ids.split(batch_size):
            out = model.generate(chunk, attention_mask=torch.ones_like(chunk), **kwargs)
            if out.shape[1] != chunk.shape[1] + output_len:
                raise RuntimeError(f"HF generated {out.shape[1] - chunk.shape[1]} tokens, not {output_len}")
        _sync(device)
    return time.perf_counter() - start


def _hf_model(transformers, path, config: OPTConfig, random_weights: bool, device: torch.device,
              dtype: torch.dtype):
    """transformers' OPTForCausalLM: random init from `config` (as opt_fast drew its weights), or
    the checkpoint at `path`."""
    if random_weights:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):   # initialised where it runs: no host copy of a large model
                model = transformers.OPTForCausalLM(transformers.OPTConfig(**config.to_hf_dict()))
        finally:
            torch.set_default_dtype(default_dtype)
    else:
        from .model.loader import resolve_model_path
        model = transformers.OPTForCausalLM.from_pretrained(str(resolve_model_path(path)), dtype=dtype)
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory torch has held allocated; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)   # bytes on macOS, KiB on Linux


def _settings(engine: Engine, model, random_weights: bool, num_prompts: int, input_len: int,
              output_len: int, temperature: float, seed: int) -> dict:
    runner = engine.runner
    kernel_ops = implementations(runner.ops)
    return dict(model=str(model), size=size_name(engine.model_config), random_weights=random_weights,
                num_parameters=engine.model_config.num_parameters(),
                dtype=str(runner.dtype).removeprefix("torch."), device=str(runner.device),
                card=card_name(runner.device), kernels=engine.cfg.kernels, kernel_ops=kernel_ops,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                torch=torch.__version__, opt_fast=__version__,
                num_prompts=num_prompts, input_len=input_len, output_len=output_len,
                temperature=temperature, seed=seed, max_num_seqs=engine.cfg.max_num_seqs,
                tensor_parallel_size=engine.cfg.tensor_parallel_size,
                num_kv_blocks=runner.num_kv_blocks, enforce_eager=engine.cfg.enforce_eager,
                enable_prefix_caching=engine.cfg.enable_prefix_caching,
                async_scheduling=engine.cfg.async_scheduling, kv_cache_dtype=engine.cfg.kv_cache_dtype)


def size_name(config: OPTConfig) -> str:
    """The published size with this shape (`opt-1.3b`), else a description of a custom shape."""
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "word_embed_proj_dim")
    for name, preset in OPT_PRESETS.items():
        if all(getattr(preset, f) == getattr(config, f) for f in shape):
            return name
    return (f"custom (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{config.num_parameters() / 1e6:.1f}M parameters)")


def card_name(device: torch.device) -> str:
    """The GPU's name, or on CPU the processor model (what a timing was measured on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:     # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def format_table(result: dict) -> str:
    """The human-readable report of a `run_bench` result."""
    r = result
    weights = ", random weights" if r["random_weights"] else ""
    sampling = "greedy" if r["temperature"] == 0 else f"temperature {r['temperature']}"
    spread = f" +-{r['random_range_ratio']:.0%}" if r.get("random_range_ratio") else ""
    arrivals = (f", Poisson arrivals at {r['request_rate']} requests/s" if r.get("request_rate")
                else ", all sent at once")
    lines = [f"opt-fast bench: {r['model']}{weights}",
             f"size {r['size']}, {r['dtype']} on {r['device']} ({r['card']}), kernels {r['kernels']}",
             f"{r['date']}, torch {r['torch']}, opt_fast {r['opt_fast']}",
             f"{r['num_prompts']} prompts x {r['input_len']}{spread} tokens in, {r['output_len']}{spread} tokens out, "
             f"{sampling}{arrivals}, max_num_seqs {r['max_num_seqs']}, {r['num_kv_blocks']} KV blocks"
             + (f" ({r['kv_cache_dtype']})" if r.get("kv_cache_dtype", "auto") != "auto" else ""), ""]
    rows = [("requests/s", r["requests_per_s"]), ("output tokens/s", r["output_tokens_per_s"]),
            *((f"{name.upper()} mean / p50 / p99 (ms)",
               f"{r[f'{name}_mean_ms']} / {r[f'{name}_p50_ms']} / {r[f'{name}_p99_ms']}"
               if r[f"{name}_p50_ms"] is not None else "- (one output token: no decode step)")
              for name in ("ttft", "tpot", "itl")),
            ("peak memory (MiB)", f"{r['peak_memory_mib']} ({r['peak_memory_source']})"),
            ("output tokens", r["output_tokens"]), ("elapsed (s)", r["elapsed_s"])]
    if "hf_output_tokens_per_s" in r:
        rows += [("HF output tokens/s", r["hf_output_tokens_per_s"]),
                 ("opt_fast / HF", f"{r['speedup_vs_hf']}x")]
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
