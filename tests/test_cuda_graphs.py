"""The CUDA-graph decode step: graph replays give the eager step's tokens.

On CPU the capture itself is emulated (a replay re-runs the captured step into the same static
outputs), which still tests what the graph path adds: the static buffers refilled each step,
padding rows, the graph's built-in sampling and the eager fallback for penalties and bans. On
CUDA the real graphs are tested, and the KV pool sizing from free device memory.
"""
from __future__ import annotations

import gc
import json

import pytest
import torch

from opt_testing import EmulatedGraphs, test_device
from opt_fast import LLM, Engine, SamplingParams
from opt_fast.config import preset_for
from opt_fast.engine.cuda_graphs import graph_batch_sizes

on_cuda = pytest.mark.skipif(test_device() != "cuda", reason="needs a CUDA device")


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, 400, (n,), generator=g).tolist()
            for n in torch.randint(1, 40, (count,), generator=g).tolist()]


PARAMS = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
          SamplingParams(temperature=1.0, top_k=3, top_p=0.9, max_tokens=20, seed=5, ignore_eos=True),
          # not plain: the graph's draw is redone eagerly with the penalty / the min_tokens ban
          SamplingParams(temperature=0.7, repetition_penalty=1.5, max_tokens=20, seed=6, ignore_eos=True),
          SamplingParams(temperature=0, min_tokens=5, max_tokens=20, stop_token_ids=[7, 8, 9])]


def test_graph_batch_sizes():
    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def _varied(params: SamplingParams, row: int) -> SamplingParams:
    """The row's own length (8 to 20 tokens): the batch shrinks as rows finish, so the graphs
    see changed batches (a full refill, padding rows) as well as repeated ones."""
    return SamplingParams(**{**params.__dict__, "max_tokens": 8 + 3 * (row % 5)})


