"""Checkpoint loading: resolve a model name to a directory, then stream its tensors into a model.

Accepted layouts (Hugging Face and FlagAI): `model.safetensors`, `pytorch_model.bin`, or either
sharded with an index json. Keys may be `model.decoder.*` or bare `decoder.*`; `lm_head.weight`
is tied to the embedding and ignored. Each tensor is cast straight into its preallocated
parameter (target dtype and device), so host memory never holds a second full copy.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import hub_id_for
from ..parallel import shard_dim, take_shard

# (checkpoint name, packed parameter name, shard index within the packed parameter)
_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or lacks or mis-shapes a tensor the model needs."""


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model argument that names no checkpoint: a FileNotFoundError, and a ValueError like
    every other bad argument."""


def resolve_model_path(model: str | Path) -> Path:
    """A local directory as is; otherwise a hub id (`facebook/opt-1.3b`) or a FlagAI/short name
    (`opt-1.3b-en`, `opt-1.3b`) downloaded through huggingface_hub's snapshot cache."""
    if not isinstance(model, (str, Path)) or not str(model).strip():
        # ("" would be the working directory)
        raise ValueError(f"model must name a checkpoint directory or a hub id, got {model!r:.80}")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if isinstance(model, Path) or name.startswith((".", "/", "~")) or path.exists():
        # written as a path (hub ids never start so): a missing directory, not a hub id
        raise ModelNotFoundError(f"model {name!r}: no such directory" if not path.exists()
                                 else f"model {name!r} is a file, not a checkpoint directory")
    hub_id = hub_id_for(name) or (name if name.count("/") == 1 else None)
    if hub_id is None:
        raise ModelNotFoundError(f"model {name!r} is neither a local directory nor a hub id "
                                 "(like 'facebook/opt-125m' or 'opt-125m-en')")
    return _download(hub_id)


def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download
    folder = None
    # Prefer safetensors; fall back to pytorch_model*.bin for repos that only publish those.
    for weights in ("*.safetensors", "pytorch_model*.bin"):
        try:
            folder = Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.txt", weights]))
        except Exception as err:  # offline, unreachable, unknown repo: all end the same for a user
            raise OSError(f"could not fetch {hub_id!r} from the Hugging Face hub ({type(err).__name__}: "
                          f"{err}). Without network access, download the checkpoint elsewhere and "
                          "pass its local directory path instead") from err
        if any((folder / f).exists() for f in _CHECKPOINT_FILES):
            break
    return folder


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint directory, shards in index order."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                names = list(dict.fromkeys(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({err!r})") from None
            for name in names:
                # Judged as written, not resolved: the hub cache's shards are symlinks into a
                # blobs folder elsewhere.
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise CheckpointError(f"{folder / index}: shard {name!r} lies outside the checkpoint directory")
            shards = [folder / name for name in names]
            for shard in shards:
                if not shard.is_file():
                    raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
            return shards
    raise FileNotFoundError(f"{folder}: no checkpoint found (looked for {', '.join(_CHECKPOINT_FILES)})")


