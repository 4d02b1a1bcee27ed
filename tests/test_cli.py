"""End to end through the command line and the benchmark script, on tiny local checkpoints.

Most tests call `opt_fast.cli.main` in-process, which is faster than a subprocess.
"""
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opt_fast import SamplingParams
from opt_fast.bench import format_table
from opt_fast.cli import main
from opt_fast.config import EngineConfig, preset_for
from opt_fast.tokenizer import OPTTokenizer
from opt_testing import test_device
from async_switch import FORCE_ASYNC

REPO = Path(__file__).resolve().parents[1]
PROGRESS_MARKS = ("generating", "loading weights", "benchmarking", "%|")   # lower case


def has_progress_bar(stderr: str) -> bool:
    return any(mark in stderr.lower() for mark in PROGRESS_MARKS)


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def cli(capsys, *args) -> tuple[int, str, str]:
    """`opt-fast ARGS` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json(tiny_model_dir):
    done = run("-m", "opt_fast.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "import os",
               "--prompt", "def f(x):", "--max-tokens", "5", "--temperature", "0", "--ignore-eos",
               "--kernels", "torch", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["import os", "def f(x):"]
    assert all(len(r["outputs"][0]["token_ids"]) == 5 and r["outputs"][0]["finish_reason"] == "length"
               for r in rows)


def test_generate_beam_search(capsys, tiny_model_dir):
    from opt_fast import LLM, BeamSearchParams
    rc, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
                       "--prompt", "import os", "--beam-width", "3", "--max-tokens", "5", "--ignore-eos", "--json")
    assert rc == 0, err
    beams = json.loads(out)["beams"]
    want = LLM(str(tiny_model_dir), device=test_device(), kernels="torch").beam_search(
        "import os", BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))[0].sequences
    assert [b["token_ids"] for b in beams] == [w.token_ids for w in want]
    assert [b["score"] for b in beams] == sorted((b["score"] for b in beams), reverse=True)
    rc, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "import os", "--beam-width", "2",
                       "--temperature", "0.5", "--n", "2")
    assert rc == 2 and "--beam-width does not combine with --n, --temperature" in err


def test_generate_reports_bad_input_without_a_traceback(tiny_model_dir):
    done = run("-m", "opt_fast.cli", "generate", "--model", str(tiny_model_dir), "--prompt", "x",
               "--top-p", "1.5")
    assert done.returncode == 2
    assert "top_p" in done.stderr and "Traceback" not in done.stderr


def test_generate_sampling_flags_n_and_prompts_file(capsys, monkeypatch, tmp_path, tiny_model_dir):
    from opt_fast.llm import LLM
    received = []
    real_generate = LLM.generate

    def spy(self, prompts, params=None, **kwargs):
        received.append(params)
        return real_generate(self, prompts, params, **kwargs)
    monkeypatch.setattr(LLM, "generate", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\ndef f(x):\n", encoding="utf-8")
    args = ["generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
            "--prompts-file", prompts, "--n", "3", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95",
            "--repetition-penalty", "1.3", "--max-tokens", "6", "--min-tokens", "6",
            "--logprobs", "2", "--stop-token-ids", "5", "7", "--json"]
    rc, out, err = cli(capsys, *args, "--seed", "11")
    assert rc == 0, err
    # every flag reaches the sampler
    [params] = received
    assert (params.n, params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (3, 0.9, 50, 0.95, 1.3)
    assert (params.max_tokens, params.min_tokens, params.logprobs, params.seed) == (6, 6, 2, 11)
    assert params.stop_token_ids == [5, 7] and not params.ignore_eos
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["import os", "def f(x):"]     # the blank line is skipped
    for row in rows:
        assert len(row["outputs"]) == 3
        for c in row["outputs"]:
            # min_tokens = max_tokens: neither EOS nor the stop ids may end a sample early
            assert len(c["token_ids"]) == 6 and c["finish_reason"] == "length"
            assert len(c["logprobs"]) == 6
            assert all(str(t) in lp and len(lp) <= 3 for t, lp in zip(c["token_ids"], c["logprobs"]))
            assert c["cumulative_logprob"] == pytest.approx(
                sum(lp[str(t)] for t, lp in zip(c["token_ids"], c["logprobs"])), abs=1e-4)
    assert len({tuple(c["token_ids"]) for c in rows[0]["outputs"]}) > 1    # n samples, not n copies
    reseeded = cli(capsys, *args, "--seed", "12")[1]
    assert reseeded != out        # --seed reaches the sampler (a fresh LLM would repeat itself)


def test_generate_stop_string_and_stop_token_id(capsys, tiny_model_dir):
    base = ["generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
            "--prompt", "import os", "--temperature", "0", "--max-tokens", "24", "--ignore-eos", "--json"]
    rc, out, err = cli(capsys, *base)
    assert rc == 0, err
    full = json.loads(out)["outputs"][0]
    text, tokens = full["text"], full["token_ids"]
    assert len(text) > 6, "the greedy text is too short to cut"
    stop = text[4:6]
    rc, out, err = cli(capsys, *base, "--stop", stop, "--stop", "never appears \u2603")
    assert rc == 0, err
    cut = json.loads(out)["outputs"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    # A stop token id ends the sample at its first occurrence (the id itself is kept).
    at = tokens.index(tokens[3])
    unused = next(i for i in range(4, 400) if i not in tokens)
    rc, out, err = cli(capsys, *base, "--stop-token-ids", tokens[3], str(unused))
    assert rc == 0, err
    cut = json.loads(out)["outputs"][0]
    assert cut["token_ids"] == tokens[:at + 1] and cut["finish_reason"] == "stop"


def test_generate_defaults_to_the_bundled_model(capsys, monkeypatch, tiny_model_dir):
    bundled = pytest.importorskip("opt_fast.bundled")
    monkeypatch.setattr(bundled, "default_model_dir", lambda: tiny_model_dir)
    rc, out, err = cli(capsys, "generate", "--prompt", "import os", "--max-tokens", "2", "--device",
                       test_device(), "--kernels", "torch", "--json")
    assert rc == 0, err
    assert len(json.loads(out)["outputs"][0]["token_ids"]) == 2


BENCH_KEYS = {"model", "size", "random_weights", "num_parameters", "dtype", "device", "card", "kernels",
              "kernel_ops", "date", "torch", "opt_fast", "num_prompts", "input_len", "output_len",
              "temperature", "seed", "max_num_seqs", "num_kv_blocks", "enforce_eager", "elapsed_s",
              "output_tokens", "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
              "tpot_p50_ms", "tpot_p99_ms", "peak_memory_mib", "peak_memory_source", "request_rate",
              "ttft_mean_ms", "tpot_mean_ms", "itl_mean_ms", "itl_p50_ms", "itl_p99_ms"}


def test_bench_json(capsys, tiny_model_dir):
    # 5 requests, 2 at a time: later ones wait, so TTFTs spread and p50 < p99. Prompts of two
    # full blocks and more: none may find its blocks cached (from the warm-up, say).
    rc, out, err = cli(capsys, "bench", "--model", tiny_model_dir, "--device", test_device(),
                       "--kernels", "torch", "--num-prompts", "5", "--input-len", "40", "--output-len", "6",
                       "--max-num-seqs", "2", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert BENCH_KEYS <= report.keys() and "hf_output_tokens_per_s" not in report
    assert report["output_tokens"] == 5 * 6 and report["size"].startswith("custom")
    assert report["device"].startswith(test_device()) and report["kernels"] == "torch"
    assert set(report["kernel_ops"].values()) == {"torch"}
    assert 0 < report["ttft_p50_ms"] < report["ttft_p99_ms"] <= report["elapsed_s"] * 1e3
    assert 0 < report["tpot_p50_ms"] <= report["tpot_p99_ms"]
    assert 0 < report["itl_p50_ms"] <= report["itl_p99_ms"]
    # one token per output and six per request: the mean gap between a request's tokens is the
    # mean TPOT (each request's TPOT is the mean of its five gaps)
    assert report["itl_mean_ms"] == pytest.approx(report["tpot_mean_ms"], abs=2e-3)
    assert report["ttft_mean_ms"] <= report["ttft_p99_ms"]
    assert report["output_tokens_per_s"] == pytest.approx(30 / report["elapsed_s"], rel=1e-2)
    assert report["requests_per_s"] == pytest.approx(5 / report["elapsed_s"], rel=1e-2)
    assert report["peak_memory_mib"] > 0 and report["prompt_tokens_reused"] == 0
    # the engine's defaults (async scheduling is forced on by OPT_FAST_TEST_ASYNC=1, async_switch.py)
    assert report["enable_prefix_caching"] is True
    assert report["async_scheduling"] is (FORCE_ASYNC or EngineConfig().async_scheduling)
    assert report["kv_cache_dtype"] == "auto"
    assert report["request_rate"] is None       # all sent at once


@pytest.mark.parametrize("flags, key, value", [(["--no-prefix-caching"], "enable_prefix_caching", False),
                                               (["--async-scheduling"], "async_scheduling", True),
                                               (["--kv-cache-dtype", "fp8"], "kv_cache_dtype", "fp8"),
                                               (["--dtype", "bfloat16"], "dtype", "bfloat16"),
                                               (["--enforce-eager"], "enforce_eager", True),
                                               (["--num-kv-blocks", "40"], "num_kv_blocks", 40),
                                               (["--tp", "2"], "tensor_parallel_size", 2)])
def test_engine_flags_reach_the_engine(capsys, tiny_model_dir, flags, key, value):
    device = "cpu" if "--tp" in flags else test_device()
    rc, out, err = cli(capsys, "bench", "--model", tiny_model_dir, "--device", device, "--kernels", "torch",
                       "--num-prompts", "2", "--input-len", "20", "--output-len", "2", *flags, "--json")
    assert rc == 0, err
    assert json.loads(out)[key] == value


def test_max_model_len_flag_reaches_the_engine(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
                       "--prompt", "import os", "--max-tokens", "20", "--max-model-len", "8")
    assert rc == 2 and "max_model_len=8" in err


def test_beam_flags_reach_beam_search(capsys, monkeypatch, tiny_model_dir):
    """--ignore-eos and --length-penalty reach BeamSearchParams; the JSON holds the prompt's ids,
    each beam's own cumulative logprob and its score; --logprobs does not combine with beams."""
    from opt_fast import LLM, BeamSearchParams
    received = []
    real = LLM.beam_search
    monkeypatch.setattr(LLM, "beam_search", lambda self, prompts, params: received.append(params)
                        or real(self, prompts, params))
    rc, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
                       "--prompt", "import os", "--beam-width", "2", "--max-tokens", "3", "--ignore-eos",
                       "--length-penalty", "0.5", "--json")
    assert rc == 0, err
    assert received == [BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True, length_penalty=0.5)]
    row = json.loads(out)
    assert row["prompt_token_ids"] == OPTTokenizer.from_dir(tiny_model_dir).encode("import os")
    for beam in row["beams"]:
        assert beam["score"] == pytest.approx(beam["cumulative_logprob"] / len(beam["token_ids"]) ** 0.5)
    rc, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x", "--beam-width", "2",
                       "--logprobs", "1")
    assert rc == 2 and "--logprobs" in err


