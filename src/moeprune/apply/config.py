"""Config bookkeeping after pruning: make ``config.json`` describe the pruned shapes.

Two outcomes, decided by ``finalize_config(model)``:

* ``"global"``: every MoE layer has the same shape and writing it into the family's own fields
  (``num_experts``/top-k/``n_group``/intermediate size) makes a plain model built from the config
  have exactly the pruned state-dict shapes (checked on the meta device). Plain
  ``from_pretrained`` then reloads the checkpoint.
* ``"per_layer"``: the global fields stay as they are and ``config.moe_pruning`` lists the layers
  that differ (``num_experts``/``top_k``/``n_group``/``intermediate_size``, keyed by layer id as
  str). Plain ``from_pretrained`` fails loudly on the size mismatch; ``load_pruned`` or the
  remote code re-create the shapes (``buckets.apply_pruned_structure``; ragged neuron plans
  stored in width buckets record their layout under ``buckets``).

In both cases ``config.moe_pruning`` also keeps the provenance written by the prune functions:
``kept_experts`` (original expert ids per layer), ``original_num_experts`` and ``neurons``.

``finalize_config`` reads only shapes and config records, never weight values, so it gives the
same answer on a meta-device model. The out-of-core shard rewriter builds a meta model from the
source config, calls ``apply_plan`` on it and then ``finalize_config``, and saves that config: its
``config.json`` is then identical to the in-memory path's.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from moeprune.arch.adapters import cfg_set, get_adapter, text_config
from moeprune.arch.buckets import apply_pruned_structure, bucket_layout
from moeprune.arch.structure import (
    current_top_k,
    get_router,
    group_info,
    intermediate_size_of,
    iter_moe_blocks,
    num_experts_of,
)

SHAPE_KEYS = ("num_experts", "top_k", "n_group", "intermediate_size", "buckets")


def get_record(model_or_config: Any) -> dict[str, Any]:
    """A copy of ``config.moe_pruning`` (``{}`` when absent)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return copy.deepcopy(dict(getattr(text_config(cfg), "moe_pruning", None) or {}))


def set_record(model_or_config: Any, record: dict[str, Any]) -> None:
    tc = text_config(getattr(model_or_config, "config", model_or_config))
    record = {k: v for k, v in record.items() if v}
    if record:
        tc.moe_pruning = record
    elif hasattr(tc, "moe_pruning"):
        del tc.moe_pruning


def base_class(model: nn.Module) -> type:
    """The native transformers class under a dynamic (``load_pruned``) or remote-code subclass."""
    for cls in type(model).__mro__:
        if "_moeprune_base" in vars(cls):
            return vars(cls)["_moeprune_base"]
        if cls.__module__.startswith("transformers.models."):
            return cls
    raise TypeError(f"{type(model).__name__} is not a transformers model class")


def _has_groups(block: nn.Module) -> bool:
    r = get_router(block)
    return hasattr(r, "num_group") or hasattr(r, "n_group")


def layer_shapes(model: nn.Module) -> dict[int, dict[str, Any]]:
    """Per MoE layer: ``num_experts``, ``top_k``, ``n_group`` ([n_group, topk_group] or None),
    ``intermediate_size`` (the widest bucket's for bucketed experts) and ``buckets`` (the layout of
    ``arch.buckets.BucketedExperts`` or None), read from the modules (works on meta tensors)."""
    out = {}
    for li, _, b in iter_moe_blocks(model):
        buckets = bucket_layout(b)
        out[li] = {"num_experts": num_experts_of(b), "top_k": current_top_k(b),
                   "n_group": list(group_info(b)) if _has_groups(b) else None,
                   "intermediate_size": max(buckets["widths"]) if buckets else intermediate_size_of(b),
                   "buckets": buckets}
    return out


