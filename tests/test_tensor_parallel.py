"""Tensor parallelism: two ranks (processes) on CPU over gloo against one, and against HF.

The sums of two ranks' partial products round differently from one GEMM, so logprobs are
compared to 1e-4 in float32; greedy tokens must be identical.
"""
from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from opt_fast import LLM, Engine, SamplingParams
from opt_fast.config import EngineConfig, OPTConfig
from opt_fast.context import Context
from opt_fast.engine import workers
from opt_fast.engine.model_runner import ModelRunner, resolve_device_dtype
from opt_fast.engine.workers import WorkerError, _dumps
from opt_fast.model.loader import CheckpointError
from opt_fast.parallel import check_tensor_parallel, shard_dim, take_shard
from opt_testing import assert_graph_replays, assert_same_outputs, emulate_graphs, record_preemptions
from test_parity_hf import PROMPTS, hf_greedy

TESTS = Path(__file__).resolve().parent

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)


def cpu_llm(model, tp: int, **kwargs) -> LLM:
    return LLM(str(model), dtype="float32", device="cpu", kernels=kwargs.pop("kernels", "torch"),
               tensor_parallel_size=tp, progress=False, **kwargs)


def generate(model, tp: int, prompts, params, **kwargs):
    llm = cpu_llm(model, tp, **kwargs)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.close()


# ---- sharding arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize("name, dim", [
    ("decoder.layers.3.self_attn.qkv_proj.weight", 0), ("decoder.layers.3.self_attn.qkv_proj.bias", 0),
    ("decoder.layers.0.fc1.weight", 0), ("decoder.layers.0.fc1.bias", 0),
    ("decoder.layers.0.self_attn.out_proj.weight", 1), ("decoder.layers.0.fc2.weight", 1),
    ("decoder.layers.0.self_attn.out_proj.bias", None), ("decoder.layers.0.fc2.bias", None),
    ("decoder.layers.0.final_layer_norm.weight", None), ("decoder.embed_tokens.weight", None),
    ("decoder.project_in.weight", None)])
def test_shard_dim(name, dim):
    assert shard_dim(name) == dim


def test_take_shard_slices_each_packed_part():
    hidden, world = 6, 3
    q, k, v = (torch.randn(hidden, 5) for _ in range(3))
    packed = torch.cat([q, k, v])
    for rank in range(world):
        rows = slice(rank * 2, rank * 2 + 2)
        assert torch.equal(take_shard(packed, 0, rank, world, packed=3), torch.cat([q[rows], k[rows], v[rows]]))
        assert torch.equal(take_shard(q, 0, rank, world), q[rows])
    cols = torch.randn(4, 9)
    assert torch.equal(take_shard(cols, 1, 1, 3), cols[:, 3:6])
    assert take_shard(cols, None, 1, 3) is cols


@pytest.mark.parametrize("heads, ffn, world, field", [(4, 96, 3, "num_attention_heads"), (4, 90, 4, "ffn_dim")])
def test_check_tensor_parallel_names_what_does_not_divide(heads, ffn, world, field):
    config = OPTConfig(hidden_size=64, num_attention_heads=heads, ffn_dim=ffn, word_embed_proj_dim=64)
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={world}.*{field}"):
        check_tensor_parallel(config, world)


def test_messages_carry_host_tensors_by_value():
    import pickle
    strided = torch.arange(24, dtype=torch.int64).view(4, 6)[:, ::2]
    ctx = Context(slot_mapping=torch.tensor([5, -1, 7]), num_prefill_tokens=2,
                  cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32), max_context_len=3,
                  decode_block_tables=torch.empty(0, 4, dtype=torch.int32))
    method, (tensor, sent_ctx, floats) = pickle.loads(_dumps(("m", (strided, ctx, torch.randn(3) * 0 + 0.5))))
    assert method == "m" and torch.equal(tensor, strided) and tensor.dtype == torch.int64
    assert torch.equal(sent_ctx.slot_mapping, ctx.slot_mapping) and sent_ctx.num_prefill_tokens == 2
    assert sent_ctx.cu_seqlens_q.dtype == torch.int32 and sent_ctx.context_lens is None
    assert sent_ctx.decode_block_tables.shape == (0, 4)
    assert torch.equal(floats, torch.full((3,), 0.5))


# ---- two ranks against one, and against HF ------------------------------------------------------