def test_text_output_labels_each_of_n_samples(capsys, tiny_model_dir):
    rc, out, err = cli(capsys, "generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
                       "--prompt", "import os", "--max-tokens", "2", "--n", "2")
    assert rc == 0, err
    assert [line[:4] for line in out.splitlines()] == ["[0] ", "[1] "]


def test_bench_random_range_ratio_draws_seeded_lengths(capsys, tiny_model_dir):
    """Each request's lengths uniform within +-50%: the report's token counts are their sums,
    and a rerun draws the same."""
    reports = []
    for _ in range(2):
        rc, out, err = cli(capsys, "bench", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
                           "--num-prompts", "6", "--input-len", "20", "--output-len", "8", "--max-num-seqs", "3",
                           "--random-range-ratio", "0.5", "--json")
        assert rc == 0, err
        reports.append(json.loads(out))
    report = reports[0]
    assert report["random_range_ratio"] == 0.5 and 6 * 10 <= report["input_tokens"] <= 6 * 30
    # no timed prompt shares a block with the warm-up's (at seed 0 one did: a review found 16 reused)
    assert report["prompt_tokens_reused"] == 0
    assert 6 * 4 <= report["output_tokens"] <= 6 * 12 and report["output_tokens"] != 6 * 8
    assert (reports[1]["input_tokens"], reports[1]["output_tokens"]) == (report["input_tokens"], report["output_tokens"])
    assert "+-50%" in format_table(report)


