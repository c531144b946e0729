"""From per-layer expert scores to a ``PruningPlan``: uniform or global allocation, floors, router groups.

* **uniform**: layer ``l`` keeps ``Budget.uniform_keep[l]`` experts, its highest scores; ties go to the
  lower expert id (a stable order, so plans are reproducible).
* **global**: every layer first keeps its ``floor`` best experts (``>= top_k``); the remaining experts of
  all layers are ranked together by *normalised* score and taken in that order while the budget allows
  (cost 1 per expert, or ``P_l`` parameters for parameter/memory targets); ties go to the lower layer, then
  the lower expert id. Within a layer the kept set is always a top-k of the raw scores.
* **normalisation** (global only). Raw scores of different layers live on different scales (activation
  norms grow with depth, counts depend on top_k), so a raw global ranking would empty the shallow layers.
  The default ``"mean"`` divides a layer's scores by the mean of their absolute finite values: a score of
  1 means "an average expert of its layer". It keeps order and ratios within the layer (unlike min-max or
  rank), so a layer with a peaked distribution gives up more experts than a flat one; it is well defined
  for signed scores, keeps ``+inf`` (protected experts) and maps an all-zero layer to zeros. ``"rank"``
  (percentile in [0, 1]) and ``"none"`` (scores already comparable, e.g. random or log-probabilities) exist.
* **router groups** (``stats.meta["n_group"][l] = [n_group, topk_group]`` with ``n_group > 1``,
  DeepSeek-V2/V3 family): routing is preserved only if every *surviving* group keeps the same count
  ``c >= 2`` (DeepSeek-V3 scores a group by the sum of its top-2) and the router can still fill top_k
  (``min(topk_group, m) * c >= top_k`` for ``m`` surviving groups). A layer's count ``k`` is realised as
  the feasible ``m * c = k`` whose kept experts (top-``c`` of each of the ``m`` best groups) have the largest
  score sum. When ``k`` has no such factorisation, the layer keeps the largest feasible count below
  ``k`` (never below its floor); under global allocation the freed budget goes to ungrouped layers in
  ranking order, otherwise it stays unused (``plan.meta["unused_budget"]``). When no feasible count lies
  between the floor and ``k``, the layer keeps its plain top-``k`` and ``plan.meta["ungrouped_layers"]``
  names it: apply then falls back to ``n_group = topk_group = 1``, which changes routing semantics.
  ``groups="ignore"`` skips balancing everywhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from moeprune.methods.target import Budget, Target, layer_meta
from moeprune.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from moeprune.observe.stats import ExpertStats

logger = logging.getLogger(__name__)
NORMALIZE = ("mean", "rank", "none")


# ---------------------------------------------------------------------------- scores
def check_scores(stats: ExpertStats, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Validate ``{layer: [E_l]}`` against the stats (same layers, lengths, no NaN); return float64 copies."""
    if sorted(scores) != stats.moe_layers:
        raise ValueError(
            f"scores cover layers {sorted(scores)} but the stats hold MoE layers {stats.moe_layers}"
        )
    out = {}
    for li, s in scores.items():
        s = torch.as_tensor(s, dtype=torch.float64).flatten()
        if s.numel() != stats.num_experts(li):
            raise ValueError(f"layer {li}: {s.numel()} scores for {stats.num_experts(li)} experts")
        if torch.isnan(s).any():
            raise ValueError(
                f"layer {li}: NaN scores for experts {torch.isnan(s).nonzero().flatten().tolist()}"
            )
        out[int(li)] = s
    return out


def normalize_scores(scores: dict[int, torch.Tensor], how: str = "mean") -> dict[int, torch.Tensor]:
    """Per-layer normalisation before a global comparison (see the module docstring)."""
    if how not in NORMALIZE:
        raise ValueError(f"normalize={how!r}; choose one of {list(NORMALIZE)}")
    out = {}
    for li, s in scores.items():
        if how == "none":
            out[li] = s.clone()
        elif how == "mean":
            fin = s[torch.isfinite(s)]
            m = fin.abs().mean() if fin.numel() else torch.tensor(0.0, dtype=s.dtype)
            out[li] = s / m if m > 0 else torch.where(torch.isfinite(s), torch.zeros_like(s), s)
        else:  # rank: 1 for the best expert, 0 for the worst
            r = torch.empty_like(s)
            r[ranked(s)] = torch.linspace(1.0, 0.0, s.numel(), dtype=s.dtype) if s.numel() > 1 else 1.0
            out[li] = r
    return out


