"""Engine: requests in, one step at a time, RequestOutputs out. The backend a server embeds."""
from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path

from ..config import EngineConfig, OPTConfig
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import OPTTokenizer
from ..model.loader import resolve_model_path
from ..parallel import check_tensor_parallel
from .block_manager import BlockManager
from .model_runner import ModelRunner, PendingStep, StepResult
from .scheduler import Scheduler
from .sequence import Sequence

_MASK63 = (1 << 63) - 1
_DEFAULT_STEP_TOKENS = 2048


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit Philox key (splitmix64), so nearby inputs give unrelated keys."""
    x = 0
    for part in parts:
        x = (x ^ (part & ((1 << 64) - 1))) + 0x9E3779B97F4A7C15 & ((1 << 64) - 1)
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & ((1 << 64) - 1)
        x ^= x >> 31
    return x & _MASK63


def _visible_text(seq: Sequence) -> str:
    """The text a client may see so far: while a sample runs, an end of its text that could
    begin a stop string is held back, so streamed text only ever grows (the stop string, once
    complete, is cut from the output)."""
    text, stops = seq.text, seq.params.stop
    if seq.is_finished or not stops:
        return text
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return text[:len(text) - held]


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seqs: list[Sequence]):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.seqs = params, seqs
        self.prompt_logprobs = None
        # output_kind "delta": each sample's tokens and characters already handed out, and
        # whether the prompt's logprobs were
        self.sent = [(0, 0)] * len(seqs) if params.output_kind == "delta" else None
        self.sent_prompt_logprobs = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self, finished: bool) -> RequestOutput:
        """A snapshot: an output already handed out (streamed, or read on another thread) never
        changes as generation goes on. The lists that grow are copied; the prompt's ids and
        logprobs are complete before the first output and shared. With output_kind "delta",
        only what no earlier output of this request held (the prompt's logprobs in the first)."""
        completions = []
        for i, s in enumerate(self.seqs):
            text, tokens, logprobs = _visible_text(s), s.token_ids, s.output_logprobs
            start, chars = (0, 0) if self.sent is None else self.sent[i]
            if self.sent is not None:
                self.sent[i] = (s.num_output_tokens, len(text))
            completions.append(CompletionOutput(
                s.index, text[chars:], tokens[s.num_prompt_tokens + start:], s.cumulative_logprob,
                None if logprobs is None else logprobs[start:], s.finish_reason, s.error))
        prompt_logprobs = self.prompt_logprobs
        if self.sent is not None and prompt_logprobs is not None:
            if self.sent_prompt_logprobs:
                prompt_logprobs = None
            self.sent_prompt_logprobs = True
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, prompt_logprobs,
                             completions, finished, self.seqs[0].num_prompt_tokens_reused)


