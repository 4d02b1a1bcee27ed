"""Turns a scheduled batch into tensors, runs the model, samples. No policy decisions here."""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from .. import parallel
from ..config import EngineConfig, OPTConfig, ceil_div
from ..context import Context, set_context
from ..kernels import get_ops
from ..kernels.kv_cache import FP8, check_cache_dtype
from ..model.loader import init_random_weights, load_weights
from ..model.opt import OPTForCausalLM
from .scheduler import ScheduledBatch
from .cuda_graphs import DecodeGraphs
from .host_tensors import block_tables, host_tensor, seen_ids, to_device
from .sequence import Sequence, samples_raw_logits
from .workers import TensorParallelRanks

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_CPU_KV_CACHE_BYTES = 1 << 30    # CPU default pool: 1 GiB of KV cache
# Left free on CUDA beyond the profiled peak: CUDA-graph pools, allocator fragmentation.
_CUDA_HEADROOM_BYTES = 512 << 20


def resolve_device_dtype(cfg: EngineConfig, rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """The device of tensor-parallel rank `rank` (on CUDA, ranks take consecutive devices from
    the one asked for) and the dtype."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and cfg.tensor_parallel_size > 1:
        first, count = device.index or 0, torch.cuda.device_count()
        if first + cfg.tensor_parallel_size > count:
            raise ValueError(f"tensor_parallel_size={cfg.tensor_parallel_size} from device {device} needs CUDA "
                             f"devices {first}..{first + cfg.tensor_parallel_size - 1}; this machine has {count}")
        device = torch.device("cuda", first + rank)
    if cfg.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[cfg.dtype]


def _per_row(pending_tokens: int | list[int], rows: int) -> list[int]:
    """Tokens in flight per sampled row: one count for all, or one each."""
    return [pending_tokens] * rows if isinstance(pending_tokens, int) else pending_tokens


class StepResult:
    """What the runner hands back per sampled sequence: the token and its logprob data, or why
    this sequence alone failed."""
    __slots__ = ("token", "logprob", "top_logprobs", "error")

    def __init__(self, token: int, logprob: float, top_logprobs=None, error: str | None = None):
        self.token, self.logprob, self.top_logprobs, self.error = token, logprob, top_logprobs, error


class PendingStep:
    """A launched step whose results are on their way to the host: `collect` waits for them.

    `tokens` (int64 `[rows]`, on the device) feeds a step launched ahead of the collect. What the
    host reads (`to_host`) was computed from the step's outputs before anything else could be
    launched: a decode graph's outputs are overwritten by its next replay."""
    __slots__ = ("seqs", "tokens", "to_host", "top_rows", "copied", "computed")

    def __init__(self, seqs: list[Sequence], tokens=None, to_host=(), top_rows=(), copied=None):
        self.seqs, self.tokens, self.to_host, self.top_rows, self.copied = seqs, tokens, to_host, top_rows, copied
        self.computed = seqs    # the sequences whose KV the step writes (the engine sets it ahead)


class ModelRunner:
    """Rank 0 of `cfg.tensor_parallel_size` (the engine's runner; it starts and drives the other
    ranks' runners, see `workers`), or, with `rank` > 0, one of those."""

    def __init__(self, config: OPTConfig, cfg: EngineConfig, model_path, vocab_size: int,
                 max_model_len: int, max_num_batched_tokens: int, progress: bool = False,
                 rank: int = 0, store_port: int | None = None):
        self.config, self.cfg = config, cfg
        self.rank, self.world = rank, cfg.tensor_parallel_size
        self.device, self.dtype = resolve_device_dtype(cfg, rank)
        self.cache_dtype = self.dtype if cfg.kv_cache_dtype == "auto" else FP8
        self.vocab_size = vocab_size
        self.block_size = cfg.block_size
        self.num_heads = config.num_attention_heads // self.world    # this rank's
        self.max_model_len, self.max_num_batched_tokens = max_model_len, max_num_batched_tokens
        self.ops = get_ops(cfg.kernels, self.device.type)
        if self.ops.name != "torch":     # the Triton launchers would refuse it at the first step
            check_cache_dtype(self.cache_dtype, self.device)
        self.tp: TensorParallelRanks | None = None
        self.model = self.kv_cache = self.graphs = None
        self.broken: str | None = None      # why the runner cannot step (closed, or failed)
        try:
            with self._current_device():
                if self.world > 1:
                    self.tp = TensorParallelRanks(rank, self.world, self.device, store_port, dict(
                        config=config, cfg=cfg, model_path=model_path, vocab_size=vocab_size,
                        max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens))
                    # the row-parallel GEMMs end in an all-reduce
                    self.ops = parallel.parallel_ops(self.ops, self.tp.group)
                self._load(model_path, progress)
                if self.tp is not None and self.tp.workers is not None:
                    self.tp.workers.wait()      # every rank holds its weights
                if rank == 0:
                    self._on_all_ranks("_allocate")
        except BaseException as err:
            self.broken = f"it failed to start ({type(err).__name__}: {err})"
            self.close()
            raise

    def close(self) -> None:
        """Free the model, the KV cache and the decode graphs and, with tensor parallelism, stop
        the other ranks and leave the group. The runner cannot step afterwards."""
        if self.device.type == "cuda" and self.broken is None:
            # a step launched ahead may still run (a device error here is the caller's to see
            # elsewhere: closing goes on)
            with self._current_device(), contextlib.suppress(RuntimeError):
                torch.cuda.synchronize(self.device)
        self.graphs = None          # (first: their captured all-reduces use the group)
        if self.tp is not None:
            self.tp.close(failed=self.broken is not None)
            self.tp = None
        self.model = self.kv_cache = None
        if self.device.type == "cuda":
            with self._current_device():
                torch.cuda.empty_cache()
        self.broken = self.broken or "the engine was closed"

    def _on_all_ranks(self, method: str, *args):
        """`method(*args)` here and on every other rank, in lock-step; returns this rank's result.
        A failure on any rank ends the runner: the ranks' collectives are no longer matched."""
        if self.tp is None:
            return getattr(self, method)(*args)
        try:
            return self.tp.call(self, method, *args)
        except BaseException as err:
            self.broken = f"{type(err).__name__}: {err}"
            self.close()
            raise

    def _current_device(self):
        """Triton launches, CUDA graph captures and the caching allocator's streams follow the
        current CUDA device, not the tensors': on `cuda:1`, or on a worker thread (whose current
        device is 0), every CUDA call of this runner must run inside this."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _load(self, model_path, progress: bool) -> None:
        """The model (this rank's share of it) with its weights."""
        cfg = self.cfg
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            # Built on the meta device, then given uninitialised storage: random init of billions
            # of parameters would be wasted, since the loader overwrites (and checks) every one.
            with torch.device("meta"):
                self.model = OPTForCausalLM(self.config, self.ops)
                if self.world > 1:
                    parallel.shard_model(self.model, self.world)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.to_empty(device=self.device)
        if cfg.load_format == "dummy":
            init_random_weights(self.model, cfg.seed, self.rank, self.world)
        else:
            load_weights(self.model, model_path, progress=progress, rank=self.rank, world=self.world)
        self.model.eval()

    def _allocate(self) -> None:
        """The KV cache and the decode graphs (on every rank at once: both run collectives)."""
        cfg = self.cfg
        self.num_kv_blocks = cfg.num_kv_blocks or self._default_num_blocks()
        self._allocate_kv_cache()
        if self.device.type == "cuda" and not cfg.enforce_eager and DecodeGraphs.supported(self.ops):
            self.graphs = DecodeGraphs(self)

    # ---- KV cache sizing -------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        c = self.config
        return 2 * c.num_hidden_layers * self.block_size * self.num_heads * c.head_dim * self.cache_dtype.itemsize

    def _default_num_blocks(self) -> int:
        """On CUDA: what `gpu_memory_utilization` of the device leaves after the weights and the
        peak of a profiled worst-case step. On CPU: a fixed pool. Never more than max_num_seqs
        full-length sequences can use."""
        if self.device.type == "cuda":
            budget = self._profile_free_bytes()
        else:
            budget = _CPU_KV_CACHE_BYTES
        needed = ceil_div(self.max_model_len, self.block_size)
        blocks = min(int(budget // self._bytes_per_block()), self.cfg.max_num_seqs * needed)
        if self.tp is not None:
            blocks = self.tp.group.min(blocks)  # every rank's cache holds the same blocks
        if blocks < needed:
            raise ValueError(f"KV cache of {max(blocks, 0)} blocks cannot hold one sequence of "
                             f"max_model_len={self.max_model_len} tokens ({needed} blocks of "
                             f"block_size={self.block_size}); lower max_model_len or block_size, or raise "
                             "gpu_memory_utilization / num_kv_blocks")
        return blocks

    @torch.inference_mode()
    def _profile_free_bytes(self) -> int:
        """Run the largest step the scheduler can build (max_num_batched_tokens prompt tokens,
        then sampling max_num_seqs rows) with a one-block cache nobody writes, and return the
        bytes left for the KV cache under gpu_memory_utilization."""
        c = self.config
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.max_num_batched_tokens
        lengths = [min(self.max_model_len, tokens - start) for start in range(0, tokens, self.max_model_len)]
        scratch = torch.zeros(2, 1, self.block_size, self.num_heads, c.head_dim,
                              dtype=self.cache_dtype, device=self.device)
        for layer in self.model.decoder.layers:
            layer.self_attn.key_cache, layer.self_attn.value_cache = scratch
        cu_seqlens = [0]
        for n in lengths:
            cu_seqlens.append(cu_seqlens[-1] + n)
        ctx = Context(slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=self.device),
                      num_prefill_tokens=tokens,
                      cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=self.device),
                      context_lens=torch.zeros(len(lengths), dtype=torch.int32, device=self.device),
                      max_context_len=0, max_query_len=max(lengths),
                      prefill_block_tables=torch.zeros(len(lengths), 1, dtype=torch.int32, device=self.device))
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        set_context(ctx)
        try:
            hidden = self.model(torch.zeros(tokens, dtype=torch.int64, device=self.device), positions)
        finally:
            set_context(None)
        rows = min(self.cfg.max_num_seqs, tokens)
        logits = self.model.compute_logits(hidden[:rows])
        self.ops.sample(logits, self.vocab_size, **self._dummy_sampling_inputs(rows))
        del hidden, logits, scratch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(self.device)
        activations = peak - torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # gpu_memory_utilization is this engine's share of the device (weights, activations and
        # cache), as in vLLM; and never more than is free now, whoever holds the rest.
        share = self.cfg.gpu_memory_utilization * total - peak
        return int(min(share, free - activations) - _CUDA_HEADROOM_BYTES)

    def _dummy_sampling_inputs(self, rows: int) -> dict:
        def full(value, dtype):
            return torch.full((rows,), value, dtype=dtype, device=self.device)
        return dict(temperature=full(1.0, torch.float32), top_k=full(0, torch.int64),
                    top_p=full(1.0, torch.float32), repetition_penalty=full(1.0, torch.float32),
                    seen_ids=torch.empty(rows, 0, dtype=torch.int64, device=self.device),
                    seeds=full(0, torch.int64), steps=full(0, torch.int64))

    def _allocate_kv_cache(self) -> None:
        c = self.config
        shape = (c.num_hidden_layers, 2, self.num_kv_blocks, self.block_size, self.num_heads, c.head_dim)
        try:
            self.kv_cache = torch.empty(shape, dtype=self.cache_dtype, device=self.device)
        except RuntimeError as err:   # out of memory (CUDA's OutOfMemoryError included), or past any size
            if not self.cfg.num_kv_blocks:
                raise
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} (block_size={self.block_size}) asks for "
                             f"{self.num_kv_blocks * self._bytes_per_block() / 2 ** 30:.1f} GiB of KV cache, "
                             f"which {self.device} cannot allocate: {str(err).splitlines()[0][:200]}") from err
        for i, layer in enumerate(self.model.decoder.layers):
            layer.self_attn.key_cache, layer.self_attn.value_cache = self.kv_cache[i]

    # ---- input preparation -------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: ScheduledBatch,
                pending_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, Context, list[int]]:
        """Flat input_ids, positions and the Context, on the host (every tensor-parallel rank
        moves them to its device), and the row of each sampled sequence's last token. With
        `pending_tokens=1` (decodes only), for the step after the one in flight: each decode's
        input is that step's token, not on the host yet (a 0 here, for the caller to replace on
        the device), at the position after it."""
        input_ids, positions, slots, last_index = [], [], [], []
        cu_seqlens, context_lens, max_query_len = [0], [], 0
        for seq in batch.prefills:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self._slots(seq, start, end)
            context_lens.append(start)
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            max_query_len = max(max_query_len, end - start)
            if seq.samples_this_step:
                last_index.append(len(input_ids) - 1)
        num_prefill_tokens = len(input_ids)
        if batch.decodes:             # list comprehensions: this runs for every sequence every step
            bs, decodes = self.block_size, batch.decodes
            decode_positions = [len(s.token_ids) - 1 + pending_tokens for s in decodes]
            input_ids += [0] * len(decodes) if pending_tokens else [s.token_ids[-1] for s in decodes]
            positions += decode_positions
            slots += [s.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, decode_positions)]
            last_index += range(num_prefill_tokens, len(input_ids))
        ctx = Context(slot_mapping=host_tensor(slots, torch.int64), num_prefill_tokens=num_prefill_tokens)
        if batch.prefills:
            ctx.cu_seqlens_q = host_tensor(cu_seqlens, torch.int32)
            ctx.context_lens = host_tensor(context_lens, torch.int32)
            ctx.max_context_len = max(context_lens)
            ctx.max_query_len = max_query_len
            ctx.prefill_block_tables = block_tables(batch.prefills)
        if batch.decodes:
            ctx.decode_seq_lens = host_tensor([p + 1 for p in decode_positions], torch.int32)
            ctx.decode_block_tables = block_tables(batch.decodes)
        return host_tensor(input_ids, torch.int64), host_tensor(positions, torch.int64), ctx, last_index

    def sampling_inputs(self, seqs: list[Sequence], pending_tokens: int | list[int] = 0) -> dict:
        """Per-row sampler arguments as host tensors (moved to the device by the caller). With
        `pending_tokens=1` (or 1 in a per-row list), for the step after a token that the host
        does not have yet: `seen_ids` then ends in a padding column for the caller to fill on
        the device."""
        params = [s.params for s in seqs]
        pending = _per_row(pending_tokens, len(seqs))
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        width = max(s.num_tokens + k for s, k in zip(seqs, pending)) if penalised else 0
        return dict(
            temperature=host_tensor([p.temperature for p in params], torch.float32),
            top_k=host_tensor([p.top_k for p in params], torch.int64),
            top_p=host_tensor([p.top_p for p in params], torch.float32),
            repetition_penalty=host_tensor([p.repetition_penalty for p in params], torch.float32),
            seen_ids=seen_ids(seqs, width),
            seeds=host_tensor([s.seed for s in seqs], torch.int64),
            steps=host_tensor([s.num_output_tokens + k for s, k in zip(seqs, pending)], torch.int64),
        )

    def _sampling_logits(self, logits: torch.Tensor, seqs: list[Sequence], eos: int | None,
                         pending_tokens: int | list[int] = 0) -> torch.Tensor:
        """The logits the sampler draws from. Returns `logits` itself when no row changes them,
        else a copy, so reported logprobs stay those of the raw distribution.

        Bans: until min_tokens are out, EOS and stop_token_ids cannot be drawn (HF and vLLM do the
        same); banned_token_ids never can. Rows with penalty_on_logprobs are log-softmaxed first,
        so the CTRL penalty acts on log-probabilities as FlagAI applies it.
        """
        bans, normalise = [], []
        for row, (seq, pending) in enumerate(zip(seqs, _per_row(pending_tokens, len(seqs)))):
            p = seq.params
            bans += [(row, token) for token in p.banned_token_ids]
            if seq.num_output_tokens + pending < p.min_tokens:
                stops = p.stop_token_ids + ([eos] if eos is not None and not p.ignore_eos else [])
                bans += [(row, token) for token in stops]
            if p.penalty_on_logprobs:
                normalise.append(row)
        if not bans and not normalise:
            return logits
        logits = logits.clone()
        ban_rows, ban_tokens = zip(*bans) if bans else ((), ())
        # As tensors in one copy: indexing by Python lists copies each on its own and waits.
        normalise, ban_rows, ban_tokens = to_device(
            [host_tensor(ids, torch.int64) for ids in (normalise, ban_rows, ban_tokens)], self.device)
        if len(normalise):
            logits[normalise, :self.vocab_size] = torch.log_softmax(logits[normalise, :self.vocab_size], dim=-1)
        if len(ban_rows):
            logits[ban_rows, ban_tokens] = float("-inf")
        return logits

    @staticmethod
    def plain_sampling(seqs: list[Sequence], pending_tokens: int = 0) -> bool:
        """Whether the sampler can draw from the raw logits with no per-step host-built inputs
        (no penalty list, no bans): what a CUDA graph's built-in sampling handles. With
        `pending_tokens`, for the step after that many more tokens each."""
        return samples_raw_logits(seqs) and all(s.num_output_tokens + pending_tokens >= s.params.min_tokens
                                                for s in seqs)

    # ---- the step ------------------------------------------------------------------------
    def run(self, batch: ScheduledBatch, eos_token_id: int | None) -> list[StepResult]:
        """Run one step; one result per `batch.sampled` sequence, in that order."""
        return self.collect(self.launch(batch, eos_token_id))

    def launch(self, batch: ScheduledBatch, eos_token_id: int | None) -> PendingStep:
        """Start one step; `collect` gives its results. Only the prompt logprobs of its prefills
        (if any ask) wait for the device before this returns."""
        if self.broken:
            raise RuntimeError(f"the engine cannot step: {self.broken}")
        with self._current_device():
            return self._launch(batch, eos_token_id)

    @torch.inference_mode()
    def _launch(self, batch: ScheduledBatch, eos_token_id: int | None) -> PendingStep:
        if self.graphs is not None and not batch.prefills and self.graphs.fits(len(batch.decodes)):
            return self._graph_decode(batch.decodes, eos_token_id)
        if self.graphs is not None:
            self.graphs.invalidate()
        sampled = batch.sampled
        input_ids, positions, ctx, last_index = self.prepare(batch)
        hidden = self._on_all_ranks("_forward", input_ids, positions, ctx)
        self._prompt_logprobs(hidden, batch)
        if not sampled:
            return PendingStep([])
        # The rows to sample travel with the sampler's inputs: indexing by a Python list would
        # copy it on its own and wait for the forward to finish before the host builds them.
        inputs, rows = self._sampling_inputs_on_device(sampled, last_index)
        raw_logits = self.model.compute_logits(hidden[rows])
        tokens, logsumexp = self._sample(raw_logits, sampled, eos_token_id, inputs)
        return self._pending(raw_logits, tokens, logsumexp, sampled)

    def can_launch_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether the decode step after the one in flight, of the same `seqs`, can be launched
        before that one's tokens reach the host: with async scheduling, on one rank (the other
        ranks would need the tokens sent to them)."""
        return self.cfg.async_scheduling and self.tp is None and bool(seqs)

    def launch_ahead(self, previous: PendingStep, batch: ScheduledBatch, eos_token_id: int | None) -> PendingStep:
        """Start `batch` (Scheduler.schedule_ahead), the step after `previous` (not collected
        yet): its decodes are `previous.seqs` in that order, each holding the slot of its next
        token, and each one's input is the token `previous` draws for it, taken on the device;
        its prefills are prompts admitted meanwhile. On the decode graphs where there are no
        prefills and the decodes fit, else eagerly (enforce_eager, CPU, admitted prompts)."""
        if self.broken:
            raise RuntimeError(f"the engine cannot step: {self.broken}")
        with self._current_device(), torch.inference_mode():
            if not batch.prefills and self.graphs is not None and self.graphs.fits(len(batch.decodes)):
                return self._graph_decode(batch.decodes, eos_token_id, previous)
            return self._eager_ahead(previous, batch, eos_token_id)

    def _eager_ahead(self, previous: PendingStep, batch: ScheduledBatch, eos_token_id: int | None) -> PendingStep:
        """launch_ahead without the graphs: the eager step of `batch`, its decodes' input ids
        `previous`'s tokens, on the device."""
        if self.graphs is not None:
            self.graphs.invalidate()
        input_ids, positions, ctx, last_index = self.prepare(batch, pending_tokens=1)
        hidden = self._forward(input_ids, positions, ctx, in_flight=previous.tokens)
        self._prompt_logprobs(hidden, batch)
        seqs = batch.sampled        # finished prompts (no token in flight), then the decodes (one each)
        prompts = len(seqs) - len(batch.decodes)
        pending = [0] * prompts + [1] * len(batch.decodes)
        inputs, rows = self._sampling_inputs_on_device(seqs, last_index, pending_tokens=pending)
        if inputs["seen_ids"].shape[1]:
            inputs["seen_ids"][prompts:, -1] = previous.tokens     # the token in flight is seen too
        raw_logits = self.model.compute_logits(hidden[rows])
        tokens, logsumexp = self._sample(raw_logits, seqs, eos_token_id, inputs, pending)
        return self._pending(raw_logits, tokens, logsumexp, seqs)

    def _graph_decode(self, seqs: list[Sequence], eos_token_id: int | None,
                      previous: PendingStep | None = None) -> PendingStep:
        """A decode step of `seqs` on the graphs; launched ahead of `previous`'s results if given."""
        graphs, n = self.graphs, len(seqs)
        pending_tokens = int(previous is not None)
        size = graphs.stage(seqs, pending_tokens)
        if previous is None:
            inputs = graphs.worker_inputs(size) if self.tp is not None else None
            raw_logits, tokens, logsumexp = self._on_all_ranks("_replay", size, inputs)
        else:
            raw_logits, tokens, logsumexp = graphs.replay(size, input_ids=previous.tokens)
        raw_logits, tokens, logsumexp = raw_logits[:n], tokens[:n], logsumexp[:n]
        # The graph's draw ignores penalties and bans: redo it eagerly where any applies.
        if not graphs.plain or (graphs.has_min_tokens and not self.plain_sampling(seqs, pending_tokens)):
            inputs = self._sampling_inputs_on_device(seqs, pending_tokens=pending_tokens)[0]
            if previous is not None and inputs["seen_ids"].shape[1]:
                inputs["seen_ids"][:, -1] = previous.tokens     # the token in flight is seen too
            tokens, logsumexp = self._sample(raw_logits, seqs, eos_token_id, inputs, pending_tokens)
        return self._pending(raw_logits, tokens, logsumexp, seqs)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context,
                 in_flight: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states `[tokens, word_embed_proj_dim]` of an eager step, from its host inputs;
        `in_flight` (on the device): the decodes' input ids of a step launched ahead, whose
        places in input_ids hold zeros."""
        on_host = ctx.tensors()
        input_ids, positions, *moved = to_device([input_ids, positions, *on_host.values()], self.device)
        if in_flight is not None:
            input_ids[ctx.num_prefill_tokens:] = in_flight
        set_context(dataclasses.replace(ctx, **dict(zip(on_host, moved))))
        try:
            return self.model(input_ids, positions)
        finally:
            set_context(None)

    @torch.inference_mode()
    def _replay(self, size: int, worker_inputs: tuple | None):
        """Replay the decode graph of `size` rows on the inputs rank 0 staged; a worker first
        takes them (`worker_inputs`) into its own buffers. Returns the graph's outputs."""
        if self.rank:
            self.graphs.load(size, worker_inputs)
        return self.graphs.replay(size)

    def _sampling_inputs_on_device(self, seqs: list[Sequence], rows: list[int] = (),
                                   pending_tokens: int | list[int] = 0) -> tuple[dict, torch.Tensor]:
        """The sampler's inputs for `seqs`, and `rows` as an int64 tensor, on the device in one copy."""
        on_host = self.sampling_inputs(seqs, pending_tokens)
        *moved, rows = to_device([*on_host.values(), host_tensor(rows, torch.int64)], self.device)
        return dict(zip(on_host, moved)), rows

    def _sample(self, raw_logits: torch.Tensor, seqs: list[Sequence], eos: int | None, inputs: dict,
                pending_tokens: int | list[int] = 0):
        """(tokens, logsumexp of the raw logits) of `seqs`' rows; `inputs` from _sampling_inputs_on_device."""
        sampling_logits = self._sampling_logits(raw_logits, seqs, eos, pending_tokens)
        tokens, logsumexp = self.ops.sample(sampling_logits, self.vocab_size, **inputs)
        if sampling_logits is not raw_logits:   # logprobs are of the raw distribution, bans excluded
            logsumexp = torch.logsumexp(raw_logits[:, :self.vocab_size], dim=-1)
        return tokens, logsumexp

    def _pending(self, raw_logits, tokens, logsumexp, seqs: list[Sequence]) -> PendingStep:
        """Queue what the host reads of a step's outputs, and its copy to the host."""
        # Clamped: a row with non-finite logits (it fails alone, see collect) may draw garbage,
        # and its token still indexes the logits here and, launched ahead, the embedding.
        tokens = tokens.clamp(0, self.vocab_size - 1)
        token_logprobs = raw_logits.gather(1, tokens[:, None])[:, 0] - logsumexp
        # One copy for all three (ids are exact in float64, float32 values too).
        to_host = [torch.stack([tokens.to(torch.float64), token_logprobs.to(torch.float64),
                                logsumexp.to(torch.float64)])]
        top_rows = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if top_rows:
            k = max(seqs[i].params.logprobs for i in top_rows)
            rows = to_device([host_tensor(top_rows, torch.int64)], self.device)[0]
            top = (raw_logits[rows, :self.vocab_size] - logsumexp[rows, None]).topk(k)
            to_host += [top.values, top.indices]
        copied = None
        if self.device.type == "cuda":
            to_host = [t.to("cpu", non_blocking=True) for t in to_host]
            copied = torch.cuda.Event()
            copied.record()
        return PendingStep(seqs, tokens, to_host, top_rows, copied)

    def collect(self, step: PendingStep) -> list[StepResult]:
        """Wait for `step`'s results: one per sampled sequence, in order. A row with NaN or
        infinite logits (its logsumexp is not finite) is that sequence's failure alone."""
        if not step.seqs:
            return []
        if step.copied is not None:
            step.copied.synchronize()
        ids, token_lps, lses = step.to_host[0].tolist()
        results = [StepResult(int(t), lp) if math.isfinite(lse) else StepResult(-1, float("nan"), error="non-finite logits")
                   for t, lp, lse in zip(ids, token_lps, lses)]
        if step.top_rows:
            values, indices = step.to_host[1].tolist(), step.to_host[2].tolist()
            for row, row_values, row_ids in zip(step.top_rows, values, indices):
                if results[row].error is None:
                    n = step.seqs[row].params.logprobs
                    results[row].top_logprobs = dict(zip(row_ids[:n], row_values[:n]))
        return results

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: ScheduledBatch) -> None:
        """Fill, chunk by chunk, entry p+1 of each asking prompt: the logprob of prompt token p+1
        given tokens 0..p (plus the top N), from the hidden state of position p. The targets go
        to the device in one copy and every result comes back in one: a copy per chunk and per
        result made the host wait for the device (and the device for the host) several times a
        step, where one wait is needed."""
        chunks, targets, offset = [], [], 0     # (seq, first hidden row, first position, rows)
        for seq in batch.prefills:
            start, count = seq.num_cached_tokens, seq.num_scheduled_tokens
            rows = min(start + count, seq.num_prompt_tokens - 1) - start
            if seq.prompt_logprobs is not None and seq.num_output_tokens == 0 and rows > 0:
                # At most max_num_seqs rows of logits at a time, as many as the memory profile
                # ran: a whole chunk's (2048 rows of 50272) would take about 1 GiB.
                for first in range(0, rows, self.cfg.max_num_seqs):
                    n = min(rows - first, self.cfg.max_num_seqs)
                    chunks.append((seq, offset + first, start + 1 + first, n))
                    targets += seq.token_ids[start + 1 + first:start + 1 + first + n]
            offset += count
        if not chunks:
            return
        top_n = max(seq.params.prompt_logprobs for seq, *_ in chunks)
        targets_on_device = to_device([host_tensor(targets, torch.int64)], self.device)[0]
        parts, row = [], 0
        for seq, first_row, _, n in chunks:
            logits = self.model.compute_logits(hidden[first_row:first_row + n])[:, :self.vocab_size]
            logprobs = torch.log_softmax(logits, dim=-1)
            part = [logprobs.gather(1, targets_on_device[row:row + n, None]).double()]
            if top_n:   # the widest request's top; each takes its own first N (sorted, so a prefix)
                top = logprobs.topk(top_n)
                part += [top.values.double(), top.indices.double()]      # ids are exact in float64
            parts.append(torch.cat(part, dim=1))
            row += n
        results = torch.cat(parts).tolist()
        row = 0
        for seq, _, position, n in chunks:
            want = seq.params.prompt_logprobs
            for i, token in enumerate(targets[row:row + n]):
                actual, *top = results[row + i]
                entry = {int(t): v for t, v in zip(top[top_n:top_n + want], top[:want])}
                entry[token] = actual
                seq.prompt_logprobs[position + i] = entry
            row += n
