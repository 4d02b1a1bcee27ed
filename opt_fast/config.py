"""Model and engine configuration.

`OPTConfig` mirrors the fields of a Hugging Face OPT `config.json` that change the computation;
`OPT_PRESETS` holds the six published sizes; `EngineConfig` validates the keyword arguments that
`LLM` and `Engine` accept.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class OPTConfig:
    """The shape of an OPT model, read from a Hugging Face config.json (`from_json`); validated
    on construction (ValueError naming the field)."""
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    word_embed_proj_dim: int = 768
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    # Only the converted OPT-350m checkpoint drops the final LayerNorm: HF applies the final
    # LN when `do_layer_norm_before and not _remove_final_layer_norm`.
    remove_final_layer_norm: bool = False
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    activation_function: str = "relu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "ffn_dim", "word_embed_proj_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"OPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            # the engine indexes logits and stops on them: an id past the vocabulary would fail
            # every step of every request in flight, not just the checkpoint's load
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(f"OPTConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), "
                                 f"got {value!r}")
        for name in ("do_layer_norm_before", "remove_final_layer_norm", "layer_norm_elementwise_affine",
                     "enable_bias"):
            if not isinstance(getattr(self, name), bool):   # JSON's "false" would read as true
                raise ValueError(f"OPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"OPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.activation_function != "relu":
            raise ValueError(f"OPTConfig.activation_function {self.activation_function!r} is not "
                             "supported: every OPT checkpoint uses 'relu'")
        if not self.layer_norm_elementwise_affine or not self.enable_bias:
            raise ValueError("OPTConfig: layer_norm_elementwise_affine=False and enable_bias=False "
                             "are not supported (no published OPT checkpoint uses them)")

    @property
    def head_dim(self) -> int:
        """Channels per attention head (64, 80 or 128 for the published sizes)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """True for OPT-350m: embeddings live in word_embed_proj_dim and are projected."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_dict(cls, raw: dict) -> "OPTConfig":
        """Build from the keys of a Hugging Face config.json: unknown keys are ignored, null
        values take the default (HF keeps them, but only word_embed_proj_dim may be null there,
        meaning hidden_size), and so is layer_norm_eps (HF's OPT LayerNorms always use 1e-5). An
        untied LM head is refused: every OPT checkpoint ties it to the embedding."""
        if raw.get("tie_word_embeddings", True) is False:
            raise ValueError("OPTConfig: tie_word_embeddings=false (a separate lm_head) is not supported: "
                             "every OPT checkpoint ties the LM head to the token embedding")
        known = {f.name for f in fields(cls)} - {"layer_norm_eps"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if "_remove_final_layer_norm" in raw:
            values["remove_final_layer_norm"] = raw["_remove_final_layer_norm"]
        values.setdefault("word_embed_proj_dim", raw.get("hidden_size", cls.hidden_size))
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "OPTConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got a {type(raw).__name__}")
        if raw.get("model_type", "opt") != "opt":
            raise ValueError(f"{path}: model_type is {raw['model_type']!r}, expected 'opt'")
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict:
        """The config.json a Hugging Face checkpoint of this shape carries."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "remove_final_layer_norm"}
        out["_remove_final_layer_norm"] = self.remove_final_layer_norm
        out.update(model_type="opt", architectures=["OPTForCausalLM"])
        return out

    def num_parameters(self) -> int:
        """Parameter count implied by the shape (lm_head is tied, so counted once)."""
        h, f, p, layers = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim, self.num_hidden_layers
        per_layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
        total = self.vocab_size * p + (self.max_position_embeddings + 2) * h + layers * per_layer
        if self.has_projections:
            total += 2 * h * p
        if self.has_final_layer_norm:
            total += 2 * h
        return total


def _preset(hidden, layers, heads, ffn, proj=None, pre_ln=True) -> OPTConfig:
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, word_embed_proj_dim=proj or hidden, do_layer_norm_before=pre_ln)


