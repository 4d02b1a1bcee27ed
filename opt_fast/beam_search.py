"""Beam search on top of the engine (`LLM.beam_search`).

Each round asks the engine for the next-token candidates of every live beam: one request per
beam, one greedy token with the top `2 * beam_width` logprobs of the raw distribution. Of all
the continuations of a prompt's beams, ranked by cumulative logprob, the best `beam_width` that
do not end in EOS go on; those ending in EOS among the first `beam_width` are kept as finished
(Hugging Face's rule). The prefix cache keeps a round cheap: a beam's request shares every full
KV block of its tokens with the request of the round before, so it computes only the last
partial block and the new token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import positive_int
from .sampling_params import MAX_SAMPLES, SamplingParams, finite_float


@dataclass
class BeamSearchParams:
    """`beam_width` beams (up to MAX_SAMPLES), each up to `max_tokens` new tokens. A finished or
    final beam scores cumulative_logprob / len(token_ids) ** length_penalty; `ignore_eos` lets
    beams run past EOS. Bad values raise ValueError naming the field."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self):
        self.beam_width = positive_int("beam_width", self.beam_width)
        if self.beam_width > MAX_SAMPLES:
            raise ValueError(f"beam_width must be at most {MAX_SAMPLES}, got {self.beam_width}")
        self.max_tokens = positive_int("max_tokens", self.max_tokens)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self.length_penalty = finite_float("length_penalty", self.length_penalty)


@dataclass
class BeamSearchSequence:
    """One beam: its new tokens (EOS included when it ended there), their text, the sum of their
    logprobs, its score, and why it ended ("stop": EOS; "length": max_tokens)."""
    token_ids: list[int]
    text: str | None
    cumulative_logprob: float
    score: float
    finish_reason: str


@dataclass
class BeamSearchOutput:
    """A prompt's best `beam_width` beams, best score first."""
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]


def beam_search(llm, prompts: list, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search for each of `prompts` (strings or token-id lists) on `llm` (an LLM), all
    prompts' beams in one engine batch per round."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    engine = llm.engine
    prompt_ids = [engine._prompt_ids(p)[1] for p in prompts]
    for ids in prompt_ids:      # what add_request would reject in a late round, up front
        engine.check_fits(len(ids), params.max_tokens)
    width, eos = params.beam_width, None if params.ignore_eos else engine.eos_token_id
    step = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                          logprobs=min(2 * width, engine.vocab_size))
    live = [[([], 0.0)] for _ in prompts]           # per prompt: (new tokens, cumulative logprob)
    done: list[list[tuple[list[int], float, str]]] = [[] for _ in prompts]
    for length in range(1, params.max_tokens + 1):
        beams = [(i, tokens, total) for i, beams_i in enumerate(live) for tokens, total in beams_i]
        if not beams:
            break
        outs = llm.generate([prompt_ids[i] + tokens for i, tokens, _ in beams], step, use_tqdm=False)
        candidates: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]
        for (i, tokens, total), out in zip(beams, outs):
            completion = out.outputs[0]
            if completion.finish_reason == "error":
                raise RuntimeError(f"beam search: the step after {len(tokens)} tokens failed: {completion.error}")
            for token, logprob in completion.logprobs[0].items():
                candidates[i].append((total + logprob, tokens + [token]))
        for i, ranked in enumerate(candidates):
            ranked.sort(key=lambda c: c[0], reverse=True)
            live[i] = []
            for rank, (total, tokens) in enumerate(ranked):
                if tokens[-1] == eos:
                    if rank < width:
                        done[i].append((tokens, total, "stop"))
                    continue
                live[i].append((tokens, total))
                if len(live[i]) == width:
                    break
            if _cannot_improve(done[i], live[i], width, length, params):
                live[i] = []
    tokenizer = engine.tokenizer
    results = []
    for i, prompt in enumerate(prompts):
        ended = done[i] + [(tokens, total, "length") for tokens, total in live[i]]
        sequences = [BeamSearchSequence(tokens, tokenizer.decode(tokens) if tokenizer else None, total,
                                        _score(total, len(tokens), params), reason)
                     for tokens, total, reason in ended]
        sequences.sort(key=lambda s: s.score, reverse=True)
        results.append(BeamSearchOutput(prompt if isinstance(prompt, str) else None, prompt_ids[i],
                                        sequences[:width]))
    return results


def _score(total: float, length: int, params: BeamSearchParams) -> float:
    try:
        return total / length ** params.length_penalty
    except (OverflowError, ZeroDivisionError):
        # A penalty in the hundreds takes length ** penalty past float's range (or to 0): the
        # same score with the exponent held inside it, about -0 or -inf.
        exponent = -params.length_penalty * math.log(length)
        return total * math.exp(max(-700.0, min(700.0, exponent)))


def _cannot_improve(done: list, live: list, width: int, length: int, params: BeamSearchParams) -> bool:
    """Whether no live beam can still beat the worst of the best `width` finished ones (so the
    prompt's search ends; HF's canonical stop). Logprobs only lower a beam's total, so its best
    attainable score is its total now over the length that favours it most: the longest
    possible with a positive length_penalty, else the current one."""
    if len(done) < width or not live:
        return False
    worst_kept = sorted((_score(total, len(tokens), params) for tokens, total, _ in done), reverse=True)[width - 1]
    best_total = max(total for _, total in live)
    return worst_kept >= _score(best_total, params.max_tokens if params.length_penalty > 0 else length, params)