def test_bench_request_rate_sends_requests_at_seeded_poisson_arrivals(capsys, monkeypatch, tiny_model_dir):
    """With --request-rate each request enters the engine no earlier than its arrival (recorded
    at add_request), arrivals are a seeded Poisson process from t0, and TTFT counts from each
    arrival: it stays below the time from t0 to the first token."""
    import opt_fast.bench as bench
    from opt_fast.engine.engine import Engine
    added, real_add = {}, Engine.add_request

    def add_request(self, request_id, *args, **kwargs):
        added[request_id] = time.perf_counter()
        return real_add(self, request_id, *args, **kwargs)
    monkeypatch.setattr(Engine, "add_request", add_request)
    timings = []
    real_time_engine = bench._time_engine

    def time_engine(engine, prompts, params, arrivals, progress):
        start = time.perf_counter()
        timings.append((start, arrivals))
        return real_time_engine(engine, prompts, params, arrivals, progress)
    monkeypatch.setattr(bench, "_time_engine", time_engine)
    rc, out, err = cli(capsys, "bench", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
                       "--num-prompts", "6", "--input-len", "20", "--output-len", "4", "--request-rate", "20",
                       "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["request_rate"] == 20 and report["output_tokens"] == 24
    [(start, arrivals)] = timings
    assert arrivals == bench._arrival_times(6, 20.0, 0) and arrivals[0] == 0.0
    assert all(b > a for a, b in zip(arrivals, arrivals[1:]))
    for i, arrival in enumerate(arrivals):
        assert added[f"bench-{i}"] >= start + arrival
    # the last request arrives about 5 gaps of 50 ms after t0 (seeded), and the run waits for it
    assert report["elapsed_s"] >= arrivals[-1]
    assert report["ttft_p99_ms"] < report["elapsed_s"] * 1e3
    assert "Poisson arrivals at 20.0 requests/s" in format_table(report)


class _FakeClock:
    """time.perf_counter and time.sleep for opt_fast.bench: time moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.now += seconds


class _FakeEngine:
    """Each step takes 10 ms of the fake clock and gives every admitted request one more token
    (cumulative outputs); the clock's value at each add is recorded."""
    STEP = 0.010

    def __init__(self, clock, tokens: int):
        self.clock, self.tokens = clock, tokens
        self.requests, self.added, self.added_while_busy = {}, {}, []

    def add_request(self, request_id, prompt, params):
        self.added[request_id] = self.clock.now
        if self.requests:
            self.added_while_busy.append(request_id)
        self.requests[request_id] = []

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.clock.now += self.STEP
        outputs = []
        for request_id, ids in list(self.requests.items()):
            ids.append(7)
            finished = len(ids) == self.tokens
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished, num_cached_tokens=0,
                                           outputs=[SimpleNamespace(token_ids=list(ids))]))
            if finished:
                del self.requests[request_id]
        return outputs


