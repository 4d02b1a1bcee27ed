"""opt_fast.model.loader: every checkpoint layout (DESIGN.md §4) loads into the right parameters,
for the pre-LN, OPT-350m (post-LN, project_in/out) and head_dim-80 shapes; broken checkpoints fail
with messages that name the file and the problem.

The reference is the Hugging Face model's own state dict: opt_fast's parameters carry the same
names without the `model.` prefix, except q, k and v, which are packed as `qkv_proj` rows [q; k; v].
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opt_fast import LLM, SamplingParams
from opt_fast.config import OPTConfig
from opt_fast.kernels import TORCH_OPS
from opt_fast.model.loader import CheckpointError, load_weights, resolve_model_path
from opt_fast.model.opt import OPTForCausalLM

FORMATS = ["safetensors", "bin_bare", "safetensors_sharded", "bin_sharded"]
NUM_SHARDS = 3
PROMPT = [2, 45, 101, 7, 300, 12, 9, 88]


# ---- helpers ------------------------------------------------------------------------------------

def hf_state(hf_model) -> dict[str, torch.Tensor]:
    """The HF checkpoint tensors (`model.decoder.*`), without the tied lm_head."""
    return {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()
            if k != "lm_head.weight"}


def expected_params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF checkpoint tensors -> what each opt_fast parameter must hold."""
    out, qkv = {}, {}
    for key, tensor in state.items():
        assert key.startswith("model.decoder."), key
        name = key[len("model."):]
        module, leaf = name.rsplit(".", 1)
        owner, last = module.rsplit(".", 1) if "." in module else ("", module)
        if last in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault((owner, leaf), {})[last] = tensor
        else:
            out[name] = tensor
    for (owner, leaf), parts in qkv.items():
        out[f"{owner}.qkv_proj.{leaf}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def assert_params_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], dtype=torch.float32):
    params = dict(model.named_parameters())
    assert set(params) == set(expected)
    for name, param in params.items():
        assert param.dtype == dtype, name
        assert torch.equal(param.detach().cpu(), expected[name].to(dtype)), name


def fresh_model(folder: Path) -> OPTForCausalLM:
    """An opt_fast model for `folder`'s config.json, every parameter NaN until loaded."""
    model = OPTForCausalLM(OPTConfig.from_json(folder / "config.json"), TORCH_OPS)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def copy_side_files(src: Path, dst: Path) -> None:
    """config.json and the tokenizer files, not the weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "vocab.json", "merges.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def bare(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """`decoder.*` keys as the facebook/opt-* .bin files have, plus an lm_head.weight that does
    NOT equal the embedding: were it loaded into embed_tokens, the comparison would fail."""
    out = {k[len("model."):]: v for k, v in state.items()}
    embed = out["decoder.embed_tokens.weight"]
    out["lm_head.weight"] = torch.randn(embed.shape, generator=torch.Generator().manual_seed(seed))
    return out


def write_index(folder: Path, index_name: str, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {key: file for file, tensors in shards.items() for key in tensors}
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": weight_map}))


def split(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Round-robin over keys, so q, k and v of one layer land in different shards."""
    shards = [{} for _ in range(n)]
    for i, (key, tensor) in enumerate(state.items()):
        shards[i % n][key] = tensor
    return shards


def write_checkpoint(fmt: str, src: Path, hf_model, out: Path, state=None) -> Path:
    """Write the HF model's weights (or `state`, HF keys) in layout `fmt` under `out`."""
    state = hf_state(hf_model) if state is None else state
    copy_side_files(src, out)
    if fmt == "safetensors":
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin_bare":
        torch.save(bare(state), out / "pytorch_model.bin")
    elif fmt == "safetensors_sharded":
        shards = {f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors": s
                  for i, s in enumerate(split(state, NUM_SHARDS))}
        for file, tensors in shards.items():
            save_file(tensors, str(out / file), metadata={"format": "pt"})
        write_index(out, "model.safetensors.index.json", shards)
    elif fmt == "bin_sharded":
        shards = {f"pytorch_model-{i + 1:05d}-of-{NUM_SHARDS:05d}.bin": s
                  for i, s in enumerate(split(bare(state), NUM_SHARDS))}
        for file, tensors in shards.items():
            torch.save(tensors, out / file)
        write_index(out, "pytorch_model.bin.index.json", shards)
    else:
        raise AssertionError(fmt)
    return out


def make_llm(folder: Path, dtype: str = "float32") -> LLM:
    return LLM(str(folder), dtype=dtype, device="cpu", kernels="torch", num_kv_blocks=16,
               max_model_len=64)


# ---- every layout loads the right tensors -------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_loads_exact_parameters(hf_checkpoint, fmt, tmp_path):
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint(fmt, src, hf_model, tmp_path / fmt)
    model = fresh_model(folder)
    load_weights(model, folder)
    assert_params_equal(model, expected_params(hf_state(hf_model)))


def test_hf_save_pretrained_single_file(hf_checkpoint):
    """Format 1 as transformers itself writes it (the fixture's directory), through LLM."""
    _, src, hf_model = hf_checkpoint
    assert (src / "model.safetensors").is_file()
    llm = make_llm(src)
    assert_params_equal(llm.engine.runner.model, expected_params(hf_state(hf_model)))


def test_hf_save_pretrained_sharded_safetensors(hf_checkpoint, tmp_path):
    _, _, hf_model = hf_checkpoint
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = fresh_model(tmp_path)
    load_weights(model, tmp_path)
    assert_params_equal(model, expected_params(hf_state(hf_model)))


@pytest.mark.parametrize("fmt", ["bin_bare", "bin_sharded", "safetensors_sharded"])
def test_llm_on_each_layout_matches_hf_logprobs(hf_checkpoint, fmt, tmp_path):
    """Through the public entry point: LLM(dir) on the layout gives HF's prompt logprobs."""
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint(fmt, src, hf_model, tmp_path / fmt)
    llm = make_llm(folder)
    assert_params_equal(llm.engine.runner.model, expected_params(hf_state(hf_model)))
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    vocab = llm.get_tokenizer().vocab_size
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([PROMPT])).logits[0].float()
    reference = torch.log_softmax(logits[:, :vocab], dim=-1)
    for i in range(1, len(PROMPT)):
        assert out.prompt_logprobs[i][PROMPT[i]] == pytest.approx(
            reference[i - 1, PROMPT[i]].item(), abs=1e-4)


