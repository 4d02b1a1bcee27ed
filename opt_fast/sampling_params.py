"""SamplingParams: how one request is decoded, validated on construction."""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import check_seed


OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# Temperatures below this are greedy (vLLM's rule): dividing logits by much less overflows
# float32 (at about 1e-37 for logits near 10) and the draw would take garbage.
GREEDY_BELOW = 1e-5
# Samples of one request (n), and beams of a beam search: each is a sequence the engine builds at
# once and schedules, so an unbounded count is a way to stall or exhaust the process.
MAX_SAMPLES = 1024
# The sampler's per-row integers travel as int64, its temperatures and penalties as float32:
# a value past float32's range would reach it as inf (a temperature of inf, or a penalty of 0 or
# inf, makes every scaled logit alike or NaN); penalties are kept to its normal numbers.
_INT64_MAX = 2 ** 63 - 1
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_MIN_NORMAL = torch.finfo(torch.float32).tiny


@dataclass
class SamplingParams:
    """Per-request decoding settings (DESIGN.md §3).

    temperature 0 is greedy (as is any temperature below GREEDY_BELOW, stored as 0); top_k 0 or
    -1 is off; repetition_penalty follows Hugging Face (CTRL) over prompt + output ids and is
    applied before temperature, then top-k, then top-p. `seed`
    makes the draws reproducible whatever else is in the batch. `logprobs` / `prompt_logprobs`
    ask for the sampled (or actual prompt) token plus the top N of the raw distribution.
    Bad values raise ValueError naming the field. Integer fields also take numpy integers, up to
    2**63 - 1 (kept as Python ints), and float fields numpy floats (kept as Python floats).
    `n > 1` (up to MAX_SAMPLES) with temperature 0 gives n copies of the greedy output.
    """
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Extensions beyond DESIGN.md §3, for FlagAI's Predictor: apply the penalty to log-softmax
    # values rather than raw logits (FlagAI's order), and ids that are never drawn (FlagAI bans <unk>).
    penalty_on_logprobs: bool = False
    banned_token_ids: list[int] | None = None
    # What a streaming Engine / AsyncEngine returns after each step (vLLM's RequestOutputKind):
    # "cumulative" every token and the whole text so far; "delta" only what is new since the
    # request's previous output (cumulative_logprob stays the total); "final_only" the finished
    # output alone. LLM.generate returns whole final outputs whatever this says.
    output_kind: str = "cumulative"

    def __post_init__(self):
        self.n = _int("n", self.n, low=1)
        if self.n > MAX_SAMPLES:
            raise ValueError(f"n must be at most {MAX_SAMPLES}, got {self.n}")
        self.temperature = finite_float("temperature", self.temperature)
        if not 0 <= self.temperature <= _FLOAT32_MAX:
            raise ValueError(f"temperature must be >= 0 (0 means greedy) and at most float32's largest, "
                             f"{_FLOAT32_MAX:.4g}, got {self.temperature!r}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        self.top_k = _int("top_k", self.top_k, low=-1)
        self.top_p = finite_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.repetition_penalty = finite_float("repetition_penalty", self.repetition_penalty)
        if not _FLOAT32_MIN_NORMAL <= self.repetition_penalty <= _FLOAT32_MAX:
            raise ValueError(f"repetition_penalty must be > 0, within float32's normal range "
                             f"[{_FLOAT32_MIN_NORMAL:.4g}, {_FLOAT32_MAX:.4g}], got {self.repetition_penalty!r}")
        self.max_tokens = _int("max_tokens", self.max_tokens, low=1)
        self.min_tokens = _int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        # taken once into a list: an iterator would be used up by the check, an array cannot be
        # asked for its truth
        stops = list(self.stop) if _many(self.stop) and self.stop is not None else self.stop
        if not _many(stops) or not all(isinstance(s, str) and s for s in stops or []):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = [str(s) for s in stops or []]
        self.stop_token_ids = _ids("stop_token_ids", self.stop_token_ids)
        self.banned_token_ids = _ids("banned_token_ids", self.banned_token_ids)
        if self.seed is not None:
            self.seed = check_seed("seed", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _int(name, getattr(self, name), low=0))
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        for name in ("ignore_eos", "skip_special_tokens", "penalty_on_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax (temperature 0) rather than drawn."""
        return self.temperature == 0


def _int(name: str, value, low: int | None) -> int:
    """`value` as a Python int (numpy integers included; bools are not integers here), at most
    2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if value > _INT64_MAX:
        raise ValueError(f"{name} must be <= 2**63 - 1, got {value!r}")
    return int(value)


def _many(value) -> bool:
    """None, or a collection of items (a list, tuple, set, array): not a lone string or number,
    nor a dict (whose keys would pass for the items)."""
    return value is None or (isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)))


def _ids(name: str, value) -> list[int]:
    """A list of token ids (None is empty)."""
    if not _many(value):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    return [_int(name, token, low=0) for token in ([] if value is None else value)]


def finite_float(name: str, value) -> float:
    """`value` as a Python float (ints and numpy floats included; bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        result = float(value)
    except OverflowError:           # an int past float's range
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {value!r:.80}")
    return result