def test_bench_times_each_request_from_its_arrival(monkeypatch):
    """On a fake clock and engine (10 ms a step, 3 tokens a request): requests join at the step
    boundary after their arrival, also while others decode; an idle engine waits for the next
    arrival; TTFT counts from each arrival; ITL and TPOT are the 10 ms steps."""
    import opt_fast.bench as bench
    clock = _FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(bench.time, "sleep", clock.sleep)
    engine = _FakeEngine(clock, tokens=3)
    arrivals = [0.0, 0.015, 0.1]      # the second arrives mid-step of the first; the third after both end
    params = [SamplingParams(max_tokens=3)] * 3
    result = bench._time_engine(engine, [[2]] * 3, params, arrivals, progress=False)
    t0 = 100.0
    assert engine.added == {"bench-0": t0, "bench-1": pytest.approx(t0 + 0.02), "bench-2": pytest.approx(t0 + 0.1)}
    assert engine.added_while_busy == ["bench-1"]
    # first tokens at 10, 30 and 110 ms: TTFT 10, 15 and 10 ms from the arrivals
    assert result["ttft_mean_ms"] == pytest.approx((10 + 15 + 10) / 3, abs=1e-3)   # rounded to us
    assert result["ttft_p50_ms"] == pytest.approx(10.0)
    assert result["tpot_mean_ms"] == pytest.approx(10.0) and result["itl_p99_ms"] == pytest.approx(10.0)
    assert result["elapsed_s"] == pytest.approx(0.13)          # the last request ends at 130 ms
    assert result["output_tokens"] == 9