def test_float16_checkpoint_casts_into_float32_model(hf_checkpoint, tmp_path):
    _, src, hf_model = hf_checkpoint
    state = {k: v.half() for k, v in hf_state(hf_model).items()}
    folder = write_checkpoint("safetensors", src, hf_model, tmp_path, state=state)
    model = fresh_model(folder)
    load_weights(model, folder)
    assert_params_equal(model, {k: v.float() for k, v in expected_params(state).items()})


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_parameters_end_up_in_target_dtype(hf_checkpoint, dtype, torch_dtype):
    """A float32 checkpoint loaded with dtype=float16/bfloat16: each parameter is the float32
    value cast, stored in the target dtype (no float32 copy of the model kept)."""
    _, src, hf_model = hf_checkpoint
    llm = make_llm(src, dtype=dtype)
    assert_params_equal(llm.engine.runner.model, expected_params(hf_state(hf_model)), dtype=torch_dtype)


def test_safetensors_wins_over_a_pytorch_bin_beside_it(hf_checkpoint, tmp_path):
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint("safetensors", src, hf_model, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(random.Random(0).randbytes(2048))
    model = fresh_model(folder)
    load_weights(model, folder)
    assert_params_equal(model, expected_params(hf_state(hf_model)))


def test_legacy_serialized_pytorch_bin_loads(hf_checkpoint, tmp_path):
    """A pytorch_model.bin written by torch.save's pre-1.6 (non-zip) serializer is still a valid
    checkpoint: transformers loads it (it only memory-maps zip files)."""
    _, src, hf_model = hf_checkpoint
    copy_side_files(src, tmp_path)
    torch.save(bare(hf_state(hf_model)), tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    model = fresh_model(tmp_path)
    load_weights(model, tmp_path)
    assert_params_equal(model, expected_params(hf_state(hf_model)))


# ---- broken checkpoints -------------------------------------------------------------------------

def test_directory_without_weights(hf_checkpoint, tmp_path):
    _, src, _ = hf_checkpoint
    copy_side_files(src, tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_weights(fresh_model(tmp_path), tmp_path)
    assert str(tmp_path) in str(err.value) and "no checkpoint" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_llm(tmp_path)


@pytest.mark.parametrize("fmt,index", [("safetensors_sharded", "model.safetensors.index.json"),
                                       ("bin_sharded", "pytorch_model.bin.index.json")])
def test_index_listing_a_missing_shard(hf_checkpoint, tmp_path, fmt, index):
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint(fmt, src, hf_model, tmp_path)
    shard = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_weights(fresh_model(folder), folder)
    assert shard in str(err.value) and index in str(err.value) and "missing" in str(err.value)


def test_index_that_is_not_json(hf_checkpoint, tmp_path):
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint("safetensors_sharded", src, hf_model, tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_weights(fresh_model(folder), folder)


@pytest.mark.parametrize("fmt,filename,problem", [("safetensors", "model.safetensors", "truncated"),
                                                  ("bin_bare", "pytorch_model.bin", "corrupt")])
def test_truncated_checkpoint_file(hf_checkpoint, tmp_path, fmt, filename, problem):
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint(fmt, src, hf_model, tmp_path)
    file = folder / filename
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh_model(folder), folder)
    assert str(file) in str(err.value) and problem in str(err.value)


def test_garbage_pytorch_bin(hf_checkpoint, tmp_path):
    _, src, _ = hf_checkpoint
    copy_side_files(src, tmp_path)
    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh_model(tmp_path), tmp_path)
    assert str(file) in str(err.value) and "corrupt" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("fmt", ["safetensors", "bin_sharded"])
@pytest.mark.parametrize("dropped", ["model.decoder.layers.1.self_attn.k_proj.weight",
                                     "model.decoder.layers.0.fc2.bias",
                                     "model.decoder.embed_positions.weight"])
def test_missing_tensor_named_by_its_checkpoint_name(hf_checkpoint, tmp_path, fmt, dropped):
    _, src, hf_model = hf_checkpoint
    state = hf_state(hf_model)
    del state[dropped]
    folder = write_checkpoint(fmt, src, hf_model, tmp_path, state=state)
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh_model(folder), folder)
    message = str(err.value)
    assert str(folder) in message
    assert dropped[len("model."):] in message
    assert "qkv_proj" not in message
    assert "1 tensor" in message


@pytest.mark.parametrize("key,change", [
    ("model.decoder.layers.0.fc1.weight", lambda t: t[:-1]),            # one row short
    ("model.decoder.layers.1.self_attn.v_proj.weight", lambda t: t[:, :-2]),
    ("model.decoder.layers.0.self_attn.q_proj.bias", lambda t: torch.cat([t, t])),
    ("model.decoder.embed_tokens.weight", lambda t: t[:-7]),            # tokenizer-sized vocab
])
def test_wrong_shape_names_tensor_and_both_shapes(hf_checkpoint, tmp_path, key, change):
    _, src, hf_model = hf_checkpoint
    state = hf_state(hf_model)
    good = tuple(state[key].shape)
    state[key] = change(state[key]).contiguous()
    bad = tuple(state[key].shape)
    folder = write_checkpoint("safetensors", src, hf_model, tmp_path, state=state)
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh_model(folder), folder)
    message = str(err.value)
    assert key in message and str(bad) in message and str(good) in message
    assert str(folder) in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin_sharded"])
