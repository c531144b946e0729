"""Structural pruning of intermediate channels ("neurons") inside experts (TENP).

Fused expert tensors hold one intermediate width per layer, so a ragged plan (different kept
counts per expert) is sliced to the widest expert's count and the surplus channels of narrower
experts are killed: their gate/up rows, biases and down columns are zeroed, so each contributes
exactly 0. The result equals the original model with the removed channels zeroed (tested).
"""
from __future__ import annotations

import torch
from torch import nn

from moeprune.apply.config import finalize_config, record_neurons
from moeprune.apply.experts import moe_blocks
from moeprune.arch.adapters import get_adapter
from moeprune.arch.structure import (
    inter_layout,
    intermediate_size_of,
    kill_channels_,
    num_experts_of,
    slice_neurons_,
)


def check_neuron_ids(model: nn.Module, keep: dict[int, dict[int, list[int]]],
                     expert_ids: dict[int, list[int]] | None = None) -> dict[int, dict[int, list[int]]]:
    """Validate ``{layer: {expert: kept channels}}``; returns it with sorted ids.

    ``expert_ids[layer]`` (optional) lists the valid expert ids of a layer when they are not
    ``range(num_experts)`` (``apply_plan`` passes the original ids it keeps)."""
    blocks = moe_blocks(model)
    out = {}
    for li, per in keep.items():
        li = int(li)
        if li not in blocks:
            raise ValueError(f"layer {li} is not an MoE layer of this model; MoE layers: {sorted(blocks)}")
        inter_layout(blocks[li])  # NotImplementedError for layouts that are not channel-separable
        inter = intermediate_size_of(blocks[li])
        valid = set(expert_ids[li]) if expert_ids and li in expert_ids else set(range(num_experts_of(blocks[li])))
        out[li] = {}
        for e, ch in per.items():
            e = int(e)
            ch = sorted(int(j) for j in ch)
            if e not in valid:
                raise ValueError(f"layer {li}: neuron plan for expert {e}, which is not one of the layer's "
                                 f"experts {sorted(valid)}")
            if not ch:
                raise ValueError(f"layer {li} expert {e}: keeps no channel; remove the expert instead")
            if len(set(ch)) != len(ch) or ch[0] < 0 or ch[-1] >= inter:
                raise ValueError(f"layer {li} expert {e}: channel ids must be unique and in [0, {inter}), "
                                 f"got {len(ch)} ids in [{ch[0]}, {ch[-1]}]")
            out[li][e] = ch
    return out


ALIGN = 8  # channels: 16-byte rows in bf16/fp16 (32 in fp32), as grouped_mm requires


def fused_width(counts: list[int], inter: int | None, align: int = ALIGN) -> int:
    """The one fused width of a layer whose experts keep ``counts`` channels of ``inter``: the widest
    count rounded up to a multiple of ``align``, at most ``inter`` (when known)."""
    width = -(-max(counts) // align) * align
    return width if inter is None else min(inter, width)


def neuron_index(rows: list[list[int]], inter: int, align: int = ALIGN) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, dead)`` ``[E, I_new]`` of one layer whose expert ``e`` keeps the sorted channels ``rows[e]``
    of ``inter``: the one fused width ``I_new`` is the widest count rounded up to a multiple of
    ``align`` (at most ``inter``); narrower experts are padded with their lowest removed channels,
    marked ``dead`` (to be zeroed). The single rule of the in-memory and the streaming apply."""
    n = len(rows)
    width = fused_width([len(r) for r in rows], inter, align)
    idx = torch.zeros(n, width, dtype=torch.long)   # [E, I_new] channels kept (padded)
    dead = torch.zeros(n, width, dtype=torch.bool)  # [E, I_new] padding channels to zero
    for e, r in enumerate(rows):
        kept = set(r)
        pad = [j for j in range(inter) if j not in kept][: width - len(r)]
        idx[e] = torch.as_tensor(list(r) + pad, dtype=torch.long)
        dead[e, len(r):] = True
    return idx, dead


def prune_neurons_(model: nn.Module, keep: dict[int, dict[int, list[int]]], *, align: int = ALIGN,
                   finalize: bool = True) -> nn.Module:
    """Keep channels ``keep[layer][expert]`` (current expert ids; experts not listed keep all), in place.

    Each listed layer is sliced to ``I_l = max_e len(keep[e])`` rounded up to a multiple of ``align``
    (``torch._grouped_mm`` rejects rows that are not 16-byte aligned; ``align=1`` disables it);
    narrower experts are padded with removed channels that are then zeroed. Records per-expert live
    channel counts in ``config.moe_pruning["neurons"]`` and finalises the config."""
    if align < 1:
        raise ValueError(f"align={align}; expected a positive number of channels (1 disables rounding)")
    get_adapter(model)
    keep = check_neuron_ids(model, keep)
    blocks = moe_blocks(model)
    for li, per in keep.items():
        block = blocks[li]
        n, inter = num_experts_of(block), intermediate_size_of(block)
        rows = [per.get(e, list(range(inter))) for e in range(n)]
        idx, dead = neuron_index(rows, inter, align)
        slice_neurons_(block, idx)
        if dead.any():
            kill_channels_(block, dead)
        record_neurons(model, li, [len(r) for r in rows], inter)
    if finalize:
        finalize_config(model)
    return model