def test_bench_arrival_times_are_a_seeded_poisson_process():
    from opt_fast.bench import _arrival_times
    assert _arrival_times(3, math.inf, 0) == [0.0, 0.0, 0.0]
    times = _arrival_times(4001, 50.0, 1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and min(gaps) > 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.05)     # mean gap 1 / rate
    assert _arrival_times(4001, 50.0, 1) == times and _arrival_times(4001, 50.0, 2) != times


@pytest.mark.parametrize("rate, compare", [(0, None), (-1.0, None), (True, None), ("5", None), (math.nan, None),
                                           (1e-320, None), (10.0, "hf")])
def test_bench_request_rate_is_checked(tiny_model_dir, rate, compare):
    from opt_fast.bench import run_bench
    with pytest.raises(ValueError, match="request_rate"):
        run_bench(str(tiny_model_dir), 2, 8, 2, device="cpu", kernels="torch", request_rate=rate, compare=compare)


@pytest.mark.parametrize("ratio, compare", [(1.0, None), (-0.1, None), (0.2, "hf")])
def test_bench_random_range_ratio_is_checked(tiny_model_dir, ratio, compare):
    from opt_fast.bench import run_bench
    with pytest.raises(ValueError, match="random_range_ratio"):
        run_bench(str(tiny_model_dir), 2, 8, 2, device="cpu", kernels="torch", random_range_ratio=ratio,
                  compare=compare)


def test_bench_prompts_are_seeded_token_ids_after_bos():
    from opt_fast.bench import _random_prompts
    prompts = _random_prompts(3, 9, vocab_size=50, seed=4)
    assert [len(p) for p in prompts] == [9, 9, 9] and all(p[0] == 2 for p in prompts)
    assert all(4 <= t < 50 for p in prompts for t in p[1:])
    assert prompts == _random_prompts(3, 9, vocab_size=50, seed=4) != _random_prompts(3, 9, 50, seed=5)