def ranked(s: torch.Tensor) -> list[int]:
    """Expert ids by decreasing score, ties by increasing id (deterministic)."""
    vals = s.tolist()
    return sorted(range(len(vals)), key=lambda e: (-vals[e], e))


# ---------------------------------------------------------------------------- router groups
def group_layout(stats: ExpertStats, layer: int) -> tuple[int, int] | None:
    """``(n_group, topk_group)`` of a group-limited router layer, None for ordinary routers."""
    g = layer_meta(stats, "n_group", layer)
    if g is None:
        return None
    ng, tg = (int(g[0]), int(g[1])) if isinstance(g, (list, tuple)) else (int(g), int(g))
    if ng <= 1:
        return None
    E = stats.num_experts(layer)
    if E % ng:
        raise ValueError(
            f"layer {layer}: {E} experts are not divisible into n_group={ng} groups (bad stats.meta)"
        )
    return ng, tg


def balanced_splits(
    num_experts: int, n_group: int, topk_group: int, top_k: int, k: int
) -> list[tuple[int, int]]:
    """All ``(m groups, c experts each)`` with ``m * c == k`` that keep group routing exact."""
    gsz = num_experts // n_group
    cmin = 2 if gsz >= 2 else 1
    return [
        (m, k // m)
        for m in range(n_group, 0, -1)
        if k % m == 0 and cmin <= k // m <= gsz and min(topk_group, m) * (k // m) >= top_k
    ]


def select_grouped(s: torch.Tensor, k: int, groups: tuple[int, int], top_k: int) -> list[int] | None:
    """Best balanced keep set of size ``k`` (max score sum), None when ``k`` cannot be balanced."""
    ng, tg = groups
    gsz = s.numel() // ng
    best, best_val = None, None
    for m, c in balanced_splits(s.numel(), ng, tg, top_k, k):
        per = []
        for g in range(ng):
            ids = [g * gsz + e for e in ranked(s[g * gsz : (g + 1) * gsz])[:c]]
            per.append((float(s[ids].sum()), g, ids))
        chosen = sorted(per, key=lambda x: (-x[0], x[1]))[:m]
        val = sum(x[0] for x in chosen)
        if best_val is None or val > best_val:
            best, best_val = sorted(e for x in chosen for e in x[2]), val
    return best


def feasible_count(E: int, groups: tuple[int, int], top_k: int, floor: int, k: int) -> int | None:
    """Largest balanced count in ``[floor, k]``, None if there is none."""
    for n in range(k, floor - 1, -1):
        if balanced_splits(E, *groups, top_k, n):
            return n
    return None


def balance_groups(
    stats: ExpertStats, keep: dict[int, list[int]], scores: dict[int, torch.Tensor], floors: dict[int, int]
) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """Make keep sets chosen by a method's own rule group-balanced (group-limited layers only).

    A grouped layer gets the balanced set of the largest feasible size ``<= len(keep)`` (not below its
    floor) that overlaps the method's choice most, ties by the method's scores; with no feasible size the
    choice stays and ``info["ungrouped_layers"]`` names the layer (apply then sets n_group=1)."""
    out, info, shrunk, ungrouped = dict(keep), {}, {}, []
    for li in stats.moe_layers:
        g = group_layout(stats, li)
        if g is None:
            continue
        top_k = int(layer_meta(stats, "top_k", li, 1))
        n = feasible_count(stats.num_experts(li), g, top_k, floors[li], len(keep[li]))
        if n is None:
            ungrouped.append(li)
            continue
        composite = normalize_scores({li: scores[li]}, "rank")[li] * 0.5  # [E] in [0, 0.5]
        composite[list(keep[li])] += 1.0  # membership dominates, scores break ties
        out[li] = select_grouped(composite, n, g, top_k)
        if n != len(keep[li]):
            shrunk[str(li)] = [len(keep[li]), n]
    if shrunk:
        info["group_rounded"] = shrunk
    if ungrouped:
        info["ungrouped_layers"] = ungrouped
    return out, info


# ---------------------------------------------------------------------------- allocation
def global_counts(
    budget: Budget,
    norm: dict[int, torch.Tensor],
    *,
    start: dict[int, int] | None = None,
    frozen: set[int] = frozenset(),
    spent: float | None = None,
) -> dict[int, int]:
    """Greedy global fill: floors (or ``start``) first, then the best normalised scores within budget."""
    counts = dict(start or budget.floors)
    acc = sum(counts[li] * budget.cost[li] for li in budget.layers) if spent is None else spent
    cand = []
    for li in budget.layers:
        if li in frozen:
            continue
        order = ranked(norm[li])
        vals = norm[li].tolist()
        cand += [(-vals[e], li, e) for e in order[counts[li] :]]
    for _, li, _e in sorted(cand):
        if acc + budget.cost[li] <= budget.budget + 1e-6:
            counts[li] += 1
            acc += budget.cost[li]
    return counts


def plan_from_scores(
    stats: ExpertStats,
    scores: dict[int, torch.Tensor],
    target: Target,
    *,
    method: str = "manual",
    method_config: dict[str, Any] | None = None,
    normalize: str = "mean",
    groups: str = "balance",
    meta: dict[str, Any] | None = None,
) -> PruningPlan:
    """Keep the highest-scoring experts of each layer under ``target`` (uniform or global allocation).

    ``scores[l]``: ``[E_l]`` importance, higher = keep. ``target.allocation == "method"`` is treated as
    uniform. ``groups``: ``"balance"`` (router-group constraint, see module docstring) or ``"ignore"``.
    The plan stores the raw per-layer scores."""
    if groups not in ("balance", "ignore"):
        raise ValueError(f"groups={groups!r}; choose 'balance' or 'ignore'")
    scores = check_scores(stats, scores)
    budget = target.resolve(stats)
    is_global = target.allocation == "global"
    norm = normalize_scores(scores, normalize)
    counts = global_counts(budget, norm) if is_global else dict(budget.uniform_keep)

    keep: dict[int, list[int]] = {}
    info: dict[str, Any] = {
        "allocation": "global" if is_global else "uniform",
        "normalize": normalize if is_global else None,
    }
    ungrouped, shrunk = [], {}
    grouped = {li: g for li in budget.layers if groups == "balance" and (g := group_layout(stats, li))}
    for li, g in grouped.items():
        n = feasible_count(budget.num_experts[li], g, budget.top_k[li], budget.floors[li], counts[li])
        if n is None:
            ungrouped.append(li)
            logger.warning(
                "layer %d: no group-balanced count in [%d, %d]; keeping the plain top-%d, apply will "
                "set n_group=1 (routing changes)",
                li,
                budget.floors[li],
                counts[li],
                counts[li],
            )
        elif n != counts[li]:
            shrunk[li] = (counts[li], n)
            counts[li] = n
    if shrunk and is_global:
        frozen = set(grouped) - set(ungrouped)
        counts = global_counts(budget, norm, start=counts, frozen=frozen)
    for li in budget.layers:
        g = grouped.get(li)
        sel = (
            select_grouped(scores[li], counts[li], g, budget.top_k[li]) if g and li not in ungrouped else None
        )
        keep[li] = sel if sel is not None else ranked(scores[li])[: counts[li]]
    if shrunk:
        info["group_rounded"] = {str(li): list(v) for li, v in shrunk.items()}
    if ungrouped:
        info["ungrouped_layers"] = ungrouped
    used = sum(len(keep[li]) * budget.cost[li] for li in budget.layers)
    info["unused_budget"] = budget.budget - used
    return build_plan(
        stats,
        keep,
        target,
        method=method,
        method_config=method_config,
        scores=scores,
        meta={**info, **(meta or {})},
    )


def build_plan(
    stats: ExpertStats,
    keep: dict[int, list[int]],
    target: Target,
    *,
    method: str,
    method_config: dict[str, Any] | None = None,
    scores: dict[int, torch.Tensor] | None = None,
    neurons: dict[int, dict[int, list[int]]] | None = None,
    meta: dict[str, Any] | None = None,
) -> PruningPlan:
    """Assemble a ``PruningPlan``; refuse any layer that keeps fewer than its top_k experts."""
    layers = {}
    for li in stats.moe_layers:
        k = int(layer_meta(stats, "top_k", li, 0))
        if len(keep[li]) < k:
            raise ValueError(
                f"layer {li} keeps {len(keep[li])} experts but top_k={k}; the router could not fill "
                f"its top-k: keep at least {k} (raise min_keep or lower the sparsity)"
            )
        nz = (neurons or {}).get(li)
        inter = layer_meta(stats, "intermediate_size", li)
        layers[li] = LayerPlan(
            num_experts=stats.num_experts(li),
            keep=tuple(keep[li]),
            neurons={int(e): tuple(v) for e, v in nz.items()} if nz else None,
            intermediate_size=int(inter) if nz and inter is not None else None,
            scores=tuple(scores[li].tolist()) if scores is not None else None,
        )
    return PruningPlan(
        layers=layers,
        method=method,
        method_config=dict(method_config or {}),
        target=target.to_dict(),
        model_type=stats.meta.get("model_type"),
        meta=dict(meta or {}),
    )