def test_tensors_the_config_has_no_place_for_are_refused(hf_checkpoint, tmp_path, fmt):
    """A config.json that does not describe its checkpoint (fewer layers than it holds, a tensor
    the model has no parameter for) is an error naming them, not a model that runs on part of
    the weights. lm_head.weight and tensors outside the decoder are ignored, as before."""
    shape, src, hf_model = hf_checkpoint
    state = hf_state(hf_model)
    layers = 1 + max(int(k.split(".")[3]) for k in state if ".layers." in k)
    extra = {k.replace(f".layers.{layers - 1}.", f".layers.{layers}."): v.clone() for k, v in state.items()
             if f".layers.{layers - 1}." in k}
    folder = write_checkpoint(fmt, src, hf_model, tmp_path, state={**state, **extra})
    with pytest.raises(CheckpointError, match=rf"{len(extra)} tensor\(s\) .* no place for: (model\.)?decoder.layers.{layers}\."):
        load_weights(fresh_model(folder), folder)
    stray = {**state, "model.decoder.layers.0.self_attn.rotary.weight": torch.ones(3),
             "lm_head.bias": torch.ones(3), "score.weight": torch.ones(3)}
    folder = write_checkpoint(fmt, src, hf_model, tmp_path / "stray", state=stray)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) .*rotary"):
        load_weights(fresh_model(folder), folder)


@pytest.mark.parametrize("fmt", ["safetensors", "bin_bare"])
def test_a_post_ln_checkpoints_unused_final_layer_norm_is_ignored(hf_checkpoint, tmp_path, fmt):
    """facebook/opt-350m's files carry a final LayerNorm that its post-LN config never runs
    (transformers' model has no such module and leaves it unread): the checkpoint loads, the
    tensors (NaN here) go nowhere."""
    shape, src, hf_model = hf_checkpoint
    if hf_model.config.do_layer_norm_before:
        pytest.skip("a pre-LN model has a final LayerNorm of its own")
    width = hf_model.config.hidden_size
    state = hf_state(hf_model)
    assert not any(k.startswith("model.decoder.final_layer_norm.") for k in state)
    unused = {f"model.decoder.final_layer_norm.{leaf}": torch.full((width,), float("nan"))
              for leaf in ("weight", "bias")}
    folder = write_checkpoint(fmt, src, hf_model, tmp_path, state={**state, **unused})
    model = fresh_model(folder)
    load_weights(model, folder)
    assert_params_equal(model, expected_params(state))


