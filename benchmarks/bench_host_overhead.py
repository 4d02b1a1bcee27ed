"""Host overhead of one engine step: the CPU time of scheduling, block management, input
preparation and output processing, with the model and the sampler replaced by stubs that return
at once. Decode steps at batch 1 to 256 (goal: <= 1 ms per decode step at batch 256, because
host time is what leaves the GPU idle between steps).

    python benchmarks/bench_host_overhead.py [--batches 1 8 64 256] [--steps 50] [--json OUT]

The pytest entry point only checks that the measurement runs (a timed test proves nothing).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from opt_fast import Engine, SamplingParams
from opt_fast.config import OPTConfig
from opt_fast.demo import train_tokenizer, write_random_checkpoint
from opt_fast.engine.cuda_graphs import DecodeGraphs

PHASES = ("schedule", "prepare", "model+sample (stub)", "outputs")


class _StubModel(torch.nn.Module):
    """Returns hidden states and logits of the right shapes without computing anything."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.width, self.vocab = config.word_embed_proj_dim, config.vocab_size
        self.logits = torch.zeros(4096, config.vocab_size)

    def forward(self, input_ids, positions):
        return torch.empty(input_ids.shape[0], self.width)

    def compute_logits(self, hidden):
        return self.logits[:hidden.shape[0]]


class _StubSampler:
    """Draws nothing: row i gets the i-th of `ids` (cycled). The ids are tokens that end in a whole
    character, as a model's text mostly does: a row repeating a lone UTF-8 continuation byte would
    make incremental detokenisation re-decode its whole growing run every step (tokenizers'
    DecodeStream waits for a whole character), which measures that pathology, not the engine."""

    def __init__(self, ids: list[int]):
        self.ids = torch.tensor(ids)

    def __call__(self, logits, vocab_size, **inputs):
        rows = logits.shape[0]
        return self.ids[torch.arange(rows) % len(self.ids)], torch.zeros(rows)


def whole_character_ids(engine: Engine) -> list[int]:
    """Ordinary token ids whose text, repeated, ends in a whole character."""
    tok = engine.tokenizer
    return [i for i in range(4, engine.vocab_size) if not tok.decode([i, i]).endswith("\ufffd")]


class _NoReplay:
    def replay(self):
        pass


class _StubGraphs(DecodeGraphs):
    """The CUDA-graph path's host side (refilling the static inputs) with a replay that does
    nothing: what a decode step costs the host when the GPU runs graphs."""

    def _capture(self, size, pool):
        logits = self.runner.model.compute_logits(torch.empty(size, 1))
        tokens, logsumexp = self.ops.sample(logits, self.vocab_size)
        return _NoReplay(), (logits, tokens, logsumexp), None


def build_engine(model_dir: Path, max_num_seqs: int, stream_outputs: bool = True,
                 graphs: bool = False) -> Engine:
    engine = Engine(str(model_dir), device="cpu", kernels="torch", max_num_seqs=max_num_seqs,
                    num_kv_blocks=max_num_seqs * 64, stream_outputs=stream_outputs)
    runner = engine.runner
    runner.model = _StubModel(engine.model_config)
    runner.ops = runner.ops.__class__(**{**runner.ops.__dict__, "sample": _StubSampler(whole_character_ids(engine))})
    if graphs:
        runner.graphs = _StubGraphs(runner)
    return engine


def _timed(record: dict, phase: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[phase] += time.perf_counter() - start
    return wrapper


def measure(engine: Engine, batch: int, steps: int, prompt_len: int = 512, output_kind: str = "cumulative") -> dict:
    """Mean milliseconds per decode step, by phase, with `batch` sequences of ~prompt_len tokens."""
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=steps + 1_000, ignore_eos=True,
                            output_kind=output_kind)
    for i in range(batch):
        engine.add_request(f"r{i}", [2] + [10 + (i + j) % 200 for j in range(prompt_len)], params)
    while any(s.num_output_tokens == 0 for s in engine.scheduler.waiting) or engine.scheduler.waiting:
        engine.step()                                    # prefills, not measured
    record: dict[str, float] = defaultdict(float)
    scheduler, runner = engine.scheduler, engine.runner
    real_schedule, real_prepare, real_model = scheduler.schedule, runner.prepare, runner.model.forward
    scheduler.schedule = _timed(record, "schedule", real_schedule)
    runner.prepare = _timed(record, "prepare", real_prepare)
    runner.model.forward = _timed(record, "model+sample (stub)", real_model)
    # The graph path prepares by refilling static buffers and copying them to the device.
    graph_prepare = ("stage", "replay") if runner.graphs is not None else ()
    for name in graph_prepare:
        setattr(runner.graphs, name, _timed(record, "prepare", getattr(runner.graphs, name)))
    total = 0.0
    try:
        for _ in range(steps):
            start = time.perf_counter()
            outputs = engine.step()
            total += time.perf_counter() - start
            assert len(outputs) == (batch if engine.stream_outputs else 0)
    finally:
        scheduler.schedule, runner.prepare, runner.model.forward = real_schedule, real_prepare, real_model
        for name in graph_prepare:
            delattr(runner.graphs, name)
        for i in range(batch):
            engine.abort_request(f"r{i}")
    row = {phase: 1e3 * record[phase] / steps for phase in PHASES[:3]}
    row["outputs"] = 1e3 * total / steps - sum(row.values())
    row["total"] = 1e3 * total / steps
    return row


def tiny_model(out_dir: Path) -> Path:
    train_tokenizer(out_dir, vocab_size=1000)
    vocab = len(json.loads((out_dir / "vocab.json").read_text()))
    config = OPTConfig(vocab_size=vocab + 8 - vocab % 8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=128, max_position_embeddings=2048)
    return write_random_checkpoint(out_dir, config)


@pytest.mark.parametrize("stream_outputs, graphs, kind", [(True, False, "cumulative"), (True, False, "delta"),
                                                          (False, False, "cumulative"), (False, True, "cumulative")])
def test_host_overhead_measures_every_phase(tmp_path, stream_outputs, graphs, kind):
    engine = build_engine(tiny_model(tmp_path), max_num_seqs=8, stream_outputs=stream_outputs, graphs=graphs)
    for batch in (8, 4):                     # one engine, batch after batch, as main() runs it
        row = measure(engine, batch=batch, steps=3, prompt_len=20, output_kind=kind)
        assert all(row[phase] > 0 for phase in ("schedule", "prepare", "total"))
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp))
        for mode, stream, graphs, kind in (("Engine.step, streaming", True, False, "cumulative"),
                                           ("Engine.step, streaming deltas", True, False, "delta"),
                                           ("LLM.generate, final only", False, False, "cumulative"),
                                           ("LLM.generate, CUDA-graph inputs", False, True, "cumulative")):
            engine = build_engine(model_dir, max(args.batches), stream_outputs=stream, graphs=graphs)
            for batch in args.batches:
                rows.append({"mode": mode, "batch": batch, **measure(engine, batch, args.steps, output_kind=kind)})
    header = "| outputs | batch | " + " | ".join(PHASES) + " | total ms/step |"
    print(f"Host overhead per decode step (ms), {platform.processor() or platform.machine()}, "
          f"python {sys.version.split()[0]}, torch {torch.__version__}\n")
    print(header + "\n|" + " --- |" * (len(PHASES) + 3))
    for row in rows:
        print(f"| {row['mode']} | {row['batch']} | " + " | ".join(f"{row[p]:.3f}" for p in PHASES)
              + f" | {row['total']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
