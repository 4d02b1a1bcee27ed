"""opt_fast.config: the six OPT presets, parameter counts, config.json parsing, name mapping and
EngineConfig validation (DESIGN.md §3, §4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opt_testing import OPT_TOKENIZER_DIR
from opt_fast.config import OPT_PRESETS, EngineConfig, OPTConfig, hub_id_for, preset_for

# DESIGN.md §4: size -> (hidden, layers, heads, head_dim, ffn, word_embed_proj_dim, do_layer_norm_before)
TABLE = {
    "opt-125m": (768, 12, 12, 64, 3072, 768, True),
    "opt-350m": (1024, 24, 16, 64, 4096, 512, False),
    "opt-1.3b": (2048, 24, 32, 64, 8192, 2048, True),
    "opt-2.7b": (2560, 32, 32, 80, 10240, 2560, True),
    "opt-6.7b": (4096, 32, 32, 128, 16384, 4096, True),
    "opt-13b": (5120, 40, 40, 128, 20480, 5120, True),
}
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                "word_embed_proj_dim", "max_position_embeddings", "do_layer_norm_before",
                "remove_final_layer_norm", "layer_norm_eps")
# Published totals (lm_head tied, counted once), as `OPTForCausalLM.num_parameters()` reports them.
PUBLISHED = {"opt-125m": 125_239_296, "opt-350m": 331_196_416}


def shape_of(config: OPTConfig) -> dict:
    return {name: getattr(config, name) for name in SHAPE_FIELDS}


def hf_config_from_table(size: str, **overrides):
    """A transformers.OPTConfig written from the DESIGN table, not from opt_fast's preset."""
    transformers = pytest.importorskip("transformers")
    hidden, layers, heads, _, ffn, proj, pre_ln = TABLE[size]
    return transformers.OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, ffn_dim=ffn, word_embed_proj_dim=proj,
                                  do_layer_norm_before=pre_ln, max_position_embeddings=2048,
                                  **overrides)


def hf_meta_param_count(hf_config) -> int:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(hf_config)
    # parameters() deduplicates shared tensors, so the tied lm_head counts once
    params = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(params.values())
    return sum(params.values())


def own_meta_param_count(config: OPTConfig) -> int:
    from opt_fast.kernels import TORCH_OPS
    from opt_fast.model.opt import OPTForCausalLM
    with torch.device("meta"):
        model = OPTForCausalLM(config, TORCH_OPS)
    return sum(p.numel() for p in model.parameters())


# ---- presets ------------------------------------------------------------------------------------

def test_exactly_the_six_published_sizes():
    assert set(OPT_PRESETS) == set(TABLE)


@pytest.mark.parametrize("size", sorted(TABLE))
def test_preset_shape_matches_design_table(size):
    hidden, layers, heads, head_dim, ffn, proj, pre_ln = TABLE[size]
    c = OPT_PRESETS[size]
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.ffn_dim,
            c.word_embed_proj_dim, c.do_layer_norm_before) == (hidden, layers, heads, head_dim, ffn,
                                                                proj, pre_ln)
    assert c.vocab_size == 50272 and c.max_position_embeddings == 2048
    assert c.layer_norm_eps == 1e-5 and c.activation_function == "relu"
    assert c.remove_final_layer_norm is False
    # only 350m is post-LN, projects its embeddings and has no final LayerNorm
    assert c.has_projections is (size == "opt-350m")
    assert c.has_final_layer_norm is (size != "opt-350m")


# ---- parameter counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(TABLE))
def test_num_parameters_matches_hf_and_own_module(size):
    config = OPT_PRESETS[size]
    expected = hf_meta_param_count(hf_config_from_table(size))
    assert config.num_parameters() == expected
    assert own_meta_param_count(config) == expected


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_num_parameters_published_totals(size):
    assert OPT_PRESETS[size].num_parameters() == PUBLISHED[size]
    assert hf_meta_param_count(hf_config_from_table(size)) == PUBLISHED[size]