def test_a_tensor_given_twice_is_refused(hf_checkpoint, tmp_path):
    _, src, hf_model = hf_checkpoint
    state = hf_state(hf_model)
    key = "model.decoder.layers.0.fc1.bias"
    folder = write_checkpoint("safetensors", src, hf_model, tmp_path, state={**state, key[len("model."):]: state[key].clone()})
    with pytest.raises(CheckpointError, match="twice"):
        load_weights(fresh_model(folder), folder)


def test_a_cast_that_overflows_is_refused(hf_checkpoint, tmp_path):
    """bfloat16 holds values float16 cannot: loaded as float16, a weight of 1e6 would be inf."""
    _, src, hf_model = hf_checkpoint
    state = {k: v.to(torch.bfloat16) for k, v in hf_state(hf_model).items()}
    state["model.decoder.layers.0.fc1.weight"][0, 0] = 1e6
    folder = write_checkpoint("safetensors", src, hf_model, tmp_path, state=state)
    with pytest.raises(CheckpointError, match=r"fc1.weight.* overflows torch.float16.*dtype='bfloat16'"):
        load_weights(fresh_model(folder).to(torch.float16), folder)
    load_weights(fresh_model(folder).to(torch.bfloat16), folder)     # as it is: fine


def test_trainer_checkpoints_and_non_state_dicts(hf_checkpoint, tmp_path):
    """FlagAI's and DeepSpeed's {"module": state dict} loads; a .bin holding something else
    than a state dict says what it holds."""
    _, src, hf_model = hf_checkpoint
    copy_side_files(src, tmp_path)
    torch.save({"module": bare(hf_state(hf_model))}, tmp_path / "pytorch_model.bin")
    model = fresh_model(tmp_path)
    load_weights(model, tmp_path)
    assert_params_equal(model, expected_params(hf_state(hf_model)))
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_weights(fresh_model(tmp_path), tmp_path)


def test_a_shard_named_outside_the_checkpoint_directory_is_refused(hf_checkpoint, tmp_path):
    """Shards are judged by the names the index gives them: a path out of the folder is refused,
    while symlinks into a blobs folder elsewhere (the hub cache's layout) load."""
    _, src, hf_model = hf_checkpoint
    folder = write_checkpoint("safetensors_sharded", src, hf_model, tmp_path / "snapshots" / "rev")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in folder.glob("model-*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(Path("..") / ".." / "blobs" / shard.name)
    model = fresh_model(folder)
    load_weights(model, folder)
    assert_params_equal(model, expected_params(hf_state(hf_model)))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    for name in ("../../blobs/" + index["weight_map"][first], str(blobs / index["weight_map"][first])):
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {**index, "weight_map": {**index["weight_map"], first: name}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            load_weights(fresh_model(folder), folder)


def test_config_fields_as_hf_reads_them(hf_checkpoint, tmp_path):
    """layer_norm_eps is ignored (HF's OPT LayerNorms use 1e-5 whatever it says), null values
    take the default, an untied LM head is refused, a non-object config is a ValueError."""
    raw = json.loads((hf_checkpoint[1] / "config.json").read_text())
    config = OPTConfig.from_dict({**raw, "layer_norm_eps": 1.0, "word_embed_proj_dim": None})
    assert config.layer_norm_eps == 1e-5 and config.word_embed_proj_dim == config.hidden_size
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        OPTConfig.from_dict({**raw, "tie_word_embeddings": False})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        OPTConfig.from_json(tmp_path / "config.json")


# ---- model names --------------------------------------------------------------------------------

def test_hub_name_offline_suggests_a_local_directory(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    code = ("from opt_fast.model.loader import resolve_model_path\n"
            "try:\n"
            "    resolve_model_path('opt-125m-en')\n"
            "except OSError as err:\n"
            "    print(type(err).__name__, '|', err)\n"
            "else:\n"
            "    print('NO ERROR')\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "local directory" in result.stdout, result.stdout + result.stderr
    assert "facebook/opt-125m" in result.stdout


def test_path_with_two_slashes_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not/a/real/dir/x"):
        resolve_model_path("not/a/real/dir/x")


def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """Names written as paths (./, /, ~) never go to the hub: a mistyped directory says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    for name in ("./my-opt", "/nonexistent/opt", "~/no-such-opt-dir", "../opt-125m", Path("opt-1.3b")):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            resolve_model_path(name)
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model_path("weights.bin")


def test_local_directory_wins_over_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "opt-125m-en").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("opt-125m-en") == Path("opt-125m-en")
    assert resolve_model_path(tmp_path) == tmp_path
