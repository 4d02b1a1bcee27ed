"""Helpers shared by the tests (importable by name; conftest.py holds only fixtures, since
tests/ and benchmarks/ each have a conftest and `from conftest import` would pick either)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from opt_fast.engine.cuda_graphs import DecodeGraphs
from opt_fast.engine.model_runner import ModelRunner

REPO = Path(__file__).resolve().parents[1]
OPT_TOKENIZER_DIR = REPO.parent / "shared" / "opt-tokenizer"
PADDING_ROWS = 7

# name -> transformers.OPTConfig overrides (vocab_size is set from the tokenizer)
TINY_SHAPES = {
    "pre_ln": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                   word_embed_proj_dim=64, do_layer_norm_before=True),
    "post_ln_350m": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                         word_embed_proj_dim=48, do_layer_norm_before=False),
    "head_dim_80": dict(hidden_size=160, num_hidden_layers=2, num_attention_heads=2, ffn_dim=200,
                        word_embed_proj_dim=160, do_layer_norm_before=True),
}


def test_device() -> str:
    """Tests run on CUDA where there is one (the lent GPU machine), else on CPU."""
    return os.environ.get("OPT_FAST_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


test_device.__test__ = False  # not a test, despite the name


def randomise_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                values = torch.rand(param.shape, generator=generator) + 0.5
            elif "embed_tokens" in name:
                values = torch.randn(param.shape, generator=generator) * 0.3
            elif "embed_positions" in name:
                # Large position rows make every step's hidden state differ, so greedy outputs
                # vary token to token instead of repeating one id (a weak parity check).
                values = torch.randn(param.shape, generator=generator)
            elif param.dim() == 2:
                values = torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
            else:
                values = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(values)


def build_hf_model(shape: str, vocab_size: int, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=vocab_size, max_position_embeddings=128,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                    **TINY_SHAPES[shape])
    model = transformers.OPTForCausalLM(config).eval()
    randomise_(model, seed)
    model.tie_weights()
    return model


class _Replay:
    """Stands in for a captured graph on CPU: replay runs the step again into the same outputs
    (a tensor-parallel worker's step has none)."""

    def __init__(self, graphs, size: int, outputs):
        self.graphs, self.size, self.outputs = graphs, size, outputs

    def replay(self):
        fresh = self.graphs._step(self.size)
        for static, new in zip(self.outputs or (), fresh or ()):
            static.copy_(new)


class EmulatedGraphs(DecodeGraphs):
    """DecodeGraphs whose captures are emulated on CPU (each replay runs the step eagerly), so the
    graph path's host side (staging, padding, refills, tensor-parallel hand-over) runs without CUDA."""

    def _capture(self, size, pool):
        outputs = self._step(size)
        return _Replay(self, size, outputs), outputs, None


def emulate_graphs(runner) -> None:
    runner.graphs = EmulatedGraphs(runner)


def assert_graph_replays(runner, at_least: int) -> None:
    """Fails on the rank (run on each through `_on_all_ranks`) that replayed its decode graphs
    fewer than `at_least` times: a worker stepping eagerly would give the same tokens."""
    assert runner.graphs.replays >= at_least, f"rank {runner.rank}: {runner.graphs.replays} graph replays"


def install_emulated_graphs() -> None:
    """Give ModelRunner `_emulate_graphs` and `_assert_graph_replays` calls, which a
    tensor-parallel rank 0 can run on every rank (`_on_all_ranks`); for a worker's process,
    which imports this module first. (In the test's own process, monkeypatch the same methods
    on, so they go when the test ends.)"""
    ModelRunner._emulate_graphs = emulate_graphs
    ModelRunner._assert_graph_replays = assert_graph_replays


def assert_same_outputs(expected, actual, atol=1e-4):
    """Two runs' RequestOutputs, in order: equal tokens, and logprobs (cumulative, per step,
    of the prompt) within `atol` a value."""
    for want, got in zip(expected, actual, strict=True):
        for a, b in zip(want.outputs, got.outputs, strict=True):
            assert b.token_ids == a.token_ids
            assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=atol * len(a.token_ids))
            for step_a, step_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert step_b.keys() == step_a.keys()
                assert list(step_b.values()) == pytest.approx(list(step_a.values()), abs=atol)
        for entry_a, entry_b in zip(want.prompt_logprobs or [], got.prompt_logprobs or [], strict=True):
            if entry_a is None:
                assert entry_b is None
                continue
            assert entry_b.keys() == entry_a.keys()
            assert list(entry_b.values()) == pytest.approx(list(entry_a.values()), abs=atol)


def record_preemptions(engine) -> list:
    """The sequences `engine`'s scheduler preempts from now on, in order (a list that grows)."""
    preempted = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        preempted.extend(batch.preempted)
        return batch
    engine.scheduler.schedule = recording
    return preempted


def eager_on_cuda() -> dict:
    """Engine keyword arguments for a test that edits the model's logits (edit_logits): on CUDA the
    decode graphs are captured when the engine is built and would replay the real one; on CPU
    there are none (or the async switch's emulated ones, which see the patch), so no change."""
    return {"enforce_eager": True} if test_device() == "cuda" else {}


def edit_logits(runner, edit) -> None:
    """Make `runner`'s model return `edit(logits)` of its real logits at every step; refuses a
    runner with real (CUDA) decode graphs, which would go on replaying the real compute_logits
    unseen: build its engine with **eager_on_cuda()."""
    if runner.graphs is not None and runner.device.type == "cuda":
        raise AssertionError("this engine replays CUDA decode graphs: build it with **eager_on_cuda()")
    real = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: edit(real(hidden))


def favour(runner, token: int) -> None:
    """Make `runner`'s model put nearly all mass on `token` at every step (its logit 20 above
    the max)."""
    def favoured(logits):
        logits[:, token] = logits.max(dim=-1).values + 20.0
        return logits
    edit_logits(runner, favoured)


def on_launch(runner, callback) -> None:
    """Call `callback(batch, ahead)` before each step `runner` launches: by `launch` (ahead
    False), or under async scheduling by `launch_ahead` (ahead True: before the previous step's
    results, its decodes computing the token after the one in flight)."""
    launch, launch_ahead = runner.launch, runner.launch_ahead
    runner.launch = lambda batch, eos: callback(batch, False) or launch(batch, eos)
    runner.launch_ahead = lambda previous, batch, eos: callback(batch, True) or launch_ahead(previous, batch, eos)


def track_sampled_rows(runner) -> dict:
    """The dict returned holds, for the step being launched (on_launch), the sequences it
    samples in row order (`seqs`) and how many tokens each has in flight past its
    num_output_tokens (`pending`, per row: 1 for the decodes of a step launched ahead), for
    stubs that force or poison a row's logits."""
    rows = {"seqs": [], "pending": []}

    def track(batch, ahead: bool):
        prompts = len(batch.sampled) - len(batch.decodes)
        rows.update(seqs=batch.sampled, pending=[0] * prompts + [int(ahead)] * len(batch.decodes))
    on_launch(runner, track)
    return rows