def test_bench_random_weights_preset(capsys):
    rc, out, err = cli(capsys, "bench", "--model", "opt-125m-en", "--random-weights", "--device",
                       test_device(), "--kernels", "torch", "--num-prompts", "2", "--input-len", "8",
                       "--output-len", "4", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["size"] == "opt-125m" and report["random_weights"] is True
    assert report["num_parameters"] == preset_for("opt-125m").num_parameters()
    assert report["output_tokens"] == 8 and report["output_tokens_per_s"] > 0


def test_bench_compare_hf(capsys, tiny_model_dir):
    pytest.importorskip("transformers")
    rc, out, err = cli(capsys, "bench", "--model", tiny_model_dir, "--device", test_device(),
                       "--kernels", "torch", "--num-prompts", "3", "--input-len", "8", "--output-len", "5",
                       "--compare", "hf", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["hf_batch_size"] == 3
    assert report["hf_output_tokens_per_s"] == pytest.approx(15 / report["hf_elapsed_s"], rel=1e-2)
    assert report["speedup_vs_hf"] == pytest.approx(
        report["output_tokens_per_s"] / report["hf_output_tokens_per_s"], rel=1e-2)
    assert not has_progress_bar(err), err    # transformers' loading bar included, off a terminal
    rows = dict(line.split("  ", 1) for line in format_table(report).splitlines() if "  " in line)
    assert rows["HF output tokens/s"].strip() == str(report["hf_output_tokens_per_s"])
    assert rows["opt_fast / HF"].strip() == f"{report['speedup_vs_hf']}x"


def test_bench_compare_hf_without_transformers(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)    # import transformers -> ImportError
    rc, out, err = cli(capsys, "bench", "--model", tiny_model_dir, "--compare", "hf", "--json")
    assert rc == 2 and out == ""
    assert "transformers" in err and err.startswith("opt-fast: error:")


@pytest.mark.parametrize("args, named", [
    (["bench", "--num-prompts", "0"], "--num-prompts"),
    (["bench", "--output-len", "x"], "--output-len"),
    (["bench", "--compare", "vllm"], "--compare"),
    (["generate", "--prompt", "x", "--dtype", "float64"], "--dtype"),
])
def test_bad_flag_values_exit_2_naming_the_flag(capsys, args, named):
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["generate", "--prompt", "x", "--top-k", "-5"], "top_k"),
    (["generate", "--prompt", "x", "--max-num-seqs", "0"], "max_num_seqs"),
    (["bench", "--random-weights", "--model", "opt-7b"], "opt-7b"),
    (["bench", "--input-len", "250", "--output-len", "10"], "max_model_len"),
])
def test_bad_values_found_later_exit_2_without_a_traceback(capsys, tiny_model_dir, args, named):
    model = [] if "--model" in args else ["--model", tiny_model_dir]
    rc, out, err = cli(capsys, *args, *model, "--kernels", "torch", "--device", test_device())
    assert rc == 2 and named in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["foo", "tpu", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_bad_device_exits_2_without_a_traceback(capsys, tiny_model_dir, device):
    rc, out, err = cli(capsys, "generate", "--prompt", "x", "--model", tiny_model_dir, "--kernels", "torch",
                       "--device", device)
    assert rc == 2 and "device" in err and "Traceback" not in err


def test_prompts_from_stdin_and_a_file_with_a_byte_order_mark(capsys, monkeypatch, tmp_path, tiny_model_dir):
    """`--prompts-file -` reads standard input; a UTF-8 byte-order mark is not part of a prompt;
    both give the prompts of --prompt."""
    base = ["generate", "--model", tiny_model_dir, "--device", test_device(), "--kernels", "torch",
            "--max-tokens", "3", "--temperature", "0", "--ignore-eos", "--json"]
    rc, expected, err = cli(capsys, *base, "--prompt", "import os", "--prompt", "def f(x):")
    assert rc == 0, err
    bom = tmp_path / "prompts.txt"
    bom.write_bytes("\ufeffimport os\r\n\r\ndef f(x):\r\n".encode("utf-8"))
    rc, out, err = cli(capsys, *base, "--prompts-file", bom)
    assert rc == 0 and out == expected, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("import os\ndef f(x):\n"))
    rc, out, err = cli(capsys, *base, "--prompts-file", "-")
    assert rc == 0 and out == expected, err


