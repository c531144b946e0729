"""Recovered weights of one MoE block written under the checkpoint's ON-DISK keys (out-of-core route).

The streaming rewrite (``apply/streaming.py``) reads source tensors by their on-disk keys. A recovered
block's module tensors (fused ``[E, ...]`` experts, router) are turned back into those keys with
transformers' own reverse conversion (``revert_weight_conversion``, what ``save_pretrained`` does:
Mixtral ``mlp.experts.gate_up_proj`` -> ``block_sparse_moe.experts.{e}.w1/w3.weight``...). Only tensors
whose values differ from the source are written (one safetensors file per layer in a work folder); the
rewrite then reads those keys from that file instead (``rewrite_checkpoint(overrides=...)``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moeprune.apply.shards import open_handles
from moeprune.atomic import atomic_write
from moeprune.observe.experts import ExpertBank


def on_disk(model: nn.Module, bank: ExpertBank, headers: dict) -> dict[str, torch.Tensor]:
    """The block's state dict under the checkpoint's keys: reverted to the original format or, for a
    checkpoint stored with module names (``save_original_format=False``), as is (whichever the source holds)."""
    from transformers.core_model_loading import revert_weight_conversion

    sd = {f"{bank.name}.{k}": v for k, v in bank.block.state_dict().items()}
    reverted = revert_weight_conversion(model, dict(sd))
    got = max((reverted, sd), key=lambda d: len(d.keys() & headers.keys()))
    missing = sorted(k for k in got if k not in headers)
    if missing:
        raise RuntimeError(f"recovery out of core: layer {bank.layer}'s tensors {missing[:4]} have no key in the "
                           "source checkpoint (its keys do not follow the transformers layout of this model_type)")
    return got


def changed_tensors(model: nn.Module, bank: ExpertBank, files: dict[str, str],
                    headers: dict) -> dict[str, torch.Tensor]:
    """On-disk key -> recovered tensor, for the tensors of the block whose values differ from the source
    (same shape and dtype as the source required: the rewrite copies bytes). ``headers``: ``read_headers``."""
    handle, out = open_handles(keep=2), {}
    for key, t in on_disk(model, bank, headers).items():
        shape, dtype = headers[key]
        if tuple(t.shape) != shape:
            raise RuntimeError(f"recovery out of core: {key} is {tuple(t.shape)} after recovery but {shape} in the "
                               "checkpoint; the reverse conversion does not match this checkpoint")
        src = handle(files[key]).get_tensor(key)
        if torch.equal(src.to(t.dtype), t):
            continue
        if t.dtype != dtype:
            raise ValueError(f"recovery out of core: {key} is stored as {dtype} in the checkpoint but the model was "
                             f"loaded as {t.dtype}; the rewrite keeps the checkpoint's dtype, so set dtype: "
                             f"{str(dtype).removeprefix('torch.')} (the recovered weights must be fitted in it)")
        out[key] = t.detach().to("cpu").contiguous()
    return out


def write_overrides(model: nn.Module, bank: ExpertBank, files: dict[str, str], headers: dict,
                    work: str | os.PathLike) -> dict[str, str]:
    """Write the block's changed tensors to ``work/layer_{i}.safetensors`` (atomic); ``{key: that file}``."""
    tensors = changed_tensors(model, bank, files, headers)
    if not tensors:
        return {}
    path = Path(work) / f"layer_{bank.layer}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, p))
    return dict.fromkeys(tensors, str(path))
