"""Small offline stand-ins for a real checkpoint: a byte-level BPE tokenizer trained on Python's
own standard-library sources, and OPT checkpoints with random weights in the Hugging Face layout.

They exercise the whole machinery with no network and no GPU (tests, benchmarks); random weights
produce text without meaning. The trained model that `make run` uses is opt_fast.bundled.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

from .config import OPTConfig

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]   # ids 0..3, as in OPT
_CORPUS_MODULES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
                   "colorsys.py", "keyword.py", "glob.py", "struct.py")


def stdlib_corpus() -> list[str]:
    """A few standard-library modules' sources: public text present on every Python install."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / name).read_text(encoding="utf-8") for name in _CORPUS_MODULES if (lib / name).is_file()]


def train_tokenizer(out_dir: str | Path, vocab_size: int = 1000, texts: list[str] | None = None) -> Path:
    """Train a byte-level BPE with OPT's special tokens first; writes vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts or stdlib_corpus(), vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.save_model(str(out_dir))
    return out_dir


def random_state_dict(config: OPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Every tensor of an HF OPT checkpoint (`model.decoder.*` keys), drawn at random."""
    h, f, p = config.hidden_size, config.ffn_dim, config.word_embed_proj_dim
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std):
        return (torch.randn(shape, generator=g) * std).to(dtype)

    def norm_pair(prefix):
        return {f"{prefix}.weight": (torch.rand(h, generator=g) * 0.5 + 0.75).to(dtype),
                f"{prefix}.bias": normal(h, std=0.02)}

    d = "model.decoder"
    state = {f"{d}.embed_tokens.weight": normal(config.vocab_size, p, std=0.3),
             f"{d}.embed_positions.weight": normal(config.max_position_embeddings + 2, h, std=1.0)}
    if config.has_projections:
        state[f"{d}.project_in.weight"] = normal(h, p, std=p ** -0.5)
        state[f"{d}.project_out.weight"] = normal(p, h, std=h ** -0.5)
    for i in range(config.num_hidden_layers):
        layer = f"{d}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{layer}.self_attn.{proj}.weight"] = normal(h, h, std=h ** -0.5)
            state[f"{layer}.self_attn.{proj}.bias"] = normal(h, std=0.02)
        state.update(norm_pair(f"{layer}.self_attn_layer_norm"))
        state[f"{layer}.fc1.weight"] = normal(f, h, std=h ** -0.5)
        state[f"{layer}.fc1.bias"] = normal(f, std=0.02)
        state[f"{layer}.fc2.weight"] = normal(h, f, std=f ** -0.5)
        state[f"{layer}.fc2.bias"] = normal(h, std=0.02)
        state.update(norm_pair(f"{layer}.final_layer_norm"))
    if config.has_final_layer_norm:
        state.update(norm_pair(f"{d}.final_layer_norm"))
    return state


def write_random_checkpoint(out_dir: str | Path, config: OPTConfig, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> Path:
    """config.json + model.safetensors with random weights, loadable by opt_fast and transformers."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    save_file(random_state_dict(config, seed, dtype), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