def test_no_progress_bars_off_a_terminal(capsys, tiny_model_dir):
    # Text output (not --json), so only the terminal check keeps the bars off: here stderr is
    # pytest's capture, not a TTY.
    common = ["--model", tiny_model_dir, "--kernels", "torch", "--device", test_device()]
    rc, out, err = cli(capsys, "generate", "--prompt", "import os", "--max-tokens", "3", *common)
    assert rc == 0 and not has_progress_bar(err), err
    assert out.startswith("'import os' ->")
    rc, out, err = cli(capsys, "bench", "--num-prompts", "2", "--input-len", "8", "--output-len", "3",
                       *common)
    assert rc == 0 and not has_progress_bar(err), err
    assert "output tokens/s" in out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_unless_json(capsys, monkeypatch, tiny_model_dir):
    bench = [str(a) for a in ("bench", "--model", tiny_model_dir, "--num-prompts", 2, "--input-len", 8,
                              "--output-len", 3, "--kernels", "torch", "--device", test_device())]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(bench) == 0
    assert "loading weights" in terminal.getvalue() and "benchmarking" in terminal.getvalue()
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*bench, "--json"]) == 0
    assert not has_progress_bar(terminal.getvalue()), terminal.getvalue()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["output_tokens"] == 6
    generate = [str(a) for a in ("generate", "--model", tiny_model_dir, "--prompt", "import os",
                                 "--max-tokens", 2, "--kernels", "torch", "--device", test_device())]
    for flags, shown in (([], True), (["--json"], False)):
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main([*generate, *flags]) == 0
        if shown:
            assert "generating" in terminal.getvalue(), terminal.getvalue()
        else:
            assert not has_progress_bar(terminal.getvalue()), terminal.getvalue()


def test_bench_generate_smoke(tmp_path):
    done = run("benchmarks/bench_generate.py", "--smoke", "--sizes", "opt-350m", "--num-prompts", "2",
               "--input-len", "8", "--output-len", "3", "--modes", "default", "async", "triton", "cublas-linears",
               "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_generate.json").read_text())
    assert [(r["size"], r["mode"]) for r in report["rows"]] == [("opt-350m", "default"), ("opt-350m", "async"),
                                                                ("opt-350m", "triton"), ("opt-350m", "cublas-linears")]
    assert all(r["opt_fast_tok_s"] > 0 for r in report["rows"])
    # every mode, the triton one on the Triton kernels (the interpreter here), gave HF's greedy
    # tokens (all 3 of each prompt: the smoke's output length)
    assert [r["first16_greedy_agreement"] for r in report["rows"]] == [1.0] * 4
    assert "`triton` and `triton-async` run every op as a Triton kernel (kernels='triton': layernorm_linear: " \
           "triton" in (tmp_path / "bench_generate.md").read_text()
    assert (tmp_path / "bench_generate.md").read_text().startswith("# LLM.generate vs HF generate")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto's rule as the interpreter sees it (an sm_90)")
