"""CPU tensors from Python lists, fast. `array.array` packs a list of numbers in C several times
quicker than `torch.tensor` parses it (4 vs 13 us for 256 ints), and a step builds a dozen."""
from __future__ import annotations

import array

import torch

_TYPECODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}
_ALIGN = 16     # bytes between packed tensors: any dtype's alignment, and 16-byte vector loads


def host_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor holding `values` (a flat sequence of numbers)."""
    if not len(values):
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array(_TYPECODES[dtype], values), dtype=dtype)


def _padded_rows(rows: list[array.array], width: int, dtype: torch.dtype, pad_byte: int) -> torch.Tensor:
    """`[len(rows), width]` CPU tensor of `rows` (arrays of `dtype`'s typecode), each padded to
    `width` with elements whose every byte is `pad_byte`: a byte copy per row, where a Python
    list of every element took 4x (block tables) to 16x (a penalty's token ids) as long."""
    if not width:
        return torch.empty(len(rows), 0, dtype=dtype)
    size = dtype.itemsize
    padding = bytes([pad_byte]) * (size * width)
    packed = bytearray().join(part for row in rows for part in (row.tobytes(), padding[:size * (width - len(row))]))
    return torch.frombuffer(packed, dtype=dtype).view(len(rows), width)


def seen_ids(seqs, width: int) -> torch.Tensor:
    """`[len(seqs), width]` int64 CPU tensor of each sequence's token ids (its `token_array`),
    padded with -1 (0.25 ms for 256 rows of 640 tokens)."""
    return _padded_rows([s.token_array for s in seqs], width, torch.int64, 0xFF)   # 0xFF bytes: -1


def block_tables(seqs) -> torch.Tensor:
    """`[len(seqs), widest table]` int32 CPU tensor of the sequences' block tables (each an
    int32 `array`), padded with 0 (entries past a sequence's length are never read; 40 us for
    256 rows of ~40 blocks on the dev box)."""
    return _padded_rows([s.block_table for s in seqs], max(len(s.block_table) for s in seqs), torch.int32, 0)


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """`tensors` (CPU; integer or float32) on `device` through one host-to-device copy, each
    returned tensor a view of that copy.

    A step moves about fifteen small tensors; a pinned copy of each cost ~10-20 us of host time
    (the pinning and the launch). Their bytes are written into one buffer, pinned on CUDA so the
    copy does not block the host: each tensor is copied once on the host (through numpy, since
    a torch op per tensor costs more than the copy; a penalty's `seen_ids` can be megabytes).
    Each tensor starts 16-byte aligned, as its own allocation would: Triton specialises kernels
    on pointer alignment, so unaligned views would compile new variants mid-run. Tensors of one
    dtype are packed together and split with one call, since per-tensor view calls cost more than
    the packing. Runs on CPU too (no copy there), so every test goes through it.
    """
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    layout, size = [], 0
    for dtype, members in groups.items():
        # elements per member, each padded to the alignment
        lengths = [-(-tensors[i].numel() * dtype.itemsize // _ALIGN) * _ALIGN // dtype.itemsize for i in members]
        layout.append((dtype, members, lengths, size))
        size += sum(lengths) * dtype.itemsize
    host = torch.empty(max(size, _ALIGN), dtype=torch.uint8, pin_memory=device.type == "cuda")
    raw = host.numpy()
    for dtype, members, lengths, start in layout:
        for i, length in zip(members, lengths):
            data = tensors[i].numpy().reshape(-1).view(raw.dtype)
            raw[start:start + data.size] = data
            start += length * dtype.itemsize
    packed = host.to(device, non_blocking=True)
    moved: list[torch.Tensor] = [None] * len(tensors)
    for dtype, members, lengths, start in layout:
        section = packed[start:start + sum(lengths) * dtype.itemsize].view(dtype)
        for i, length, piece in zip(members, lengths, section.split(lengths)):
            t = tensors[i]
            if length != t.numel():
                piece = piece[:t.numel()]
            moved[i] = piece if t.dim() == 1 else piece.view(t.shape)
    return moved