@pytest.mark.parametrize("pre_ln,remove_final", [(True, True), (True, False), (False, False)])
def test_num_parameters_follows_final_layer_norm_rule(pre_ln, remove_final):
    config = OPTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                       ffn_dim=80, word_embed_proj_dim=32, max_position_embeddings=64,
                       do_layer_norm_before=pre_ln, remove_final_layer_norm=remove_final)
    transformers = pytest.importorskip("transformers")
    hf = transformers.OPTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3,
                                num_attention_heads=4, ffn_dim=80, word_embed_proj_dim=32,
                                max_position_embeddings=64, do_layer_norm_before=pre_ln,
                                _remove_final_layer_norm=remove_final)
    expected = hf_meta_param_count(hf)
    assert config.num_parameters() == expected == own_meta_param_count(config)
    assert config.has_final_layer_norm is (pre_ln and not remove_final)


# ---- config.json --------------------------------------------------------------------------------

def test_from_json_reads_the_real_opt_13b_config():
    path = OPT_TOKENIZER_DIR / "opt-13b-config.json"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    config = OPTConfig.from_json(path)
    assert shape_of(config) == shape_of(OPT_PRESETS["opt-13b"])
    assert config.head_dim == 128 and config.has_final_layer_norm
    assert config.num_parameters() == OPT_PRESETS["opt-13b"].num_parameters()


def write_json(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))
    return path


def test_from_json_reads_a_transformers_written_350m_style_config(tmp_path):
    hf = hf_config_from_table("opt-350m")
    hf.to_json_file(str(tmp_path / "config.json"))
    config = OPTConfig.from_json(tmp_path / "config.json")
    assert shape_of(config) == shape_of(OPT_PRESETS["opt-350m"])
    assert not config.has_final_layer_norm and config.has_projections


@pytest.mark.parametrize("flag", [True, False])
def test_from_json_handles_remove_final_layer_norm(tmp_path, flag):
    raw = dict(model_type="opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=96, word_embed_proj_dim=64, do_layer_norm_before=True,
               _remove_final_layer_norm=flag)
    config = OPTConfig.from_json(write_json(tmp_path / "config.json", raw))
    assert config.remove_final_layer_norm is flag
    assert config.has_final_layer_norm is (not flag)


def test_from_json_defaults(tmp_path):
    """No `_remove_final_layer_norm` means the final LN is kept; no `word_embed_proj_dim` means
    the embedding lives in hidden_size (as in HF's OPTConfig)."""
    raw = dict(model_type="opt", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=128, do_layer_norm_before=True, torch_dtype="float16", dropout=0.1)
    config = OPTConfig.from_json(write_json(tmp_path / "config.json", raw))
    assert config.remove_final_layer_norm is False and config.has_final_layer_norm
    assert config.word_embed_proj_dim == 96 and not config.has_projections


# A config.json the checks below each spoil one field of.
SMALL_CONFIG = dict(model_type="opt", vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    ffn_dim=96)


# Token ids past the vocabulary (or not ints) would fail every engine step, JSON strings for
# flags would read as true: refused at load, naming the field.
@pytest.mark.parametrize("field,value", [
    ("eos_token_id", 5000), ("eos_token_id", "2"), ("eos_token_id", 2.5), ("eos_token_id", [2, 3]),
    ("bos_token_id", -1), ("pad_token_id", 400), ("pad_token_id", True),
    ("do_layer_norm_before", "false"), ("_remove_final_layer_norm", 1), ("enable_bias", "true"),
    ("num_hidden_layers", True)])
def test_from_json_rejects_bad_ids_and_flags(tmp_path, field, value):
    raw = dict(SMALL_CONFIG)
    raw[field] = value
    with pytest.raises(ValueError, match=field.lstrip("_")):
        OPTConfig.from_json(write_json(tmp_path / "config.json", raw))


# Shapes the model cannot run: refused at load, naming the field, not at the first step (a view
# error) or silently (gelu run as relu).
@pytest.mark.parametrize("changes,field", [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
    (dict(activation_function="gelu"), "activation_function"),
    (dict(enable_bias=False), "enable_bias"),
    (dict(layer_norm_elementwise_affine=False), "layer_norm_elementwise_affine")])
