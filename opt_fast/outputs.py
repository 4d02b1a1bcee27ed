"""What generation returns: one RequestOutput per request, one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence. `logprobs[i]` maps token id -> raw logprob for output token i
    (the sampled id plus the top N) when SamplingParams.logprobs is set."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" | None while running
    error: str | None = None           # why, when finish_reason is "error" (this sample alone failed)


@dataclass(slots=True)
class RequestOutput:
    """A request's state: its prompt, and its completions so far (final when `finished`).
    `prompt_logprobs[0]` is None; entry i maps the actual prompt token (and the top N) to its
    logprob given the tokens before it. `num_cached_tokens`: prompt tokens whose KV cache came
    from the prefix cache instead of being computed (as in vLLM)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
