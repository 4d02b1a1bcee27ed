"""opt_fast: fast batch inference for Meta's OPT models."""
from .engine.engine import Engine
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "Engine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