def test_from_json_rejects_shapes_the_model_cannot_run(tmp_path, changes, field):
    raw = dict(SMALL_CONFIG)
    raw.update(changes)
    with pytest.raises(ValueError, match=field):
        OPTConfig.from_json(write_json(tmp_path / "config.json", raw))


@pytest.mark.parametrize("remove_final", [True, False])
def test_to_hf_dict_is_read_back_by_transformers(remove_final):
    """The config.json written for random-weight and demo checkpoints: transformers must read the
    same shape from it, the final-LayerNorm flag (a private, underscored field there) included."""
    transformers = pytest.importorskip("transformers")
    config = OPTConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, ffn_dim=80,
                       word_embed_proj_dim=32, max_position_embeddings=64, remove_final_layer_norm=remove_final)
    hf = transformers.OPTConfig(**config.to_hf_dict())
    assert hf._remove_final_layer_norm is remove_final
    assert (hf.hidden_size, hf.word_embed_proj_dim, hf.ffn_dim, hf.num_hidden_layers) == (48, 32, 80, 3)
    assert OPTConfig.from_dict(hf.to_dict()) == config


def test_from_json_rejects_other_model_types(tmp_path):
    path = write_json(tmp_path / "config.json", {"model_type": "gpt2", "hidden_size": 768})
    with pytest.raises(ValueError, match="gpt2"):
        OPTConfig.from_json(path)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        OPTConfig.from_json(tmp_path / "nowhere" / "config.json")


def test_from_json_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "opt", ')
    with pytest.raises(ValueError, match="config.json"):
        OPTConfig.from_json(path)


# ---- names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hub_id", [
    ("opt-1.3b-en", "facebook/opt-1.3b"),
    ("opt-1.3b", "facebook/opt-1.3b"),
    ("OPT-125M-EN", "facebook/opt-125m"),
    ("facebook/opt-2.7b", "facebook/opt-2.7b"),
    ("opt-350m", "facebook/opt-350m"),
    ("opt-6.7b-en", "facebook/opt-6.7b"),
    ("facebook/opt-13b", "facebook/opt-13b"),
    ("opt-30b", None),
    ("gpt2", None),
    ("opt-1.3b-zh", None),
    ("opt-1x3b", None),
    ("other/opt-1.3b", None),
])
def test_hub_id_for(name, hub_id):
    assert hub_id_for(name) == hub_id


def test_preset_for_any_spelling():
    assert preset_for("OPT-1.3B-EN") == OPT_PRESETS["opt-1.3b"]
    assert preset_for("facebook/opt-350m") == OPT_PRESETS["opt-350m"]


@pytest.mark.parametrize("name", ["opt-30b", "gpt2", "opt-1.3b-zh"])
def test_preset_for_unknown_name(name):
    with pytest.raises(ValueError, match=name):
        preset_for(name)


# ---- EngineConfig -------------------------------------------------------------------------------

def test_engine_config_defaults_and_edge_values_accepted():
    EngineConfig()
    EngineConfig(dtype="bfloat16", kernels="torch", block_size=1, gpu_memory_utilization=1.0,
                 num_kv_blocks=1, max_num_batched_tokens=1, max_model_len=1, max_num_seqs=1)
    EngineConfig(dtype="float16", kernels="triton", block_size=32, gpu_memory_utilization=0.01)


@pytest.mark.parametrize("kwargs,field", [
    (dict(dtype="float64"), "dtype"),
    (dict(dtype="fp16"), "dtype"),
    (dict(kernels="cuda"), "kernels"),
    (dict(block_size=12), "block_size"),
    (dict(block_size=3), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=-16), "block_size"),
    (dict(block_size=16.0), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(num_kv_blocks=2 ** 31), "num_kv_blocks"),
    (dict(num_kv_blocks=2 ** 63), "num_kv_blocks"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.01), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=-0.5), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=True), "tensor_parallel_size"),
    (dict(tensor_parallel_size=2.0), "tensor_parallel_size"),
])
def test_engine_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)