class Engine:
    """Continuous-batching generation over a paged KV cache (DESIGN.md §3).

    `Engine(model, **kwargs)` takes the same keyword arguments as `LLM`. A server calls
    `add_request`, then `step()` in a loop while `has_unfinished_requests()`.

    `stream_outputs=False` (what `LLM.generate` uses) makes `step()` return finished requests
    only, and decodes a sample's text once at its end instead of token by token (unless it has
    stop strings, which need the text as it grows): less host work per step. `progress` shows a
    weight-loading bar (on a terminal only).
    """

    def __init__(self, model: str | Path, *, progress: bool = False, stream_outputs: bool = True, **kwargs):
        for name, value in (("progress", progress), ("stream_outputs", stream_outputs)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        self.stream_outputs = stream_outputs
        self.cfg = EngineConfig.from_kwargs("Engine", kwargs)
        path = resolve_model_path(model)
        self.model_config = OPTConfig.from_json(path / "config.json")
        try:
            self.tokenizer: OPTTokenizer | None = OPTTokenizer.from_dir(path)
        except FileNotFoundError:
            self.tokenizer = None     # token-id prompts still work; text prompts get a ValueError
        self.vocab_size = self.tokenizer.vocab_size if self.tokenizer else self.model_config.vocab_size
        if self.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"the tokenizer has {self.vocab_size} ids, the model's embedding only "
                             f"{self.model_config.vocab_size} rows: they do not belong together")
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else self.model_config.eos_token_id
        positions = self.model_config.max_position_embeddings
        self.max_model_len = self.cfg.max_model_len or positions
        if self.max_model_len > positions:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={positions}")
        # Prompts are chunked, so the budget only bounds a step's work (and activation memory).
        self.max_num_batched_tokens = self.cfg.max_num_batched_tokens or max(_DEFAULT_STEP_TOKENS,
                                                                             self.cfg.max_num_seqs)
        check_tensor_parallel(self.model_config, self.cfg.tensor_parallel_size)
        self.runner = ModelRunner(self.model_config, self.cfg, path, self.vocab_size,
                                  self.max_model_len, self.max_num_batched_tokens, progress=progress)
        self.blocks = BlockManager(self.runner.num_kv_blocks, self.cfg.block_size,
                                   prefix_caching=self.cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.cfg.max_num_seqs, self.max_num_batched_tokens)
        self.requests: dict[str, _Request] = {}
        self._num_requests = 0
        # The step launched ahead (async_scheduling), not collected yet.
        self._ahead: PendingStep | None = None

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request. Bad input raises ValueError and leaves every other request untouched.

        The engine keeps its own copy of `params` (validated again), so changing the caller's
        object afterwards changes nothing here."""
        if self.runner.broken:
            raise RuntimeError(f"the engine cannot take requests: {self.runner.broken}")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = dataclasses.replace(params)
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {type(request_id).__name__} {request_id!r:.80}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._prompt_ids(prompt)
        self._check_params(params)
        self.check_fits(len(token_ids), params.max_tokens)
        base_seed = params.seed if params.seed is not None else derive_seed(self.cfg.seed, self._num_requests)
        self._num_requests += 1
        seqs = [Sequence(request_id, i, token_ids, params, base_seed if i == 0
                         else derive_seed(base_seed, i)) for i in range(params.n)]
        for seq in seqs:
            if self.tokenizer is not None and (self.stream_outputs or params.stop):
                seq.detokenizer = self.tokenizer.incremental_decoder(token_ids, params.skip_special_tokens)
        # Sample 0 computes the prompt; the others join once it is cached, sharing its blocks.
        seqs[0].forks = seqs[1:]
        self.scheduler.add(seqs[0])
        self.requests[request_id] = _Request(request_id, text, token_ids, params, seqs)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError unless a prompt of `num_prompt_tokens` can grow by `max_tokens` within
        max_model_len and the whole KV cache."""
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                             f"{total} exceeds max_model_len={self.max_model_len}")
        blocks = -(-total // self.cfg.block_size)
        if blocks > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_tokens needs {blocks} KV blocks, the cache has "
                             f"{self.blocks.num_blocks}: raise num_kv_blocks or lower max_tokens")

    def _check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: bounds set by this model and tokenizer."""
        rows = self.model_config.vocab_size
        for name in ("stop_token_ids", "banned_token_ids"):
            for token in getattr(params, name):
                if token >= rows:
                    raise ValueError(f"{name} entry {token} is outside the model's vocabulary [0, {rows})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.vocab_size:
                raise ValueError(f"{name}={getattr(params, name)} exceeds the vocabulary size {self.vocab_size}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs text, but the model directory has no tokenizer "
                             "files; use stop_token_ids instead")
        # Every id banned (until min_tokens, stop ids and EOS too): the draw would have nothing left.
        banned = set(params.banned_token_ids)
        if params.min_tokens:
            banned.update(params.stop_token_ids)
            if self.eos_token_id is not None and not params.ignore_eos:
                banned.add(self.eos_token_id)
        if len(banned) >= self.vocab_size and sum(token < self.vocab_size for token in banned) == self.vocab_size:
            what = "banned_token_ids" + (", stop_token_ids and EOS (until min_tokens)" if params.min_tokens else "")
            raise ValueError(f"{what} ban all {self.vocab_size} ids of the vocabulary: nothing is left to draw")

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model directory has no tokenizer files; "
                                 "pass token ids instead")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a string or a non-empty list of token ids, got {prompt!r:.80}")
        # Plain ints (the usual case) are checked in C, about 20x faster than the loop below,
        # which also takes numpy integers and names the first bad entry.
        if set(map(type, prompt)) == {int} and 0 <= min(prompt) and max(prompt) < self.vocab_size:
            return None, list(prompt)
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise ValueError(f"prompt token ids must be integers, got {token!r}")
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"prompt token id {token!r} is outside the vocabulary [0, {self.vocab_size})")
        return None, [int(token) for token in prompt]

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now: its blocks go back to the pool and its id is free again. Returns
        its final RequestOutput (samples still running end with finish_reason "abort"); None
        for an unknown or already finished id. No later step reports it."""
        if not isinstance(request_id, str):   # (no such id was ever added; a list would not hash)
            raise ValueError(f"request_id must be a str, got {type(request_id).__name__} {request_id!r:.80}")
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                # A prompt admitted into the step launched ahead counts that step's tokens as
                # computed, but its blocks would enter the prefix cache only with the step's
                # results: enter them now, as a synchronous step would have. The step runs on the
                # device whatever happens here, before any later step that could read them.
                self.blocks.cache_computed([seq])
                self._finish(seq, "abort")
        return request.output(True)

    def close(self) -> None:
        """Free the model, its KV cache and its CUDA graphs now, and stop the tensor-parallel
        worker processes (if any), rather than when this engine is garbage-collected or the
        interpreter exits. The engine takes no requests and cannot step afterwards."""
        self._ahead = None
        self.runner.close()

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache, so later prompts compute every block again (for benchmarks
        that must not reuse an earlier run's blocks). Requests in flight are not affected."""
        self.blocks.reset_cache()

    def has_unfinished_requests(self) -> bool:
        """Whether any request is still running or waiting, so `step()` has work to do."""
        return self.scheduler.has_unfinished()

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one model step. Returns the requests that advanced, with their text so far.

        A sample that fails on its own (non-finite logits, an error in its output processing)
        finishes with finish_reason "error" and its message; the other requests go on. If the
        step itself raises (a device error, KeyboardInterrupt), no sequence counts a token it
        did not get, so stepping again goes on where the last step that completed left off.

        With async_scheduling, the next step is launched before this one's tokens reach the
        host, where its decodes are the ones the scheduler would build anyway, and waiting
        requests join it as prompt rows (`Scheduler.schedule_ahead`): this call's host work
        then overlaps the GPU's work on the next. A sequence that stops on this step's token
        drops the token the next step draws for it."""
        try:
            return self._step()
        except BaseException:
            # Counts moved at launch, for tokens that never came: every running sequence has its
            # last token to compute again (recomputing K/V already written costs one position).
            self._ahead = None
            for seq in self.scheduler.running:
                seq.num_cached_tokens = min(seq.num_cached_tokens, seq.num_tokens - 1)
            # and the decode graphs' staged inputs may be half written: the next replay refills them
            if self.runner.graphs is not None:
                self.runner.graphs.invalidate()
            raise

    def _step(self) -> list[RequestOutput]:
        pending, self._ahead = self._ahead, None
        if pending is not None and all(s.is_finished for s in pending.seqs):
            pending = None      # each token it draws would be dropped (later work follows it on the stream)
        if pending is None:
            batch = self.scheduler.schedule()
            if batch.empty:
                return []
            pending = self.runner.launch(batch, self.eos_token_id)
            computed = batch.prefills + batch.decodes
            for seq in computed:
                seq.num_cached_tokens += seq.num_scheduled_tokens
        else:
            computed = pending.computed     # launched ahead: its decodes and admitted prompt chunks
        # The blocks this step fills enter the prefix cache now, before its results: a prompt
        # admitted into the step launched ahead then reuses them as it would after the results
        # (the step that reads them runs after this one on the device).
        self.blocks.cache_computed(computed)
        sampled = pending.seqs
        ahead = self.scheduler.schedule_ahead(sampled) if self.runner.can_launch_ahead(sampled) else None
        if ahead is not None:
            self._ahead = self.runner.launch_ahead(pending, ahead, self.eos_token_id)
            self._ahead.computed = ahead.prefills + ahead.decodes
            for seq in self._ahead.computed:
                seq.num_cached_tokens += seq.num_scheduled_tokens
        results = self.runner.collect(pending)
        advanced: dict[str, _Request] = {}
        for seq, result in zip(sampled, results):
            if seq.is_finished:     # stopped (or aborted) after the step ahead was launched
                continue
            request = self.requests[seq.request_id]
            advanced[seq.request_id] = request
            if seq.num_output_tokens == 0 and seq.index == 0:
                request.prompt_logprobs = seq.prompt_logprobs
            if seq.forks:
                self.scheduler.fork(seq)
            if result.error:
                seq.error = result.error
                self._finish(seq, "error")
                continue
            try:
                self._append(seq, result)
            except Exception as err:    # this sample alone fails; the batch goes on
                seq.error = f"{type(err).__name__}: {err}"
                self._finish(seq, "error")
        outputs = []
        for request_id, request in advanced.items():
            finished = request.finished
            if finished:
                del self.requests[request_id]
            if finished or (self.stream_outputs and request.params.output_kind != "final_only"):
                outputs.append(request.output(finished))
        return outputs

    def _append(self, seq: Sequence, result: StepResult) -> None:
        token = result.token
        seq.append_token(token)
        seq.cumulative_logprob += result.logprob
        if seq.output_logprobs is not None:
            seq.output_logprobs.append({token: result.logprob, **(result.top_logprobs or {})})
        checked = len(seq.text)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.step(token)
        reason = self._stop_reason(seq, token, checked)
        if reason:
            self.scheduler.finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` outside the stop checks (aborted, failed), with the text of its tokens."""
        try:
            self._final_text(seq)
        except Exception:   # a sample failing in its detokenizer keeps the text it had
            pass
        self.scheduler.finish(seq, reason)

    def _final_text(self, seq: Sequence, stop_token: bool = False, before: int = 0) -> None:
        """A finished sample's whole text: the incremental decoder's last, incomplete character,
        or, where the text was not streamed, all of it decoded at once. With `stop_token` the
        last token's text is left out: the streamed text as it was before that token (`before`
        chars; an incomplete character still held back goes too), or the ids before it decoded."""
        if seq.detokenizer is not None:
            seq.text = seq.text[:before] if stop_token else seq.text + seq.detokenizer.flush()
        elif self.tokenizer is not None:
            ids = seq.output_token_ids[:-1] if stop_token else seq.output_token_ids
            seq.text = self.tokenizer.decode(ids, seq.params.skip_special_tokens)

    def _stop_reason(self, seq: Sequence, token: int, checked: int) -> str | None:
        """Why `seq` stops after `token`, or None; `checked` chars of its text had no stop string
        (the text before `token`'s)."""
        params = seq.params
        may_stop = seq.num_output_tokens >= params.min_tokens
        reason = None
        if may_stop and ((token == self.eos_token_id and not params.ignore_eos)
                         or token in params.stop_token_ids):
            # A stop token stays in token_ids, its text is not output (vLLM's rule, EOS too)
            self._final_text(seq, stop_token=True, before=checked)
            return "stop"
        if seq.num_output_tokens >= params.max_tokens:
            reason = "length"
        if reason:
            self._final_text(seq)
        if may_stop:
            # The earliest stop string in the text wins, whichever is listed first.
            found = [at for stop in params.stop if (at := seq.text.find(stop, max(0, checked - len(stop) + 1))) >= 0]
            if found:
                seq.text = seq.text[:min(found)]  # the stop string is not part of the output
                return "stop"
        return reason
