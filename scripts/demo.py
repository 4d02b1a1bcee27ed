"""`make run`: generate with opt_fast on a small bundled-at-build-time OPT, offline, on CPU or GPU.

The model here is a stand-in: a tokenizer trained on Python's standard-library sources and
random weights, so the text is meaningless; it shows the machinery end to end. (A small trained
model ships in the repository with the engine issue.)
"""
from __future__ import annotations

import sys
from pathlib import Path

from opt_fast.cli import main
from opt_fast.demo import build_demo_model

model_dir = build_demo_model(Path(__file__).resolve().parents[1] / ".demo" / "model")
print(f"demo model (random weights, not a trained model): {model_dir}")
sys.exit(main(["generate", "--model", str(model_dir), "--prompt", "def read_config(path):",
               "--prompt", "import os\n", "--prompt", "class Stack:", "--max-tokens", "24",
               "--temperature", "0.8", "--top-p", "0.9", "--repetition-penalty", "1.3", "--seed", "0"]))
