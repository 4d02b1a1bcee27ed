"""Shared fixtures: tiny random OPT checkpoints saved by Hugging Face transformers.

Every parameter of the reference model is randomised (HF initialises LayerNorms to 1/0 and
biases to 0, which would hide mistakes in those paths), then saved with `save_pretrained`.
A tiny byte-level BPE tokenizer trained by `tokenizers` goes beside it, and the model's
vocabulary has 7 padding rows past the tokenizer's, as real OPT has (50265 vs 50272).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OPT_TOKENIZER_DIR = REPO.parent / "shared" / "opt-tokenizer"
PADDING_ROWS = 7

# name -> transformers.OPTConfig overrides (vocab_size is set from the tokenizer)
TINY_SHAPES = {
    "pre_ln": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                   word_embed_proj_dim=64, do_layer_norm_before=True),
    "post_ln_350m": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                         word_embed_proj_dim=48, do_layer_norm_before=False),
    "head_dim_80": dict(hidden_size=160, num_hidden_layers=2, num_attention_heads=2, ffn_dim=200,
                        word_embed_proj_dim=160, do_layer_norm_before=True),
}


def test_device() -> str:
    """Tests run on CUDA where there is one (the lent GPU machine), else on CPU."""
    return os.environ.get("OPT_FAST_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


test_device.__test__ = False  # not a test, despite the name


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from opt_fast.demo import train_tokenizer
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out, vocab_size=400)
    return out


def randomise_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                values = torch.rand(param.shape, generator=generator) + 0.5
            elif "embed_tokens" in name:
                values = torch.randn(param.shape, generator=generator) * 0.3
            elif "embed_positions" in name:
                # Large position rows make every step's hidden state differ, so greedy outputs
                # vary token to token instead of repeating one id (a weak parity check).
                values = torch.randn(param.shape, generator=generator)
            elif param.dim() == 2:
                values = torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
            else:
                values = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(values)


def build_hf_model(shape: str, vocab_size: int, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=vocab_size, max_position_embeddings=128,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                    **TINY_SHAPES[shape])
    model = transformers.OPTForCausalLM(config).eval()
    randomise_(model, seed)
    model.tie_weights()
    return model


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
