"""Structural expert pruning in memory, with a different number of kept experts per layer.

Per MoE layer this slices the fused expert tensors, the router rows, router and selection biases
(``e_score_correction_bias``, ``expert_bias``, Ernie ``moe_statics``) and Gemma4's
``per_expert_scale``, and rewrites the count attributes the forward reads (``grouped_mm`` bins by
``experts.num_experts``). The pruned model equals the original whose pruned experts get ``-inf``
router logits (``mask_experts``), which the tests check for every supported family.
"""
from __future__ import annotations

import warnings
from collections import Counter

from torch import nn

from moeprune.apply.config import finalize_config, record_kept_experts
from moeprune.arch.adapters import get_adapter
from moeprune.arch.structure import (
    current_top_k,
    get_router,
    group_info,
    iter_moe_blocks,
    num_experts_of,
    set_group_attrs,
    slice_experts_,
)

REGROUP = ("auto", "error")


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """``{layer_idx: block}`` of every MoE block (layer ids as in stats and plans)."""
    return {li: b for li, _, b in iter_moe_blocks(model)}


def is_group_limited(block: nn.Module) -> bool:
    """Group-limited routing is active (DeepSeek-V2 only with ``topk_method='group_limited_greedy'``)."""
    r = get_router(block)
    return group_info(block)[0] > 1 and getattr(r, "topk_method", "group_limited_greedy") != "greedy"


def check_expert_ids(model: nn.Module, keep: dict[int, list[int]]) -> dict[int, list[int]]:
    """Validate a ``{layer: kept ids}`` plan against the model; returns it with sorted ids."""
    blocks = moe_blocks(model)
    out = {}
    for li, ids in keep.items():
        li = int(li)
        if li not in blocks:
            raise ValueError(f"layer {li} is not an MoE layer of this model; MoE layers: {sorted(blocks)}")
        n = num_experts_of(blocks[li])
        ids = sorted(int(e) for e in ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"layer {li}: duplicate expert ids in {ids}")
        if ids and (ids[0] < 0 or ids[-1] >= n):
            raise ValueError(f"layer {li}: expert ids {ids} out of range [0, {n}) (ids are the layer's current ids)")
        k = current_top_k(blocks[li]) or 1
        if len(ids) < k:
            hint = " (PhiMoE's sparsemixer is hard-wired top-2)" if get_adapter(model).model_type == "phimoe" else ""
            raise ValueError(f"layer {li}: the plan keeps {len(ids)} experts but the router selects top_k={k}"
                             f"{hint}; keep at least {k} experts per layer (lower the sparsity or set a "
                             f"per-layer floor >= {k})")
        out[li] = ids
    return out


def new_groups(block: nn.Module, li: int, ids: list[int], regroup: str) -> tuple[int, int] | None:
    """``(n_group, topk_group)`` after pruning, or None when the router is not group-limited.

    Exact only if every surviving group keeps the same number (>= 2, DeepSeek-V3 scores a group by
    its top-2) and the selectable groups still hold top_k experts. Otherwise ``regroup='auto'``
    falls back to plain top-k (``n_group = topk_group = 1``, which changes routing) with a warning."""
    if regroup not in REGROUP:
        raise ValueError(f"regroup={regroup!r}; expected one of {REGROUP}")
    if not is_group_limited(block):
        return None
    ng, tg = group_info(block)
    n = num_experts_of(block)
    per = Counter(e // (n // ng) for e in ids)
    sizes = set(per.values())
    k = current_top_k(block) or 1
    if len(sizes) == 1 and min(sizes) >= 2 and min(tg, len(per)) * min(sizes) >= k:
        return len(per), min(tg, len(per))
    msg = (f"layer {li}: kept experts per router group {dict(sorted(per.items()))} are unbalanced "
           f"(n_group={ng}, topk_group={tg}, top_k={k}); keep the same number (>= 2) in every surviving group "
           f"to preserve group-limited routing")
    if regroup == "error":
        raise ValueError(msg + ", or pass regroup='auto' to fall back to n_group=topk_group=1")
    warnings.warn(msg + "; falling back to n_group=topk_group=1 (routing semantics change)", stacklevel=3)
    return 1, 1


def prune_experts_(model: nn.Module, keep: dict[int, list[int]], *, regroup: str = "auto",
                   finalize: bool = True) -> nn.Module:
    """Keep only experts ``keep[layer]`` (current ids) in each listed layer, in place.

    The whole plan is validated before any tensor changes (a refused plan leaves the model intact).
    Layers not listed are untouched. ``config.moe_pruning["kept_experts"]`` records the original
    ids; the config is then finalised (``apply.config.finalize_config``)."""
    get_adapter(model)
    keep = check_expert_ids(model, keep)
    blocks = moe_blocks(model)
    groups = {li: new_groups(blocks[li], li, ids, regroup) for li, ids in keep.items()}
    for li, ids in keep.items():
        n_before = slice_experts_(blocks[li], ids)
        if groups[li] is not None:
            set_group_attrs(blocks[li], *groups[li])
        record_kept_experts(model, li, ids, n_before)
    if finalize:
        finalize_config(model)
    return model