def test_two_ranks_match_hf_greedy_and_one_rank_logprobs(hf_checkpoint):
    shape, ckpt, hf_model = hf_checkpoint
    one = generate(ckpt, 1, PROMPTS, GREEDY)
    llm = cpu_llm(ckpt, 2)
    try:
        two = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        vocab = llm.get_tokenizer().vocab_size
    finally:
        llm.close()
    for prompt, out in zip(PROMPTS, two):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, vocab, GREEDY.max_tokens, 1.0), shape
    assert_same_outputs(one, two)


def test_two_ranks_batch_chunk_and_preempt_like_one(tiny_model_dir):
    """Mixed prefill and decode steps, prompts cut into chunks, sequences preempted and
    recomputed, seeded sampling with penalties, prompts reusing cached blocks: the same as one
    rank."""
    prompts = [[2] + [(7 * i + 3 * j) % 300 + 4 for j in range(n)] for i, n in enumerate([40, 3, 25, 17, 60, 9, 33, 1])]
    prompts += [prompts[0][:33] + [5, 6], prompts[4][:20]]        # their starts are cached by then
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=i,
                             max_tokens=20, ignore_eos=True, logprobs=1) if i % 2 else
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True) for i in range(len(prompts))]
    settings = dict(num_kv_blocks=12, block_size=8, max_num_batched_tokens=32, max_num_seqs=4)
    one = generate(tiny_model_dir, 1, prompts, params, **settings)
    llm = cpu_llm(tiny_model_dir, 2, **settings)
    try:
        preempted = record_preemptions(llm.engine)
        two = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.close()
    assert preempted, "the pool was meant to force preemption"
    assert all(len(o.outputs[0].token_ids) == 20 for o in two)
    assert [o.num_cached_tokens for o in two] == [o.num_cached_tokens for o in one]
    assert sum(o.num_cached_tokens for o in two) >= 32
    assert_same_outputs(one, two)


