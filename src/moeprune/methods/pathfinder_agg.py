"""MoE Pathfinder's aggregation: per-sample top-m paths -> the experts kept within the budget.

``freq`` counts the (sample, path) pairs through each expert. ``"freq_rank"`` (reference code) fills the
budget in order of force-kept samples, then path frequency; ``"union"`` (paper) keeps every expert on a
selected path; ``"adaptive"`` (code's unique-path branch) takes the largest ``k`` whose union of the
``k`` best paths of every sample fits, then fills. Every variant first raises each layer to its floor
(``>= top_k``), and force-kept experts never push the plan past the budget (the lowest are dropped).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moeprune.methods.target import Budget

logger = logging.getLogger("moeprune.methods.pathfinder")  # the method's logger, as before the split

AGGREGATES = ("freq_rank", "union", "adaptive")


def aggregate_paths(layers: list[int], paths: list[torch.Tensor], fk_count: dict[int, torch.Tensor],
                    fr_any: dict[int, torch.Tensor], budget: Budget, aggregate: str = "freq_rank",
                    allocation: str = "method", m: int | None = None,
                    tie_rank: dict[int, torch.Tensor] | None = None
                    ) -> tuple[dict[int, list[int]], dict[int, torch.Tensor], dict]:
    """Per-sample paths -> ``(keep {layer: [expert]}, freq {layer: [E]}, info)``.

    ``freq`` counts the (sample, path) pairs through each expert. Fill order ("key"): force-kept
    (most samples first), then frequency, then ``tie_rank`` (if given), then lower layer, then lower
    expert id (without ``tie_rank``: the code's order)."""
    check_allocation(aggregate, allocation)
    ne, floors, cost = budget.num_experts, budget.floors, budget.cost
    freq = {li: torch.zeros(ne[li], dtype=torch.long) for li in layers}
    for p in paths:
        for c, li in enumerate(layers):
            freq[li] += torch.bincount(p[:, c], minlength=ne[li])
    fkl = {li: fk_count[li].tolist() for li in layers}
    fql = {li: freq[li].tolist() for li in layers}
    trl = {li: tie_rank[li].tolist() if tie_rank else [0] * ne[li] for li in layers}
    key = sorted(((li, e) for li in layers for e in range(ne[li])),
                 key=lambda x: (-fkl[x[0]][x[1]], -fql[x[0]][x[1]], trl[x[0]][x[1]], x[0], x[1]))
    info: dict = {"aggregate": aggregate, "allocation": allocation}
    if aggregate == "freq_rank" and allocation == "uniform":
        by_layer: dict[int, list[int]] = {li: [] for li in layers}
        for li, e in key:
            by_layer[li].append(e)
        keep = {li: set(by_layer[li][:budget.uniform_keep[li]]) for li in layers}
    elif aggregate == "freq_rank":
        keep = _complete(set(), key, key, budget)
    elif aggregate == "union":
        seed = {(li, e) for li in layers for e in range(ne[li]) if fkl[li][e] > 0 or fql[li][e] > 0}
        keep = _complete(seed, key, [], budget)
    else:  # adaptive: the largest k whose path union (+ floors) fits, then fill in (layer, expert) order
        first = {li: torch.full((ne[li],), 1 << 30, dtype=torch.long) for li in layers}
        for p in paths:
            rank = torch.arange(1, p.shape[0] + 1)
            for c, li in enumerate(layers):
                first[li].scatter_reduce_(0, p[:, c], rank, "amin")
        for li in layers:
            first[li][fk_count[li] > 0] = 0
        best = 0
        for k in range(1, (m or max((p.shape[0] for p in paths), default=0)) + 1):
            need = sum(max(int((first[li] <= k).sum()), floors[li]) * cost[li] for li in layers)
            if need <= budget.budget + 1e-9 * max(1.0, budget.budget):
                best = k
        info["selected_k"] = best
        if best == 0:
            logger.warning("pathfinder: the union of the best path of every sample exceeds the budget; "
                           "falling back to aggregate='freq_rank'")
            keep = _complete(set(), key, key, budget)
        else:
            seed = {(li, e) for li in layers for e in range(ne[li]) if int(first[li][e]) <= best}
            fill = sorted(((li, e) for li in layers for e in range(ne[li])),
                          key=lambda x: (bool(fr_any[x[0]][x[1]]), x[0], x[1]))  # force-removed last
            keep = _complete(seed, key, fill, budget)
    kept = {li: sorted(keep[li]) for li in layers}
    info["kept_cost"] = float(sum(len(kept[li]) * cost[li] for li in layers))
    info["dropped_force_keep"] = sum(sum(1 for e in range(ne[li]) if fkl[li][e] > 0 and e not in keep[li])
                                     for li in layers)
    return kept, freq, info


def check_allocation(aggregate: str, allocation: str) -> None:
    if aggregate != "freq_rank" and allocation == "uniform":
        raise ValueError(f"aggregate={aggregate!r} sets the per-layer counts itself, but the target asks "
                         "for allocation='uniform'; use Target(..., allocation='method') or "
                         "aggregate='freq_rank'")


def _complete(seed: set, key: list, fill: list, budget: Budget) -> dict[int, set]:
    """``seed``, then each layer raised to its floor in ``key`` order, then ``fill`` order while it fits."""
    keep = {li: set() for li in budget.layers}
    for li, e in seed:
        keep[li].add(e)
    for li, e in key:
        if len(keep[li]) < budget.floors[li]:
            keep[li].add(e)
    acc = sum(len(keep[li]) * budget.cost[li] for li in budget.layers)
    limit = budget.budget + 1e-9 * max(1.0, budget.budget)
    for li, e in fill:
        if e not in keep[li] and acc + budget.cost[li] <= limit:
            keep[li].add(e)
            acc += budget.cost[li]
    return keep
