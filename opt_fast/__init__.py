"""opt_fast: fast batch inference for Meta's OPT models."""
from .async_engine import AsyncEngine, EngineDeadError
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .engine.engine import Engine
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "Engine", "AsyncEngine", "EngineDeadError", "SamplingParams", "RequestOutput",
           "CompletionOutput", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"]
__version__ = "0.1.0"
