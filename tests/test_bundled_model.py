"""The bundled model (opt_fast/bundled/opt-tiny-py/): complete, small, OPT-shaped, loads with
opt_fast and transformers, generates deterministically, is actually trained, and `make run` uses it."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from opt_fast import LLM, SamplingParams, bundled
from opt_fast.config import OPTConfig
from opt_fast.tokenizer import OPTTokenizer
from opt_testing import REPO, test_device

MODEL = bundled.default_model_dir()
FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "MODEL_CARD.md")
# Held out of training by scripts/train_tiny.py (VALIDATION_FILES); the first tokens are scored.
HELD_OUT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
SCORED_TOKENS = 256
# No trailing newline: byte-level BPE merges a newline with the next line's indent, so a prompt
# ending in a bare "\n" asks for a token that rarely follows a colon in training.
PROMPTS = ["def read_config(path):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef main():"]


@pytest.fixture(scope="module")
def llm():
    return LLM(str(MODEL), dtype="float32", device=test_device(), kernels="torch")


def held_out_ids(tokenizer: OPTTokenizer) -> list[int]:
    return tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"))[:SCORED_TOKENS]


def token_logprobs(llm: LLM, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, through the engine's prompt_logprobs."""
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [entry[token] for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]


def mean_nll(llm: LLM, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood (nats) of `ids`."""
    logprobs = token_logprobs(llm, ids)
    return -sum(logprobs) / len(logprobs)


def test_default_model_dir_is_the_package_folder_and_holds_every_file():
    assert MODEL.parent == Path(bundled.__file__).resolve().parent
    missing = [name for name in FILES if not (MODEL / name).is_file()]
    assert not missing, f"{MODEL} lacks {missing}"
    total = sum(f.stat().st_size for f in MODEL.iterdir())
    assert total <= 20_000_000, f"bundled model is {total / 1e6:.1f} MB, the limit is 20 MB"


def test_config_is_a_pre_ln_opt_sized_to_its_tokenizer():
    config = OPTConfig.from_json(MODEL / "config.json")
    assert config.do_layer_norm_before and config.has_final_layer_norm and not config.has_projections
    assert config.head_dim == 64       # the head size every Triton kernel is tested with
    tokenizer = OPTTokenizer.from_dir(MODEL)
    # Embedding rows: the tokenizer's ids rounded up to a multiple of 8, as OPT's 50265 -> 50272.
    assert config.vocab_size % 8 == 0 and 0 < config.vocab_size - tokenizer.vocab_size < 8
    with safe_open(MODEL / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        embed = f.get_slice("model.decoder.embed_tokens.weight").get_shape()
    assert dtypes == {"F16"}
    assert embed == [config.vocab_size, config.hidden_size]


def test_tokenizer_has_opt_special_ids():
    vocab = json.loads((MODEL / "vocab.json").read_text(encoding="utf-8"))
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    tokenizer = OPTTokenizer.from_dir(MODEL)
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 1
    text = "    def __init__(self):\n        return None\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 2 and tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2    # trained merges: whole keywords and indents, not bytes


def test_greedy_generation_is_deterministic_and_python_shaped(llm):
    params = SamplingParams(temperature=0, max_tokens=32)
    first = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    # Alone and in another batch order, each prompt continues the same way.
    again = [o.outputs[0] for o in llm.generate(PROMPTS[::-1], params, use_tqdm=False)][::-1]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in PROMPTS]
    assert [c.token_ids for c in first] == [c.token_ids for c in alone]
    for completion in first:
        assert len(set(completion.token_ids)) >= 5, completion.text       # not one id repeated
    text = "".join(c.text for c in first)
    assert "\n    " in text and any(word in text for word in ("return", "self.", "if ", "def "))


def test_model_is_trained_far_beyond_chance(llm, tmp_path):
    """A held-out standard-library module scores far below chance, and the same architecture with
    random weights does not: the test fails for an untrained checkpoint."""
    from opt_fast.demo import write_random_checkpoint
    config = OPTConfig.from_json(MODEL / "config.json")
    chance = math.log(llm.get_tokenizer().vocab_size)
    ids = held_out_ids(llm.get_tokenizer())
    trained = mean_nll(llm, ids)
    random_dir = write_random_checkpoint(tmp_path, config, seed=0)
    for name in ("vocab.json", "merges.txt"):
        (random_dir / name).write_bytes((MODEL / name).read_bytes())
    untrained = mean_nll(LLM(str(random_dir), dtype="float32", device=test_device(), kernels="torch"), ids)
    assert untrained > 0.8 * chance, (untrained, chance)
    # 0.6 x chance (5.4 nats) is well below the training corpus's unigram frequencies (7.3 nats
    # on these tokens): passing takes context, not token counts. The bundled model scores 4.7.
    assert trained < 0.6 * chance, (trained, untrained, chance)


def test_transformers_loads_the_same_model(llm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.OPTForCausalLM.from_pretrained(MODEL).float().eval()
    ids = held_out_ids(llm.get_tokenizer())[:64]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, :-1, :llm.get_tokenizer().vocab_size]
    expected = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ours = torch.tensor(token_logprobs(llm, ids), dtype=torch.float64)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)


def test_make_run_demo_generates_with_the_bundled_model():
    done = subprocess.run([sys.executable, "scripts/demo.py"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(MODEL) in done.stdout
    for prompt in ("def read_config(path):", "class Stack:"):
        assert prompt in done.stdout
    counts = [int(n) for n in re.findall(r"(\d+) tokens \(", done.stdout)]
    assert len(counts) == 3 and min(counts) > 0, done.stdout    # a header per prompt, with its count
