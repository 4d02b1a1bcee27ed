"""Shared fixtures: tiny random OPT checkpoints saved by Hugging Face transformers.

Every parameter of the reference model is randomised (see opt_testing.randomise_), then saved
with `save_pretrained`. A tiny byte-level BPE tokenizer trained by `tokenizers` goes beside it,
and the model's vocabulary has 7 padding rows past the tokenizer's, as real OPT has (50265 vs
50272).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import opt_fast.kernels  # noqa: F401  (before any test module imports triton: see check_interpreter)
import torch
from opt_testing import PADDING_ROWS, TINY_SHAPES, build_hf_model
import async_switch


# Under pytest-xdist (`make test` runs one worker per core) each worker takes its share of the
# cores: torch's default of one thread per core in every worker would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    """OPT_FAST_TEST_ASYNC=1: every CPU Engine runs async scheduling on emulated decode graphs
    (see async_switch.py); unset, nothing changes."""
    async_switch.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    async_switch.set_current(item.nodeid)
    yield
    async_switch.set_current("<between tests>")


def pytest_terminal_summary(terminalreporter):
    async_switch.summary(terminalreporter.write_line)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from opt_fast.demo import train_tokenizer
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out, vocab_size=400)
    return out


@pytest.fixture(scope="session", params=sorted(TINY_SHAPES))
def hf_checkpoint(request, tmp_path_factory, tiny_tokenizer_dir):
    """(shape name, checkpoint dir, HF model in float32 on CPU) for every tiny shape."""
    from opt_fast.tokenizer import OPTTokenizer
    vocab = OPTTokenizer.from_dir(tiny_tokenizer_dir).vocab_size + PADDING_ROWS
    model = build_hf_model(request.param, vocab)
    out = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    model.save_pretrained(out)
    for f in tiny_tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return request.param, out, model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A small pre-LN OPT with random weights in opt_fast's own writer, plus the tiny tokenizer."""
    from opt_fast.config import OPTConfig
    from opt_fast.demo import write_random_checkpoint
    from opt_fast.tokenizer import OPTTokenizer
    vocab = OPTTokenizer.from_dir(tiny_tokenizer_dir).vocab_size + PADDING_ROWS
    config = OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)
    out = write_random_checkpoint(tmp_path_factory.mktemp("tiny-model"), config, seed=1)
    for f in tiny_tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out