def iter_checkpoint_tensors(files: list[Path], wanted=lambda name: True) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor) of every tensor, read lazily: safetensors memory-mapped (a tensor not
    `wanted` is never read: None), .bin with mmap. A trainer's {"module": state dict} is
    unwrapped (FlagAI and DeepSpeed save them so)."""
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name) if wanted(name) else None
            except SafetensorError as err:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({err})") from None
        else:
            try:
                # Only the zip format (torch >= 1.6) can be memory-mapped; older files load whole.
                state = torch.load(file, map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=True)
            except Exception as err:
                raise CheckpointError(f"{file}: truncated or corrupt PyTorch checkpoint, or one holding "
                                      f"more than tensors ({type(err).__name__}: {err})") from None
            if isinstance(state, dict) and set(state) == {"module"} and isinstance(state["module"], dict):
                state = state["module"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
            yield from state.items()


def _target(key: str) -> tuple[str, int | None] | None:
    """Checkpoint key -> (model parameter name, shard index), or None for keys not loaded."""
    if key.startswith("model."):
        key = key[len("model."):]
    if not key.startswith("decoder."):
        return None     # lm_head.weight (tied) and anything outside the decoder
    module, _, leaf = key.rpartition(".")
    owner, _, last = module.rpartition(".")
    if last in _PACKED:
        packed, shard = _PACKED[last]
        return f"{owner}.{packed}.{leaf}", shard
    return key, None


@torch.no_grad()
def load_weights(model: nn.Module, folder: Path, progress: bool = False, rank: int = 0, world: int = 1) -> None:
    """Copy every parameter of `model` from the checkpoint in `folder`, checking names, shapes,
    that each is loaded once, that a cast to the model's dtype stays finite, and that the
    checkpoint has no decoder tensor the model lacks (a config.json that does not describe it:
    more layers, projections; HF only warns). With `world` > 1 the model holds tensor-parallel
    rank `rank`'s share (`parallel.shard_model`) and gets its slice of each split tensor."""
    params = dict(model.named_parameters())
    expected = {(name, None) for name in params if ".qkv_proj." not in name}
    expected |= {(name, shard) for name in params if ".qkv_proj." in name for shard in range(3)}
    loaded: set[tuple[str, int | None]] = set()
    unplaced: list[str] = []
    files = checkpoint_files(folder)
    # lm_head.weight (tied: 0.5 GB at 13B) and tensors outside the decoder are never read
    tensors = iter_checkpoint_tensors(files, wanted=lambda key: (_target(key) or ("",))[0] in params)
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc="loading weights", unit=" tensors", disable=None)  # None: off unless a TTY
    for key, tensor in tensors:
        target = _target(key)
        if target is None:
            continue
        if target[0] not in params:
            # (a post-LN config's unused final LayerNorm, which HF checkpoints carry, is fine)
            if not target[0].startswith("decoder.final_layer_norm."):
                unplaced.append(key)
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{folder}: {key!r} is a {type(tensor).__name__}, not a tensor")
        name, shard = target
        dest = params[name].data
        if shard is not None:
            rows = dest.shape[0] // 3
            dest = dest[shard * rows:(shard + 1) * rows]
        dim = shard_dim(name)
        if tuple(tensor.shape) != _full_shape(dest.shape, dim, world):
            raise CheckpointError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {_full_shape(dest.shape, dim, world)}")
        if target in loaded:
            raise CheckpointError(f"{folder}: tensor {key!r} is in the checkpoint twice (with and without 'model.'?)")
        dest.copy_(take_shard(tensor, dim, rank, world))
        if dest.dtype != tensor.dtype and not torch.isfinite(dest).all():
            raise CheckpointError(f"{folder}: tensor {key!r} overflows {dest.dtype} (the checkpoint holds "
                                  f"{tensor.dtype}): load it with dtype={str(tensor.dtype).split('.')[-1]!r} or 'float32'")
        loaded.add(target)
    if unplaced:
        raise CheckpointError(f"{folder}: checkpoint has {len(unplaced)} tensor(s) the model of its config.json "
                              f"({len(model.decoder.layers)} layers) has no place for: {', '.join(unplaced[:8])}"
                              + (" ..." if len(unplaced) > 8 else ""))
    missing = sorted(expected - loaded, key=str)
    if missing:
        names = [_checkpoint_name(name, shard) for name, shard in missing]
        raise CheckpointError(f"{folder}: checkpoint lacks {len(names)} tensor(s): {', '.join(names[:8])}"
                              + (" ..." if len(names) > 8 else ""))


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, rank: int = 0, world: int = 1) -> None:
    """Fill every parameter in place with small random values (for benchmarks without a checkpoint).
    Drawn on the parameters' own device, so even 13B needs no host copy. Tensor-parallel rank
    `rank` of `world` draws each whole tensor and keeps its slice: the same model at any world."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        dim = shard_dim(name) if world > 1 else None
        # (a replicated parameter is drawn in place, with no whole-size copy)
        full = param.new_empty(_full_shape(param.shape, dim, world)) if dim is not None else param
        if param.dim() == 1:
            fill = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            full.normal_(fill, 0.02, generator=generator)
        else:
            full.normal_(0.0, full.shape[-1] ** -0.5, generator=generator)
        if full is not param:
            param.copy_(take_shard(full, dim, rank, world, packed=3 if ".qkv_proj." in name else 1))


def _full_shape(shape: torch.Size, dim: int | None, world: int) -> tuple[int, ...]:
    """The shape of the whole tensor whose rank shares have `shape`."""
    return tuple(n * world if d == dim else n for d, n in enumerate(shape))


def _checkpoint_name(name: str, shard: int | None) -> str:
    if shard is None:
        return name
    return name.replace(".qkv_proj.", f".{('q_proj', 'k_proj', 'v_proj')[shard]}.")
