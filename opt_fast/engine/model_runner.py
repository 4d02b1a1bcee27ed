"""Turns a scheduled batch into tensors, runs the model, samples. No policy decisions here."""
from __future__ import annotations

import torch

from ..config import EngineConfig, OPTConfig
from ..context import Context, set_context
from ..kernels import get_ops
from ..model.loader import init_random_weights, load_weights
from ..model.opt import OPTForCausalLM
from .scheduler import ScheduledBatch
from .sequence import Sequence

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_CPU_KV_CACHE_BYTES = 1 << 30    # CPU default pool: 1 GiB of KV cache


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[cfg.dtype]


class StepResult:
    """What the runner hands back per sequence: the sampled token and its logprob data."""
    __slots__ = ("token", "logprob", "top_logprobs", "prompt_logprobs")

    def __init__(self, token: int, logprob: float, top_logprobs=None, prompt_logprobs=None):
        self.token, self.logprob = token, logprob
        self.top_logprobs, self.prompt_logprobs = top_logprobs, prompt_logprobs


class ModelRunner:
    def __init__(self, config: OPTConfig, cfg: EngineConfig, model_path, vocab_size: int,
                 max_model_len: int, progress: bool = False):
        self.config, self.cfg = config, cfg
        self.device, self.dtype = resolve_device_dtype(cfg)
        self.vocab_size = vocab_size
        self.block_size = cfg.block_size
        self.ops = get_ops(cfg.kernels, self.device.type)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            # Built on the meta device, then given uninitialised storage: random init of billions
            # of parameters would be wasted, since the loader overwrites (and checks) every one.
            with torch.device("meta"):
                self.model = OPTForCausalLM(config, self.ops)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.to_empty(device=self.device)
        if cfg.load_format == "dummy":
            init_random_weights(self.model, cfg.seed)
        else:
            load_weights(self.model, model_path, progress=progress)
        self.model.eval()
        self.num_kv_blocks = cfg.num_kv_blocks or self._default_num_blocks(max_model_len)
        self._allocate_kv_cache()

    def _bytes_per_block(self) -> int:
        c = self.config
        return 2 * c.num_hidden_layers * self.block_size * c.hidden_size * self.dtype.itemsize

    def _default_num_blocks(self, max_model_len: int) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations of the largest step (a rough bound until the engine
            # profiles a real forward): hidden states, the MLP and the float32 logits.
            c = self.config
            tokens = self.cfg.max_num_batched_tokens or max_model_len
            activations = tokens * (8 * c.hidden_size + 2 * c.ffn_dim) * self.dtype.itemsize \
                + self.cfg.max_num_seqs * c.vocab_size * 4 * 4
            budget = free - (1 - self.cfg.gpu_memory_utilization) * total - activations
        else:
            budget = _CPU_KV_CACHE_BYTES
        needed = -(-max_model_len // self.block_size)
        # More blocks than max_num_seqs full-length sequences can never be used.
        blocks = min(int(budget // self._bytes_per_block()), self.cfg.max_num_seqs * needed)
        if blocks < needed:
            raise ValueError(f"KV cache of {blocks} blocks cannot hold one sequence of max_model_len="
                             f"{max_model_len} tokens ({needed} blocks); lower max_model_len or raise "
                             "gpu_memory_utilization / num_kv_blocks")
        return blocks

    def _allocate_kv_cache(self) -> None:
        c = self.config
        shape = (c.num_hidden_layers, 2, self.num_kv_blocks, self.block_size,
                 c.num_attention_heads, c.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.decoder.layers):
            layer.self_attn.key_cache, layer.self_attn.value_cache = self.kv_cache[i]

    # ---- input preparation -------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._tensor(rows, torch.int32)

    def _tensor(self, data, dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(
            self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, Context, list[int]]:
        """Flat input_ids, positions, the Context, and the index of each sequence's last token."""
        input_ids, positions, slots, last_index = [], [], [], []
        cu_seqlens, context_lens = [0], []
        for seq in batch.prefills:
            start = seq.num_cached_tokens
            input_ids += seq.token_ids[start:]
            positions += range(start, seq.num_tokens)
            slots += self._slots(seq, start, seq.num_tokens)
            context_lens.append(start)
            cu_seqlens.append(cu_seqlens[-1] + seq.num_tokens - start)
            last_index.append(len(input_ids) - 1)
        num_prefill_tokens = len(input_ids)
        for seq in batch.decodes:
            pos = seq.num_tokens - 1
            input_ids.append(seq.token_ids[-1])
            positions.append(pos)
            slots += self._slots(seq, pos, pos + 1)
            last_index.append(len(input_ids) - 1)
        ctx = Context(slot_mapping=self._tensor(slots, torch.int64), num_prefill_tokens=num_prefill_tokens)
        if batch.prefills:
            ctx.cu_seqlens_q = self._tensor(cu_seqlens, torch.int32)
            ctx.context_lens = self._tensor(context_lens, torch.int32)
            ctx.prefill_block_tables = self._block_tables(batch.prefills)
        if batch.decodes:
            ctx.decode_seq_lens = self._tensor([s.num_tokens for s in batch.decodes], torch.int32)
            ctx.decode_block_tables = self._block_tables(batch.decodes)
        return (self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), ctx, last_index)

    def _sampling_inputs(self, seqs: list[Sequence]) -> dict:
        params = [s.params for s in seqs]
        if any(p.repetition_penalty != 1.0 for p in params):
            width = max(s.num_tokens for s in seqs)
            seen = [s.token_ids + [-1] * (width - s.num_tokens) for s in seqs]
        else:
            seen = [[] for _ in seqs]
        return dict(
            temperature=self._tensor([p.temperature for p in params], torch.float32),
            top_k=self._tensor([p.top_k for p in params], torch.int64),
            top_p=self._tensor([p.top_p for p in params], torch.float32),
            repetition_penalty=self._tensor([p.repetition_penalty for p in params], torch.float32),
            seen_ids=self._tensor(seen, torch.int64),
            seeds=self._tensor([s.seed for s in seqs], torch.int64),
            steps=self._tensor([s.num_output_tokens for s in seqs], torch.int64),
        )

    def _sampling_logits(self, logits: torch.Tensor, seqs: list[Sequence], eos: int | None) -> torch.Tensor:
        """The logits the sampler draws from. Returns `logits` itself when no row changes them,
        else a copy, so reported logprobs stay those of the raw distribution.

        Bans: until min_tokens are out, EOS and stop_token_ids cannot be drawn (HF and vLLM do the
        same); banned_token_ids never can. Rows with penalty_on_logprobs are log-softmaxed first,
        so the CTRL penalty acts on log-probabilities as FlagAI applies it.
        """
        bans, normalise = [], []
        for row, seq in enumerate(seqs):
            p = seq.params
            banned = list(p.banned_token_ids)
            if seq.num_output_tokens < p.min_tokens:
                banned += list(p.stop_token_ids) + ([eos] if eos is not None and not p.ignore_eos else [])
            bans += [(row, token) for token in banned]
            if p.penalty_on_logprobs:
                normalise.append(row)
        if not bans and not normalise:
            return logits
        logits = logits.clone()
        if normalise:
            logits[normalise, :self.vocab_size] = torch.log_softmax(logits[normalise, :self.vocab_size], dim=-1)
        if bans:
            rows, tokens = zip(*bans)
            logits[list(rows), list(tokens)] = float("-inf")
        return logits

    # ---- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eos_token_id: int | None) -> list[StepResult]:
        """Run one step; results follow batch.prefills then batch.decodes."""
        seqs = batch.prefills + batch.decodes
        input_ids, positions, ctx, last_index = self.prepare(batch)
        set_context(ctx)
        try:
            hidden = self.model(input_ids, positions)
        finally:
            set_context(None)
        logits = self.model.compute_logits(hidden[last_index])
        raw_logits = logits
        sampling_logits = self._sampling_logits(logits, seqs, eos_token_id)
        tokens, logsumexp = self.ops.sample(sampling_logits, self.vocab_size, **self._sampling_inputs(seqs))
        if sampling_logits is not raw_logits:   # logprobs are of the raw distribution, bans excluded
            logsumexp = torch.logsumexp(raw_logits[:, :self.vocab_size], dim=-1)
        token_logprobs = raw_logits.gather(1, tokens[:, None])[:, 0] - logsumexp
        results = [StepResult(t, lp) for t, lp in zip(tokens.tolist(), token_logprobs.tolist())]
        want_top = [i for i, s in enumerate(seqs) if s.params.logprobs]
        if want_top:
            k = max(seqs[i].params.logprobs for i in want_top)
            top_lp = (raw_logits[want_top, :self.vocab_size] - logsumexp[want_top, None]).topk(k)
            for row, values, ids in zip(want_top, top_lp.values.tolist(), top_lp.indices.tolist()):
                n = seqs[row].params.logprobs
                results[row].top_logprobs = dict(zip(ids[:n], values[:n]))
        offset = 0
        for i, seq in enumerate(batch.prefills):
            new_tokens = seq.num_tokens - seq.num_cached_tokens
            if seq.params.prompt_logprobs is not None and seq.num_cached_tokens == 0 \
                    and seq.num_output_tokens == 0:
                results[i].prompt_logprobs = self._prompt_logprobs(hidden[offset:offset + new_tokens], seq)
            offset += new_tokens
        return results

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: Sequence) -> list[dict[int, float] | None]:
        """Entry i: logprob of prompt token i given the tokens before it, plus the top N."""
        prompt = seq.token_ids[:seq.num_prompt_tokens]
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[:-1])[:, :self.vocab_size], dim=-1)
        actual = logprobs.gather(1, torch.tensor(prompt[1:], device=logprobs.device)[:, None])[:, 0].tolist()
        out: list[dict[int, float] | None] = [None]
        n = seq.params.prompt_logprobs
        top = logprobs.topk(n) if n else None
        for i, token in enumerate(prompt[1:]):
            entry = {token: actual[i]}
            if top is not None:
                entry.update(zip(top.indices[i].tolist(), top.values[i].tolist()))
                entry[token] = actual[i]
            out.append(entry)
        return out