def _row_params(kind: str, batch: list) -> list[SamplingParams]:
    if kind == "banned":
        # bans alone (no penalty, no min_tokens) on every other greedy row, half the tiny
        # vocabulary: they too must send the batch's draw to eager
        banned = SamplingParams(temperature=0, max_tokens=20, banned_token_ids=list(range(4, 200)), ignore_eos=True)
        return [_varied(banned if i % 2 else PARAMS[0], i) for i in range(len(batch))]
    if kind == "penalty":
        # penalties alone (no ban, no min_tokens) on every other greedy row, HF's on logits and
        # FlagAI's on log-probabilities: only the plain flag sends the batch's draw to eager
        penalised = [SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=20, ignore_eos=True),
                     SamplingParams(temperature=0, repetition_penalty=3.0, penalty_on_logprobs=True, max_tokens=20,
                                    ignore_eos=True)]
        return [_varied(penalised[i // 2 % 2] if i % 2 else PARAMS[0], i) for i in range(len(batch))]
    if kind != "min_tokens":
        kinds = 2 if kind == "plain" else 4
        return [_varied(PARAMS[i % kinds], i) for i in range(len(batch))]
    # Greedy rows, every other one banned (min_tokens 5) from half the tiny vocabulary (400 ids):
    # the batch is plain apart from the bans, so only the min_tokens check sends its draws to
    # eager while the bans last (the graph's own draw would often pick a banned id), and the
    # graph draws afterwards.
    banned = SamplingParams(temperature=0, min_tokens=5, stop_token_ids=list(range(4, 200)), ignore_eos=True)
    return [_varied(banned if i % 2 else PARAMS[0], i) for i in range(len(batch))]


# "plain" batches draw inside the graph; any penalty or ban row sends the batch's draw to eager.
@pytest.mark.parametrize("kind", ["plain", "mixed", "min_tokens", "banned", "penalty"])
def test_emulated_graph_step_equals_eager(tiny_model_dir, kind):
    batch = prompts(11, seed=1)                   # 11 rows: replayed as the padded size 16
    params = _row_params(kind, batch)
    eager = LLM(str(tiny_model_dir), device="cpu", kernels="torch", max_num_seqs=16)
    expected = eager.generate(batch, params, use_tqdm=False)
    graphed = LLM(str(tiny_model_dir), device="cpu", kernels="torch", max_num_seqs=16)
    runner = graphed.engine.runner
    runner.graphs = EmulatedGraphs(runner)
    assert runner.graphs.sizes == [1, 2, 4, 8, 16]
    # Poison the host staging buffers every refill copies from, so a row the refill forgets
    # cannot pass unnoticed (slot 3 and block 5 belong to real sequences).
    runner.graphs.host_i64.fill_(3)
    runner.graphs.host_i32.fill_(5)
    runner.graphs.host_f32.fill_(2.5)
    got = graphed.generate(batch, params, use_tqdm=False)
    assert runner.graphs.replays >= 19
    for want, have, row in zip(expected, got, params):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        assert not set(have.outputs[0].token_ids) & set(row.banned_token_ids)
    assert len({len(out.outputs[0].token_ids) for out in got}) > 1
    # every graph writes its logits into the first rows of one buffer, none keeps its own
    assert all(logits.data_ptr() == runner.graphs.logits.data_ptr() for logits, _, _ in runner.graphs.outputs.values())


@on_cuda
@pytest.mark.parametrize("kind", ["plain", "mixed", "min_tokens", "banned", "penalty"])
def test_cuda_graphs_give_the_eager_tokens(tiny_model_dir, kind):
    batch = prompts(13, seed=2)
    params = _row_params(kind, batch)
    kwargs = dict(dtype="float32", max_num_seqs=32)
    eager = LLM(str(tiny_model_dir), enforce_eager=True, **kwargs)
    assert eager.engine.runner.graphs is None
    expected = eager.generate(batch, params, use_tqdm=False)
    graphed = LLM(str(tiny_model_dir), **kwargs)
    graphs = graphed.engine.runner.graphs
    assert graphs is not None and graphs.sizes[-1] == 32
    got = graphed.generate(batch, params, use_tqdm=False)
    assert graphs.replays >= 19
    for want, have in zip(expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids


def _free_device_memory() -> None:
    gc.collect()         # an engine waiting for the cyclic garbage collector keeps its KV pool
    torch.cuda.empty_cache()


@pytest.fixture
def engines():
    """Engines a memory-share test builds, closed after it; before it, nothing of earlier tests
    in this worker is held or counted in the peak the test reads."""
    _free_device_memory()
    torch.cuda.reset_peak_memory_stats()
    built = []
    yield built
    for engine in built:
        engine.close()
    _free_device_memory()


@on_cuda
def test_kv_pool_is_sized_from_free_device_memory(tmp_path, engines):
    (tmp_path / "config.json").write_text(json.dumps(preset_for("opt-125m").to_hf_dict()))
    total = torch.cuda.mem_get_info()[1]
    utilization = 0.25
    eng = Engine(str(tmp_path), load_format="dummy", gpu_memory_utilization=utilization,
                 max_num_seqs=1024, enforce_eager=True)
    engines.append(eng)
    runner = eng.runner
    cap = 1024 * 2048 // 16                      # what 1024 full-length sequences could use
    assert 0 < eng.blocks.num_blocks < cap, "the budget, not the cap, was meant to bind"
    kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    # Most of the share goes to the cache (unless other test processes hold most of the device).
    free_before = torch.cuda.mem_get_info()[0] + kv_bytes
    assert kv_bytes > 0.5 * min(utilization * total - weights, free_before)
    eng.add_request("r", [2, 5, 6, 7], SamplingParams(max_tokens=4))
    while eng.has_unfinished_requests():
        eng.step()
    assert torch.cuda.max_memory_reserved() <= utilization * total


@on_cuda
def test_decode_graphs_stay_within_the_memory_share(tmp_path, engines):
    """A graph for every batch size of max_num_seqs 256 (35) on top of a KV pool sized from the
    share: their pool holds one step's intermediates, not a logits tensor per graph (0.8 GiB of
    them before)."""
    (tmp_path / "config.json").write_text(json.dumps(preset_for("opt-125m").to_hf_dict()))
    total = torch.cuda.mem_get_info()[1]
    utilization = 0.25
    eng = Engine(str(tmp_path), load_format="dummy", gpu_memory_utilization=utilization, max_num_seqs=256)
    engines.append(eng)
    graphs = eng.runner.graphs
    assert graphs is not None and graphs.sizes == graph_batch_sizes(256) and len(graphs.sizes) == 35
    assert all(logits.data_ptr() == graphs.logits.data_ptr() for logits, _, _ in graphs.outputs.values())
    assert torch.cuda.memory_reserved() <= utilization * total