def test_two_ranks_random_weights_are_the_one_rank_model(tiny_model_dir):
    """load_format="dummy": each rank draws every whole tensor and keeps its slice."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    one = generate(tiny_model_dir, 1, PROMPTS[:3], params, load_format="dummy", seed=5)
    two = generate(tiny_model_dir, 2, PROMPTS[:3], params, load_format="dummy", seed=5)
    assert_same_outputs(one, two)
    other_seed = generate(tiny_model_dir, 1, PROMPTS[:3], params, load_format="dummy", seed=6)
    assert [o.outputs[0].token_ids for o in other_seed] != [o.outputs[0].token_ids for o in one]


def test_ranks_agree_on_the_smallest_kv_cache(tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 has room for fewer blocks than rank 0 (as GPUs with different free memory have):
    every rank's cache takes the smaller count, else rank 0 would hand out block ids past the
    end of rank 1's cache."""
    (tmp_path / "small_cache.py").write_text("from opt_fast.engine import model_runner\n"
                                             "model_runner._CPU_KV_CACHE_BYTES = 1 << 20\n")
    monkeypatch.setattr(workers, "_WORKER_MAIN", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                                                 f"import small_cache; {workers._WORKER_MAIN}")
    llm = cpu_llm(tiny_model_dir, 2)
    try:
        runner = llm.engine.runner
        assert runner.num_kv_blocks == (1 << 20) // runner._bytes_per_block()
        out = llm.generate([[2, 5]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 2
    finally:
        llm.close()


def test_two_ranks_with_async_scheduling_asked_for_run_in_step(tiny_model_dir):
    """With two ranks no step is launched ahead (the other ranks would need its input tokens sent
    to them; launched ahead, generation hung): the outputs are one rank's."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    one = generate(tiny_model_dir, 1, PROMPTS[:3], params)
    llm = cpu_llm(tiny_model_dir, 2, async_scheduling=True)
    try:
        assert not llm.engine.runner.can_launch_ahead(["x"])
        two = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    finally:
        llm.close()
    assert_same_outputs(one, two)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU ranks needs the interpreter, which a CUDA "
                                                     "machine's tests run without")
def test_two_ranks_on_triton_kernels(tiny_model_dir):
    """kernels="triton" (the interpreter) with two ranks: rank 0's fused out_proj/fc2 epilogue
    adds the bias and residual, the other rank's GEMM is bare."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    prompts = [[2, 17, 99, 250, 31, 8, 77], [2, 5]]
    one = generate(tiny_model_dir, 1, prompts, params)
    two = generate(tiny_model_dir, 2, prompts, params, kernels="triton")
    assert_same_outputs(one, two, atol=2e-3)


def test_two_ranks_through_the_decode_graph_path(tiny_model_dir, monkeypatch):
    """The graph path (captures emulated on CPU, opt_testing.EmulatedGraphs) on two ranks: rank 0
    stages each step, the worker loads what it staged and replays its own forward-only graph.
    Rows finish at different lengths, so batches shrink through padded sizes."""
    monkeypatch.setattr(ModelRunner, "_emulate_graphs", emulate_graphs, raising=False)
    monkeypatch.setattr(ModelRunner, "_assert_graph_replays", assert_graph_replays, raising=False)
    monkeypatch.setattr(workers, "_WORKER_MAIN", f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
                                                 f"import opt_testing; opt_testing.install_emulated_graphs(); "
                                                 f"{workers._WORKER_MAIN}")
    prompts = [[2] + [(11 * i + 5 * j) % 300 + 4 for j in range(3 + 4 * i)] for i in range(11)]
    params = [SamplingParams(temperature=0.8 if i % 2 else 0, top_p=0.9, seed=i, max_tokens=6 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    one = generate(tiny_model_dir, 1, prompts, params, max_num_seqs=16)
    llm = cpu_llm(tiny_model_dir, 2, max_num_seqs=16)
    try:
        runner = llm.engine.runner
        runner._on_all_ranks("_emulate_graphs")
        two = llm.generate(prompts, params, use_tqdm=False)
        runner._on_all_ranks("_assert_graph_replays", 10)     # the worker replayed its graphs too
    finally:
        llm.close()
    assert_same_outputs(one, two)


# ---- bad input, failures, shutdown --------------------------------------------------------------

def test_tensor_parallel_size_that_does_not_divide_the_heads_is_a_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 .*num_attention_heads=4"):
        cpu_llm(tiny_model_dir, 3)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() > 1,
                    reason="needs a machine with exactly one CUDA device")
def test_more_ranks_than_gpus_is_a_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 .*needs CUDA devices 0..1"):
        LLM(str(tiny_model_dir), device="cuda", tensor_parallel_size=2)


def test_ranks_take_consecutive_gpus_from_the_device_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = EngineConfig(tensor_parallel_size=3)
    cfg.device = "cuda:1"        # (EngineConfig itself refuses CUDA on a machine without it)
    assert [resolve_device_dtype(cfg, rank)[0] for rank in range(3)] == [torch.device("cuda", i) for i in (1, 2, 3)]
    cfg.device = "cuda:2"
    with pytest.raises(ValueError, match="tensor_parallel_size=3 from device cuda:2 needs CUDA devices 2..4; "
                                         "this machine has 4"):
        resolve_device_dtype(cfg)


def worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm.engine.runner.tp.workers.processes]


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process `pid` has exited (and been reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_close_stops_the_workers_and_the_engine(tiny_model_dir):
    llm = cpu_llm(tiny_model_dir, 2)
    processes = list(llm.engine.runner.tp.workers.processes)
    llm.close()
    assert [p.returncode for p in processes] == [0]     # stopped, not killed, and no abort on exit
    assert not dist.is_initialized()
    assert llm.engine.runner.model is None and llm.engine.runner.kv_cache is None   # memory freed
    with pytest.raises(RuntimeError, match="cannot take requests: the engine was closed"):
        llm.generate([[2, 5]], GREEDY, use_tqdm=False)


def test_a_collected_engine_stops_its_workers(tiny_model_dir):
    llm = cpu_llm(tiny_model_dir, 2)
    pids = worker_pids(llm)
    assert len(pids) == 1
    del llm
    gc.collect()
    assert all(wait_gone(pid) for pid in pids)
    assert not dist.is_initialized()


def test_a_dead_worker_fails_the_step_at_once_and_a_new_engine_starts(tiny_model_dir):
    engine = Engine(str(tiny_model_dir), dtype="float32", device="cpu", kernels="torch", tensor_parallel_size=2)
    engine.add_request("r", [2, 5, 9], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    os.kill(engine.runner.tp.workers.processes[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        engine.step()
    with pytest.raises(RuntimeError, match="cannot step"):
        engine.step()
    assert time.monotonic() - start < 10
    engine.close()
    assert not dist.is_initialized()
    assert generate(tiny_model_dir, 2, [[2, 5]], GREEDY)[0].outputs[0].finish_reason == "length"


def test_ctrl_c_at_a_terminal_does_not_reach_the_workers(tiny_model_dir):
    """Workers run in a process group of their own, so the terminal's SIGINT (sent to its
    foreground group) reaches rank 0 only, and rank 0 decides what it means."""
    llm = cpu_llm(tiny_model_dir, 2)
    try:
        pids = worker_pids(llm)
        assert len(pids) == 1 and all(os.getpgid(pid) != os.getpgid(0) for pid in pids)
    finally:
        llm.close()


def test_a_worker_failing_inside_a_collective_is_reported_with_its_own_error(tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 raises between all-reduces of a step: rank 0's broken collective is not what the
    user sees, the worker's error is."""
    (tmp_path / "fail_on_rank1.py").write_text(
        "from opt_fast import parallel\n"
        "calls = [0]\n"
        "reduce = parallel.TensorParallelGroup.all_reduce\n"
        "def all_reduce(self, partial):\n"
        "    calls[0] += 1\n"
        "    if self.rank == 1 and calls[0] == 7:\n"
        "        raise MemoryError('simulated: rank 1 out of memory in layer 1')\n"
        "    return reduce(self, partial)\n"
        "parallel.TensorParallelGroup.all_reduce = all_reduce\n")
    monkeypatch.setattr(workers, "_WORKER_MAIN", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                                                 f"import fail_on_rank1; {workers._WORKER_MAIN}")
    engine = Engine(str(tiny_model_dir), dtype="float32", device="cpu", kernels="torch", tensor_parallel_size=2,
                    num_kv_blocks=64)     # (no profiling forward: the 7th all-reduce is a step's)
    engine.add_request("r", [2, 5, 9], SamplingParams(max_tokens=50, ignore_eos=True))
    with pytest.raises(WorkerError, match="simulated: rank 1 out of memory"):
        while engine.has_unfinished_requests():
            engine.step()
    with pytest.raises(RuntimeError, match="cannot step"):
        engine.step()
    engine.close()
    assert not dist.is_initialized()


def test_a_worker_dying_while_rank_0_still_joins_leaves_no_group_behind(tiny_model_dir, tmp_path, monkeypatch):
    """The worker joins, fails on the corrupt checkpoint and exits while rank 0's side of the
    join is still returning: rank 0 gives up on the join, and leaves the group once it is made.
    Rank 0's join returns only once the worker has exited, and a beat later: a fixed delay
    lost the race when the worker took longer to fail and exit (then rank 0 went on and met the
    corrupt file itself)."""
    broken = corrupt_copy(tiny_model_dir, tmp_path)
    watch = workers.Workers.watch

    def watch_a_slow_join(self, rendezvous, discard):
        processes = list(self.processes)   # (giving up, rank 0 closes the workers and empties the list)

        def slow_rendezvous():
            group = rendezvous()
            deadline = time.monotonic() + 60
            while all(process.poll() is None for process in processes) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)   # ten of watch's polls to see the exit before this result
            return group
        return watch(self, slow_rendezvous, discard)
    monkeypatch.setattr(workers.Workers, "watch", watch_a_slow_join)
    with pytest.raises(WorkerError, match="truncated or corrupt"):
        cpu_llm(broken, 2)
    deadline = time.monotonic() + 10
    while dist.is_initialized() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dist.is_initialized()
    monkeypatch.undo()
    assert generate(tiny_model_dir, 2, [[2, 5]], GREEDY)[0].outputs[0].finish_reason == "length"


def corrupt_copy(model_dir, tmp_path) -> Path:
    """The checkpoint in `model_dir` with its safetensors file cut in half."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(model_dir).iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:len(data) // 2] if f.suffix == ".safetensors" else data)
    return broken


def test_a_corrupt_checkpoint_fails_the_start_and_leaves_nothing_running(tiny_model_dir, tmp_path):
    broken = corrupt_copy(tiny_model_dir, tmp_path)
    # (rank 0's own load fails, or, if the worker's failure wins the race, its report)
    with pytest.raises((CheckpointError, WorkerError), match="truncated or corrupt"):
        cpu_llm(broken, 2)
    assert not dist.is_initialized()
    assert generate(tiny_model_dir, 2, [[2, 5]], GREEDY)[0].outputs[0].finish_reason == "length"


def test_a_process_that_has_a_process_group_is_refused(tiny_model_dir):
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="already has a torch.distributed process group"):
            cpu_llm(tiny_model_dir, 2)
    finally:
        dist.destroy_process_group()


# ---- GPUs ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_with_graphs_match_one_gpu(tiny_model_dir):
    """NCCL, the all-reduces captured in the decode graphs: greedy tokens as on one GPU."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for tp, eager in ((1, False), (2, True), (2, False)):
        llm = LLM(str(tiny_model_dir), dtype="float32", device="cuda", tensor_parallel_size=tp,
                  enforce_eager=eager, progress=False)
        try:
            results.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
            if tp == 2 and not eager:
                assert llm.engine.runner.graphs.replays > 0
        finally:
            llm.close()
    assert results[1] == results[0] and results[2] == results[0]
