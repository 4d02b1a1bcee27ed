"""`make run`: generate Python with the small OPT bundled in the package, offline, on CPU or GPU.

The model (opt_fast/bundled/opt-tiny-py/, see its MODEL_CARD.md) was trained for minutes on a
CPU on Python's standard library by scripts/train_tiny.py: it writes Python-shaped text, not
working code. It shows the machinery end to end with nothing to download.
"""
from __future__ import annotations

from opt_fast import LLM, SamplingParams
from opt_fast.bundled import default_model_dir

# Prompts end without a newline: the tokenizer merges a newline with the next line's indent, so
# the model should choose that token itself.
PROMPTS = ["def read_config(path):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef main():"]

model_dir = default_model_dir()
print(f"bundled demo model (tiny, trained on the Python standard library): {model_dir}")
llm = LLM(str(model_dir))
params = SamplingParams(temperature=0.3, top_p=0.9, repetition_penalty=1.1, max_tokens=48, seed=0)
for out in llm.generate(PROMPTS, params, use_tqdm=False):
    print(f"\n--- prompt {out.prompt!r}, {len(out.outputs[0].token_ids)} tokens "
          f"({out.outputs[0].finish_reason})\n{out.prompt}{out.outputs[0].text}")
