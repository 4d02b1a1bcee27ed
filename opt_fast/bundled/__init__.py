"""The small trained OPT that ships with opt_fast, so generation works offline with no download.

`opt-tiny-py` (5.4M parameters, float16) was trained on CPU on Python's standard-library sources
by `scripts/train_tiny.py`; MODEL_CARD.md beside the weights says how, and how well. It shows the
machinery end to end (`make run`, `opt-fast generate` without `--model`); it is not a capable model.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "opt-tiny-py"


def default_model_dir() -> Path:
    """Directory of the bundled model (HF layout: config.json, model.safetensors, vocab.json,
    merges.txt), found beside this module so it works from a clone and from an install."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL
