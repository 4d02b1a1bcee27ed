"""A sequence being generated: its tokens, its KV blocks and its stopping state."""
from __future__ import annotations

import array
from enum import Enum, auto
from itertools import count

from ..sampling_params import SamplingParams


# The "block before" a sequence's first block, in prefix-cache keys (block_manager.py).
NO_BLOCK = (-1, 0)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int):
        self.seq_id = next(Sequence._ids)
        self.request_id, self.index = request_id, index
        self.token_ids = list(prompt_token_ids)
        # The same ids packed as int64, grown with them (append_token): the sampler's seen_ids
        # for a repetition penalty are then a memcpy per row, not a Python loop over every token.
        self.token_array = array.array("q", self.token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params, self.seed = params, seed
        self.status = SequenceStatus.WAITING
        # int32, as the kernels read block tables: a step packs each sequence's with one byte copy.
        self.block_table = array.array("i")
        self.num_cached_tokens = 0          # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0       # tokens this step computes (a prefill chunk, or 1)
        # Prefix cache: leading blocks already entered (or found) there, and the (block,
        # generation) the next full block chains to.
        self.num_keyed_blocks, self.prefix_parent = 0, NO_BLOCK
        self.num_prompt_tokens_reused = 0   # found in the prefix cache when the prompt was scheduled
        self.forks: list[Sequence] = []     # samples 1..n-1, waiting to share this one's prompt
        # Filled chunk by chunk by the runner (sample 0 only); entry 0 has no context, so None.
        self.prompt_logprobs: list | None = ([None] * len(prompt_token_ids)
                                             if params.prompt_logprobs is not None and index == 0 else None)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.detokenizer = None             # set by the engine when a tokenizer is loaded

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        self.token_array.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def samples_this_step(self) -> bool:
        """Whether this step's tokens reach the end of the sequence, so a token is drawn."""
        return self.num_cached_tokens + self.num_scheduled_tokens == self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


def samples_raw_logits(seqs: list[Sequence]) -> bool:
    """Whether no sequence's settings change the logits before the draw (no penalty, no banned
    ids; min_tokens bans are checked per step): a CUDA graph's built-in draw serves them."""
    return all(s.params.repetition_penalty == 1.0 and not s.params.penalty_on_logprobs
               and not s.params.banned_token_ids for s in seqs)
