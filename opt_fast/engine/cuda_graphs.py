"""CUDA graphs of the decode step: model, logits and sampling, one graph per padded batch size.

A decode step of a large model is hundreds of small kernel launches whose Python and driver cost
exceeds the GPU time at small batches. Replaying a captured graph launches them all at once.
The graphs read their inputs from static device buffers that each step refills with one copy
per dtype; padding rows have no cache slot and length 0, so they read and write nothing.

Under tensor parallelism every rank captures the same graphs, all-reduces included, and replays
them in lock-step; rank 0 stages the inputs and sends them to the others (`worker_inputs`,
`load`). Only rank 0's graphs compute logits and sample.
"""
from __future__ import annotations

import torch

from ..config import ceil_div
from ..context import Context, set_context
from .host_tensors import block_tables, host_tensor
from .sequence import Sequence, samples_raw_logits

# The ops a captured step launches must never wait on the host; the torch references of these
# two do (they gather on the host's say-so), so graphs need the Triton versions.
_CAPTURED_OPS = ("paged_decode_attention", "sample")
_I64_ROWS = ("input_ids", "positions", "slots", "top_k", "seeds", "steps")
_F32_ROWS = ("temperature", "top_p")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """One captured decode step per padded batch size, sharing one memory pool."""

    @staticmethod
    def supported(ops) -> bool:
        return not any(getattr(ops, name).__name__.endswith("_ref") for name in _CAPTURED_OPS)

    def __init__(self, runner):
        self.runner = runner
        self.samples = runner.rank == 0
        self.model, self.ops, self.vocab_size = runner.model, runner.ops, runner.vocab_size
        self.block_size = runner.block_size
        self.sizes = graph_batch_sizes(runner.cfg.max_num_seqs)
        rows, device = self.sizes[-1], runner.device
        max_blocks = ceil_div(runner.max_model_len, self.block_size)
        # Host staging (pinned) and device buffers: one copy per dtype refills every input.
        pin = device.type == "cuda"
        self.host_i64 = torch.zeros(len(_I64_ROWS), rows, dtype=torch.int64, pin_memory=pin)
        self.host_f32 = torch.zeros(len(_F32_ROWS), rows, dtype=torch.float32, pin_memory=pin)
        self.host_i32 = torch.zeros(rows * (1 + max_blocks), dtype=torch.int32, pin_memory=pin)
        self.i64 = torch.zeros_like(self.host_i64, device=device)
        self.f32 = torch.ones_like(self.host_f32, device=device)
        self.i32 = torch.zeros_like(self.host_i32, device=device)
        self.i64[_I64_ROWS.index("slots")] = -1
        self.seq_lens = self.i32[:rows]
        self.block_tables = self.i32[rows:].view(rows, max_blocks)
        self.host_seq_lens = self.host_i32[:rows]
        self.host_block_tables = self.host_i32[rows:].view(rows, max_blocks)
        self.penalty = torch.ones(rows, dtype=torch.float32, device=device)
        self.no_seen = torch.empty(rows, 0, dtype=torch.int64, device=device)
        # Every graph's logits go to the first rows of one buffer, outside the graphs' pool: an
        # output of each graph would stay alive beside all the others' (float32 [rows, vocab]
        # per graph: 0.8 GiB over the 35 graphs of max_num_seqs=256).
        self.logits = (torch.empty(rows, runner.config.vocab_size, dtype=torch.float32, device=device)
                       if self.samples else None)
        self.graphs: dict = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):  # the largest first, so the smaller reuse its pool
                self.graphs[size], self.outputs[size], pool = self._capture(size, pool)
        if pin:
            torch.cuda.synchronize(device)
        self.replays = 0
        # Recorded after each step's host-to-device copies: the host buffers are not refilled
        # before those copies have read them (rank 0's end-of-step sync ensures it there, but
        # nothing else does on a tensor-parallel worker).
        self.inputs_copied = torch.cuda.Event() if pin else None
        self._batch: list[Sequence] | None = None
        self.plain, self.has_min_tokens = True, False

    def _capture(self, size: int, pool):
        """(graph, its static outputs, the memory pool) for one batch size."""
        self._step(size)                       # compiles every kernel outside the capture
        graph = torch.cuda.CUDAGraph()
        # With tensor parallelism, NCCL's watchdog thread queries events during the capture: in
        # the default (global) mode that would invalidate it.
        mode = "thread_local" if self.runner.world > 1 else "global"
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
            outputs = self._step(size)
        return graph, outputs, graph.pool()

    def _row(self, name: str) -> torch.Tensor:
        return self.i64[_I64_ROWS.index(name)] if name in _I64_ROWS else self.f32[_F32_ROWS.index(name)]

    def _step(self, size: int):
        """The decode step on the static buffers' first `size` rows: (logits, tokens, logsumexp),
        or None on a rank that does not sample."""
        row = self._row
        set_context(Context(slot_mapping=row("slots")[:size], num_prefill_tokens=0,
                            decode_seq_lens=self.seq_lens[:size], decode_block_tables=self.block_tables[:size]))
        try:
            hidden = self.model(row("input_ids")[:size], row("positions")[:size])
        finally:
            set_context(None)
        if not self.samples:
            return None
        logits = self.model.compute_logits(hidden, out=self.logits[:size])
        tokens, logsumexp = self.ops.sample(
            logits, self.vocab_size, temperature=row("temperature")[:size], top_k=row("top_k")[:size],
            top_p=row("top_p")[:size], repetition_penalty=self.penalty[:size], seen_ids=self.no_seen[:size],
            seeds=row("seeds")[:size], steps=row("steps")[:size])
        return logits, tokens, logsumexp

    def fits(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.sizes[-1]

    def invalidate(self) -> None:
        """Forget the last batch: an eager step in between may have preempted, recomputed or
        regrown any sequence, so the next replay refills everything."""
        self._batch = None

    def _wait_for_input_copies(self) -> None:
        if self.inputs_copied is not None:
            self.inputs_copied.synchronize()

    def _refill_batch(self, seqs: list[Sequence], n: int, size: int) -> None:
        """What stays fixed while the batch keeps its sequences: sampling settings, padding rows."""
        row = _I64_ROWS.index
        self.host_i64[row("top_k"), :n] = host_tensor([s.params.top_k for s in seqs], torch.int64)
        self.host_i64[row("seeds"), :n] = host_tensor([s.seed for s in seqs], torch.int64)
        self.host_i64[row("slots"), n:size] = -1                        # padding rows write nothing
        self.host_seq_lens[n:size] = 0                                  # ... and read nothing
        f32 = [s.params.temperature for s in seqs] + [s.params.top_p for s in seqs]
        self.host_f32[:, :n] = host_tensor(f32, torch.float32).view(2, n)
        self.plain = samples_raw_logits(seqs)
        self.has_min_tokens = any(s.params.min_tokens for s in seqs)

    def _refill_tables(self, seqs: list[Sequence], n: int) -> None:
        tables = block_tables(seqs)
        self.host_block_tables[:n, :tables.shape[1]] = tables

    def stage(self, seqs: list[Sequence], pending_tokens: int = 0) -> int:
        """Fill the host buffers with the inputs of `seqs` (all decodes); returns the batch size
        of the smallest graph that holds them, for `replay`. With `pending_tokens=1`, the inputs
        of the step after the one in flight: each sequence's input token is not on the host yet
        (`replay` takes it on the device), its position is one further.

        Host work is what changes each step: a new batch refills everything; the same batch
        refills the per-token rows, and in the block tables only the entry of each sequence
        whose new token starts a block (a decode adds one token, so its table grows only then)."""
        n = len(seqs)
        size = next(s for s in self.sizes if s >= n)
        self._wait_for_input_copies()
        bs = self.block_size
        positions = [len(s.token_ids) - 1 + pending_tokens for s in seqs]
        if seqs != self._batch:                 # identity compare, element by element
            # forgotten until every buffer is refilled: an exception in between (a Ctrl-C) must
            # leave the next stage refilling everything, not trusting half-written tables
            self._batch = None
            self._refill_batch(seqs, n, size)
            self._refill_tables(seqs, n)
            self._batch = list(seqs)
        else:                                   # a row gains the block its new token starts
            rows = [i for i, p in enumerate(positions) if p % bs == 0]
            if rows:
                cols = [positions[i] // bs for i in rows]
                blocks = [seqs[i].block_table[c] for i, c in zip(rows, cols)]
                self.host_block_tables[rows, cols] = host_tensor(blocks, torch.int32)
        inputs = [0] * n if pending_tokens else [s.token_ids[-1] for s in seqs]
        dynamic = (inputs + positions
                   + [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
                   + [p + 1 - s.num_prompt_tokens for s, p in zip(seqs, positions)])
        rows = host_tensor(dynamic, torch.int64).view(4, n)
        for i, name in enumerate(("input_ids", "positions", "slots", "steps")):
            self.host_i64[_I64_ROWS.index(name), :n] = rows[i]
        self.host_seq_lens[:n] = rows[1] + 1
        return size

    def worker_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a rank that does not sample needs of the staged inputs, for its `load`."""
        model_rows = _I64_ROWS.index("slots") + 1       # input_ids, positions, slots
        return self.host_i64[:model_rows, :size], self.host_seq_lens[:size], self.host_block_tables[:size]

    def load(self, size: int, staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Take the inputs rank 0 staged (`staged`) into this rank's host buffers."""
        model_rows, seq_lens, tables = staged
        self._wait_for_input_copies()
        self.host_i64[:len(model_rows), :size] = model_rows
        self.host_seq_lens[:size] = seq_lens
        self.host_block_tables[:size] = tables

    def replay(self, size: int, input_ids: torch.Tensor | None = None):
        """Copy the staged inputs to the device and replay the graph of `size` rows. Returns its
        outputs (views valid until the next replay): (logits, tokens, logsumexp) of `size` rows,
        or None on a rank that does not sample. `input_ids` (int64 `[rows]`, on the device) are
        the first rows' input tokens, where `stage` had none."""
        for host, dev in ((self.host_i64, self.i64), (self.host_f32, self.f32), (self.host_i32, self.i32)):
            dev.copy_(host, non_blocking=True)
        if self.inputs_copied is not None:
            self.inputs_copied.record()
        if input_ids is not None:
            self._row("input_ids")[:len(input_ids)].copy_(input_ids)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size]