def _meta_model(base: type, config: Any) -> nn.Module:
    with torch.device("meta"):
        return base(config)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _set_globals(config: Any, model: nn.Module, shape: dict[str, Any], ref: dict[str, Any]) -> None:
    """Write one layer shape into the family's global fields (only the fields that changed)."""
    ad = get_adapter(model)
    if shape["num_experts"] != ref["num_experts"]:
        cfg_set(config, ad.num_experts, shape["num_experts"])
    if shape["top_k"] != ref["top_k"] and shape["top_k"] is not None:
        cfg_set(config, ad.top_k, shape["top_k"])
    if ad.groups and shape["n_group"] is not None and shape["n_group"] != ref["n_group"]:
        cfg_set(config, ad.groups[0], shape["n_group"][0])
        cfg_set(config, ad.groups[1], shape["n_group"][1])
    if shape["intermediate_size"] != ref["intermediate_size"]:
        cfg_set(config, ad.intermediate, shape["intermediate_size"])


def finalize_config(model: nn.Module) -> str:
    """Make ``model.config`` describe the model's current MoE shapes; returns ``"global"`` or
    ``"per_layer"`` (see the module docstring). Idempotent; edits the config object in place
    because the modules hold references to it. Raises ``RuntimeError`` if neither description
    reproduces the model's state-dict shapes (a bug, never silently saved)."""
    get_adapter(model)  # unsupported families fail here, before any edit
    base = base_class(model)
    record = {k: v for k, v in get_record(model).items() if k not in SHAPE_KEYS}
    cur = layer_shapes(model)
    target = _shapes(model)
    plain = copy.deepcopy(model.config)
    set_record(plain, record)
    ref = layer_shapes(_meta_model(base, plain))
    if set(ref) != set(cur):
        raise RuntimeError(f"MoE layers {sorted(cur)} do not match a fresh model's {sorted(ref)}")
    shapes = list(cur.values())
    if shapes and all(s == shapes[0] for s in shapes):
        trial = copy.deepcopy(plain)
        _set_globals(trial, model, shapes[0], ref[next(iter(ref))])
        try:
            ok = _shapes(_meta_model(base, trial)) == target
        except Exception:  # noqa: BLE001 - a config the family rejects is simply not expressible globally
            ok = False
        if ok:
            _set_globals(model.config, model, shapes[0], ref[next(iter(ref))])
            set_record(model, record)
            return "global"
    for key in SHAPE_KEYS:
        diff = {str(li): cur[li][key] for li in sorted(cur) if cur[li][key] != ref[li][key]}
        if diff:
            record[key] = diff
    check = copy.deepcopy(plain)
    set_record(check, record)
    rebuilt = apply_pruned_structure(_meta_model(base, check), record)
    if _shapes(rebuilt) != target:
        bad = sorted(k for k, v in _shapes(rebuilt).items() if target.get(k) != v)[:5]
        raise RuntimeError(f"config.moe_pruning cannot reproduce the pruned shapes (first mismatches: {bad})")
    set_record(model, record)
    return "per_layer"


def is_per_layer(model_or_config: Any) -> bool:
    """True when the config needs ``load_pruned``/remote code (it carries per-layer shapes)."""
    return any(k in get_record(model_or_config) for k in SHAPE_KEYS)


def record_kept_experts(model: nn.Module, layer: int, keep: list[int], n_before: int) -> None:
    """Compose ``kept_experts`` (original ids) with a new keep list of current ids."""
    rec = get_record(model)
    kept = rec.setdefault("kept_experts", {})
    orig = rec.setdefault("original_num_experts", {})
    key = str(layer)
    prev = kept.get(key, list(range(n_before)))
    orig.setdefault(key, n_before)
    kept[key] = [int(prev[i]) for i in keep]
    neurons = rec.get("neurons", {}).get(key)
    if neurons is not None:  # per-expert neuron record follows the surviving experts
        neurons["live"] = [neurons["live"][i] for i in keep]
    set_record(model, rec)


def record_neurons(model: nn.Module, layer: int, live: list[int], i_before: int) -> None:
    """Record, per current expert of ``layer``, how many channels carry weight (the rest are dead
    padding of ragged plans), and the layer's original intermediate size."""
    rec = get_record(model)
    entry = rec.setdefault("neurons", {}).setdefault(str(layer), {"intermediate_size": i_before})
    entry["live"] = [int(v) for v in live]
    set_record(model, rec)
