"""Safetensors shard I/O for the out-of-core rewrite: read headers, write shards piece by piece.

Reading never loads a tensor: keys, shapes and dtypes come from the shard headers, and tensors are
opened as zero-copy views of the mmapped files (``safe_open``). Writing computes a shard's header
(names, dtypes, shapes, offsets) from the output specs alone and then streams each tensor in pieces,
so at most one piece is ever materialised. Shards and the index follow huggingface_hub's naming
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), as ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import safe_open
from tqdm.auto import tqdm

ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILES = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.safetensors\.index\.json$|"
    r".*\.bin\.index\.json$"
)


class TensorSpec(Protocol):
    """What the writer needs to know of an output tensor before producing it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int: ...


def is_weight_file(name: str) -> bool:
    """A weight shard or index of any format (not copied next to rewritten shards)."""
    return _WEIGHT_FILES.fullmatch(name) is not None


def st_dtype(name: str, key: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``key`` names the tensor in the error)."""
    for dt, st in ST_DTYPES.items():
        if st == name:
            return dt
    raise ValueError(f"{key}: unsupported safetensors dtype {name}")


def open_handles(keep: int | None = None) -> Callable[[str], Any]:
    """A cache of open ``safe_open`` handles, one per shard: ``get(path)``. ``keep``: at most this many
    stay open (least recently used closed first). Why: the pages read through an open handle's memory map
    count in the process RSS until it is closed, so a rewrite reading a checkpoint larger than memory keeps
    only the shards it is reading open."""
    cache: dict[str, Any] = {}

    def get(path: str):
        if path in cache:
            cache[path] = cache.pop(path)  # most recently used last
        else:
            cache[path] = safe_open(path, "pt")
            while keep is not None and len(cache) > keep:
                cache.pop(next(iter(cache)))
        return cache[path]

    return get


def source_files(src: Path) -> dict[str, str]:
    """``{tensor key: shard path}`` of a safetensors checkpoint folder."""
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: str(src / f) for k, f in weight_map.items()}
    single = src / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {k: str(single) for k in f.keys()}  # noqa: SIM118 (safetensors handle)
    if any(src.glob("*.bin")):
        raise ValueError(
            f"{src} holds PyTorch .bin weights; rewrite_checkpoint reads safetensors only "
            "(re-save the model with save_pretrained(safe_serialization=True) first)"
        )
    raise FileNotFoundError(f"{src} has no model.safetensors or {INDEX_FILE}")


def read_headers(files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of every tensor of ``files``, from the shard headers only."""
    handle, out = open_handles(), {}
    for key in sorted(files):
        sl = handle(files[key]).get_slice(key)
        out[key] = (tuple(sl.get_shape()), st_dtype(sl.get_dtype(), key))
    return out


def write_safetensors(
    path: Path,
    items: list[tuple[str, TensorSpec]],
    produce: Callable[[TensorSpec], Iterable[torch.Tensor]],
    bar: Any = None,
) -> None:
    """Write one safetensors file: ``produce(spec)`` yields pieces whose bytes concatenate to the
    tensor. The header is known from the specs, so pieces are streamed straight to disk. Larger
    element sizes first keeps every tensor aligned to its element size."""
    order = sorted(items, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, spec in order:
        header[name] = {
            "dtype": ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [off, off + spec.nbytes],
        }
        off += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, spec in order:
            written = 0
            for piece in produce(spec):
                if piece.dtype != spec.dtype:
                    raise RuntimeError(f"{name}: produced {piece.dtype}, header says {spec.dtype}")
                buf = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
                fh.write(buf)
                written += buf.nbytes
                del piece, buf
            if written != spec.nbytes:
                raise RuntimeError(
                    f"{name}: produced {written} bytes, header says {spec.shape} = {spec.nbytes}"
                )
            if bar is not None:
                bar.update(1)


def write_shards(
    folder: Path,
    specs: dict[str, TensorSpec],
    produce: Callable[[TensorSpec], Iterator[torch.Tensor]],
    *,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> list[str]:
    """Write ``specs`` into ``folder`` as ``save_pretrained`` would name them: one
    ``model.safetensors`` or ``max_shard_size`` shards plus the index (``total_parameters`` and
    ``total_size`` metadata). Returns the shard file names."""
    split = split_state_dict_into_shards_factory(
        specs,
        get_storage_size=lambda s: s.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    with tqdm(total=len(specs), desc="rewrite", unit="tensor", disable=not progress) as bar:
        for fname, names in split.filename_to_tensors.items():
            write_safetensors(folder / fname, [(n, specs[n]) for n in names], produce, bar)
    if split.is_sharded:
        n_params = sum(math.prod(s.shape) for s in specs.values())
        index = {
            "metadata": {"total_parameters": n_params, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)