OPT_PRESETS: dict[str, OPTConfig] = {
    "opt-125m": _preset(768, 12, 12, 3072),
    "opt-350m": _preset(1024, 24, 16, 4096, proj=512, pre_ln=False),
    "opt-1.3b": _preset(2048, 24, 32, 8192),
    "opt-2.7b": _preset(2560, 32, 32, 10240),
    "opt-6.7b": _preset(4096, 32, 32, 16384),
    "opt-13b": _preset(5120, 40, 40, 20480),
}

_NAME = re.compile(r"^(?:facebook/)?(opt-(?:125m|350m|1\.3b|2\.7b|6\.7b|13b))(?:-en)?$", re.IGNORECASE)


def hub_id_for(name: str) -> str | None:
    """Map FlagAI names (`opt-1.3b-en`) and short names (`opt-1.3b`) to `facebook/opt-1.3b`."""
    match = _NAME.match(name.strip())
    return f"facebook/{match.group(1).lower()}" if match else None


def preset_for(name: str) -> OPTConfig:
    """The preset config for any spelling of the six size names."""
    hub_id = hub_id_for(name)
    if hub_id is None:
        raise ValueError(f"model size {name!r} is not one of {sorted(OPT_PRESETS)}")
    return OPT_PRESETS[hub_id.split("/", 1)[1]]


# "auto": the model's dtype; "fp8" and its alias "fp8_e4m3": float8 e4m3 (sm_89+ with Triton kernels)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass
class EngineConfig:
    """Validated keyword arguments of `LLM` and `Engine` (see DESIGN.md §3)."""
    dtype: str = "auto"
    device: str | None = None
    kernels: str = "auto"
    tensor_parallel_size: int = 1
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    # "auto" loads the checkpoint; "dummy" fills the weights at random on the device, so a
    # benchmark of any size needs only a config.json (vLLM names this option the same way).
    load_format: str = "auto"
    # Reuse the KV blocks of prompt prefixes computed before (vLLM's option of the same name).
    enable_prefix_caching: bool = True
    # Launch each decode step before the host has read the tokens of the step in flight, so the
    # host's work on one step overlaps the GPU's on the next (vLLM's option of the same name).
    async_scheduling: bool = False
    # "fp8" stores the KV cache as float8 e4m3 (unscaled, saturated at +-448): twice the tokens
    # fit, decode reads half the bytes, at some accuracy (vLLM's option of the same name).
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be 'auto', 'float16', 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device is not None:
            _check_device(self.device)
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}")
        for name in ("tensor_parallel_size", "block_size", "max_num_seqs"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        for name in ("num_kv_blocks", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None:
                setattr(self, name, positive_int(name, getattr(self, name)))
        if self.num_kv_blocks is not None and self.num_kv_blocks > _INT32_MAX:
            # (and past int64, torch's allocator fails with a TypeError of its own)
            raise ValueError(f"num_kv_blocks must be at most 2**31 - 1 (block tables hold int32 ids), "
                             f"got {self.num_kv_blocks}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if (isinstance(self.gpu_memory_utilization, bool)
                or not isinstance(self.gpu_memory_utilization, (int, float))
                or not 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        self.seed = check_seed("seed", self.seed)
        for name in ("enforce_eager", "enable_prefix_caching", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, owner: str, kwargs: dict) -> "EngineConfig":
        """Validate the keyword arguments `owner` (a public class) received; an unknown one is a
        TypeError that names `owner`, not this class."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            hint = " (use dtype=)" if "torch_dtype" in unknown else ""
            raise TypeError(f"{owner} got unexpected keyword arguments {unknown}{hint}; it takes "
                            f"{[f.name for f in fields(cls)]}")
        return cls(**kwargs)


def _check_device(device) -> None:
    """A device torch knows, of a kind the engine runs on, that this machine has."""
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: opt_fast runs on 'cuda' or 'cpu'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}, but this machine has no CUDA device")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


SEED_LIMIT = 1 << 63
_INT32_MAX = 2 ** 31 - 1


def check_seed(name: str, value) -> int:
    """`value` as a Python int, if it is a seed: an integer (numpy's too) in [0, 2**63), each one
    its own Philox key, none folded onto another."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    """`value` as a Python int if it is a positive integer (numpy's too; bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["OPTConfig", "OPT_PRESETS", "EngineConfig", "hub_id_for", "preset_for", "ceil_div", "check_seed"]