def test_bench_generate_cublas_linears_mode_turns_the_fused_rule_off_for_its_run(monkeypatch):
    """`cublas-linears`: inside the run, auto's LayerNorm GEMMs go to torch at every size (where
    the fused kernel would take 8 fp16 rows); after it, the rule is the kernels' own again."""
    import importlib.util
    import opt_fast.kernels as kernels
    spec = importlib.util.spec_from_file_location("bench_generate_under_test", REPO / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = []
    monkeypatch.setattr(kernels.layernorm_linear, "layernorm_linear", lambda *args: ran.append("triton"))
    monkeypatch.setattr(kernels.layernorm_linear, "layernorm_linear_ref", lambda *args: ran.append("torch"))
    x, w = torch.randn(8, 40).half(), torch.randn(24, 40).half()
    ln_w, ln_b, b = torch.ones(40).half(), torch.zeros(40).half(), torch.zeros(24).half()

    def auto_runs() -> str:
        kernels.auto_layernorm_linear(x, ln_w, ln_b, w, b, 1e-5)
        return ran.pop()
    real = kernels.takes_ln_options
    assert auto_runs() == "triton"
    with bench.ln_gemms_on_cublas(False):
        assert auto_runs() == "triton"
    with bench.ln_gemms_on_cublas(True):
        assert auto_runs() == "torch"
    assert kernels.takes_ln_options is real and auto_runs() == "triton"
    kernels_name, options, context = bench.mode_options("cublas-linears", "auto")
    assert (kernels_name, options) == ("auto", {})
    with context:
        assert auto_runs() == "torch"


def test_bench_launch_overhead_smoke(tmp_path):
    done = run("benchmarks/bench_launch_overhead.py", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "launch_overhead.json").read_text())["rows"]
    assert [r["op"] for r in rows][1:] == ["prefill_attention", "write_kv_cache", "paged_decode_attention",
                                           "layernorm_linear", "sample"]
    assert all(r["ours_us"] > 0 and r["peer_us"] > 0 for r in rows)


def test_profile_generate_smoke(tmp_path):
    done = run("benchmarks/profile_generate.py", "--smoke", "--size", "opt-125m", "--num-prompts", "2",
               "--input-len", "8", "--output-len", "3", "--modes", "default", "async", "--top", "40",
               "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert [r["mode"] for r in report["results"]] == ["default", "async"]
    for result in report["results"]:
        assert result["tokens"] == 2 * 3 and 0 < len(result["rows"]) <= 40
        assert result["traced_us"] >= sum(row["total_us"] for row in result["rows"]) > 0
        # CPU ops off CUDA; on CUDA device kernels, among them ours (named *_kernel)
        wanted = "_kernel" if torch.cuda.is_available() else "aten::"
        assert any(wanted in row["name"] for row in result["rows"]), result["rows"]
    assert "## mode `async`" in (tmp_path / "profile.md").read_text()


# `opt-fast ARGS` in a fresh process that also says, on stderr, how many tensor-parallel worker
# processes its LLM started (0 for one rank)
_CLI_COUNTING_WORKERS = """
import sys
from opt_fast import llm as llm_module
from opt_fast.cli import main
init = llm_module.LLM.__init__
def counting(self, *args, **kwargs):
    init(self, *args, **kwargs)
    tp = self.engine.runner.tp
    print("tp workers:", 0 if tp is None else len(tp.workers.processes), file=sys.stderr)
llm_module.LLM.__init__ = counting
sys.exit(main(sys.argv[1:]))
"""


def test_generate_with_two_tensor_parallel_ranks(tiny_model_dir):
    """--tp 2 from a CLI process: one worker process beside it, the same tokens and logprobs as
    one rank, and the process exits (its worker with it) without being told to."""
    outputs = []
    for tp, workers in (("1", 0), ("2", 1)):
        done = run("-c", _CLI_COUNTING_WORKERS, "generate", "--model", str(tiny_model_dir), "--prompt", "import os",
                   "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--kernels", "torch",
                   "--device", "cpu", "--tp", tp, "--logprobs", "1", "--json", timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"tp workers: {workers}" in done.stderr, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout)["outputs"][0])
    assert len(outputs[0]["token_ids"]) == 6 and outputs[1]["token_ids"] == outputs[0]["token_ids"]
    # the two ranks' shards sum to one rank's layers: logprobs equal to float32 rounding
    one, two = ([v for step in out["logprobs"] for v in step.values()] for out in outputs)
    assert two == pytest.approx(one, abs=1e-4)
