"""MoE Pathfinder (Yang, Tian, Song, arXiv 2512.18425): keep the experts on the best routing paths.

Per calibration sample the model is a layered DAG (code-faithful to xicyang/MoE-Pruning@121e214):
``router_l -> expert_{l,i}`` weighs ``r_i`` (mean full-softmax router probability), the expert node
weighs the importance ``e_i`` (below) of its loss ``L_i`` (loss of keeping only expert ``i``), ``expert_{l,i} -> router_{l+1}`` weighs ``a_i`` (mean un-gated output norm, all tokens);
so consecutive experts are linked by the transition intensity ``a_i^(l) r_j^(l+1)``. Path weights are
sums of ``log(w + 1e-10)``. The ``m`` best paths per sample come from an exact DP
(``pathfinder_dp``) and are aggregated over samples to the target budget (``pathfinder_agg``).

Outliers (code only, per sample and layer, IQR with multiplier 3 on loss and norm, >= 4 values):
small loss / large norm -> force-keep, large loss / small norm -> force-remove (keep wins); both leave
the graph (softmax and paths), force-kept experts are re-added at aggregation.

Importance (default ``importance="reference"``, exactly the code's float64 formula):
``e_i = exp(-L_i / tau) / max(sum_{enabled j} exp(-L_j / tau), 1e-10)``, no max subtraction. Once every
``L`` of a layer exceeds ~50 (typical: ``L`` grows with sqrt(tokens x hidden size)) the clamp makes
``log(e + 1e-10)`` the same for every expert (exactly from ``L`` ~ 82), so the importance term drops out and
the plan equals the ``ablation="ti_only"`` plan; this is what the reference computes. Options:
``importance="stable_softmax"`` (max-subtracted softmax: never flat, the lowest-``L`` expert gets up to a
~23-nat bonus, making the path choice nearly one-hot) and ``l_norm`` (``"relative"``: ``L / ||Y||_F``;
``"rms"``: ``L / sqrt(T H)``), which rescale ``L`` before the formula so it stays informative at any size.

Deliberate differences from the reference code (documented, all off the common path):
* per-layer floors ``>= top_k`` (``Target.floors``) are guaranteed: each layer first gets its best
  ``floor`` experts (force-kept, then by path frequency), then the global fill runs;
* force-kept experts never push the plan past the budget: they come first in the fill order (most
  samples first) and the lowest are dropped if they alone exceed it (the code keeps them all);
* exactly tied paths are ordered by their expert tuple (the code keeps insertion order).
Option ``tie_break="spread"`` (not in the paper/code) deals equal-frequency slots over layers instead
of the code's lower-layer-first order, which at E * layers >> m * samples fills whole early layers.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from moeprune.methods.allocation import balance_groups
from moeprune.methods.pathfinder_agg import AGGREGATES, aggregate_paths, check_allocation
from moeprune.methods.pathfinder_dp import one_thread, topm_paths, unique_paths
from moeprune.methods.pathfinder_score import (  # noqa: F401  (GUARD, SUM_FLOOR, iqr_outliers: public here)
    GUARD,
    IMPORTANCES,
    L_NORMS,
    SUM_FLOOR,
    iqr_outliers,
    node_importance,
    normalised_loss,
)
from moeprune.methods.registry import MethodConfig, register_method
from moeprune.methods.target import layer_meta

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan

logger = logging.getLogger(__name__)

TIE_BREAKS = ("layer", "spread")
ABLATIONS = (None, "ti_only", "is_only")


@register_method("pathfinder")
@dataclass(frozen=True)
class Pathfinder(MethodConfig):
    """MoE Pathfinder. ``m``: paths per sample (code default 10; paper: 1 for 50 %, 500 for 25 % on
    Mixtral). ``aggregate``: ``"freq_rank"`` (code: fill the budget by path frequency), ``"union"``
    (paper: keep every expert on a selected path; the budget is ignored, floors kept) or
    ``"adaptive"`` (code's unique-path branch: largest k whose path union fits, then fill).
    ``ablation``: ``"ti_only"`` sets importance e := 1, ``"is_only"`` transition intensity := 1.
    ``importance``: ``"reference"`` (code's formula, flat once all L of a layer exceed ~50) or
    ``"stable_softmax"``; ``l_norm``: None (code), ``"relative"`` or ``"rms"`` (see ``normalised_loss``;
    the IQR outlier rule always sees the raw L, as in the code, and is invariant to the rescaling).
    ``max_samples``: first samples used (code ``path_limit`` 25; None = all). ``tie_break``: order of
    experts with equal frequency (most have 0 when E * layers >> m * samples): ``"layer"`` (code: lower
    layer first, which can fill whole early layers) or ``"spread"`` (round-robin over layers, each
    layer's most-routed experts by mean ``r`` first). ``Target.allocation``
    ``"method"``/``"global"``: one fill over all layers (non-uniform counts, the paper's point);
    ``"uniform"``: the same count per layer, by the same order. Plan ``scores`` = path frequency."""

    needs = ("paths",)
    m: int = 10
    tau: float = 1.0
    aggregate: str = "freq_rank"
    ablation: str | None = None
    outliers: bool = True
    loss_iqr_multiplier: float = 3.0
    norm_iqr_multiplier: float = 3.0
    min_values: int = 4
    unique_paths: bool = False
    max_samples: int | None = 25
    tie_break: str = "layer"
    importance: str = "reference"
    l_norm: str | None = None

    def __post_init__(self):
        if int(self.m) != self.m or self.m < 1:
            raise ValueError(f"m={self.m} must be a positive integer (paths kept per calibration sample)")
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau} must be > 0 (temperature of exp(-loss / tau))")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={self.aggregate!r}; choose one of {list(AGGREGATES)}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation={self.ablation!r}; choose one of {list(ABLATIONS)}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={self.tie_break!r}; choose one of {list(TIE_BREAKS)}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance={self.importance!r}; choose one of {list(IMPORTANCES)}")
        if self.l_norm not in L_NORMS:
            raise ValueError(f"l_norm={self.l_norm!r}; choose one of {list(L_NORMS)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples={self.max_samples} must be >= 1 or None (all samples)")

    # ------------------------------------------------------------------ graph (overridden by variants)
    def _prepare(self, stats: ExpertStats, layers: list[int]) -> dict:
        """Per-plan data shared by all samples."""
        return {}

    def _graph(self, stats: ExpertStats, layers: list[int], s: int, e: list[torch.Tensor],
               enabled: list[torch.Tensor], ctx: dict
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[int]]:
        """``(source, edges, sink, expert_dag_layers)`` of sample ``s``: expert layers joined by hubs."""
        lr, la, le = [], [], []
        for li, en, ei in zip(layers, enabled, e):
            r = stats.get(li, "sample_prob_mean")[s].to(torch.float64)
            a = stats.get(li, "sample_norm_mean")[s].to(torch.float64)
            no_ti = self.ablation == "is_only"  # transition intensity a_i r_j := 1
            lr.append(torch.zeros_like(r) if no_ti else torch.log(r + GUARD))
            la.append(torch.zeros_like(a) if no_ti else torch.log(a + GUARD))
            imp = torch.zeros_like(ei) if self.ablation == "ti_only" else torch.log(ei + GUARD)
            le.append(imp.masked_fill(~en, float("-inf")))
        node = [x + y for x, y in zip(lr, le)]  # router -> expert edge + expert node weight
        edges = []
        for l in range(1, len(layers)):
            # expert -> hub [E, 1], hub -> expert [1, E]
            edges += [la[l - 1].unsqueeze(1), node[l].unsqueeze(0)]
        return node[0], edges, la[-1], [2 * l for l in range(len(layers))]

    # ------------------------------------------------------------------ plan
    def sample_paths(self, stats: ExpertStats, layers: list[int], s: int,
                     ctx: dict) -> tuple[torch.Tensor, dict, dict]:
        """Sample ``s``: ``(paths [M, n_layers] expert ids best first, force_keep, force_remove)``."""
        fk, fr, e, enabled = {}, {}, [], []
        for li in layers:
            loss = stats.get(li, "sample_recon_loss")[s].to(torch.float64)
            norm = stats.get(li, "sample_norm_mean")[s].to(torch.float64)
            if self.outliers:
                fk[li], fr[li] = iqr_outliers(loss, norm, self.loss_iqr_multiplier, self.norm_iqr_multiplier,
                                              self.min_values)
            else:
                fk[li] = fr[li] = torch.zeros(loss.numel(), dtype=torch.bool)
            enabled.append(~(fk[li] | fr[li]))
            e.append(node_importance(normalised_loss(stats, li, s, self.l_norm), enabled[-1], self.tau,
                                     self.importance))
        source, edges, sink, pos = self._graph(stats, layers, s, e, enabled, ctx)
        if self.unique_paths:
            _, nodes = unique_paths(source, edges, sink, self.m, layers=pos)
        else:
            _, nodes = topm_paths(source, edges, sink, self.m)
        return nodes[:, pos], fk, fr

    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        from moeprune.plan import LayerPlan, PruningPlan

        layers = stats.moe_layers
        if not layers:
            raise ValueError("stats hold no MoE layers")
        n = _num_samples(stats, layers)
        used = n if self.max_samples is None else min(n, self.max_samples)
        if used < n:
            logger.info("pathfinder: using the first %d of %d calibration samples (max_samples)", used, n)
        check_allocation(self.aggregate, target.allocation)
        budget = target.resolve(stats)
        all_paths, fk_count, fr_any = [], {}, {}
        with one_thread():  # many small ops: see pathfinder_dp.one_thread
            ctx = self._prepare(stats, layers)
            for s in tqdm(range(used), desc=f"{self.name}: top-{self.m} paths", disable=None):
                p, fk, fr = self.sample_paths(stats, layers, s, ctx)
                all_paths.append(p)
                for li in layers:
                    fk_count[li] = fk_count.get(li, 0) + fk[li].long()
                    fr_any[li] = fr_any.get(li, torch.zeros_like(fr[li])) | fr[li]
        tie_rank = None
        if self.tie_break == "spread":  # within-layer rank (0 = most routed) of the mean router probability
            tie_rank = {li: torch.argsort(torch.argsort(-stats.get(li, "sample_prob_mean")[:used].mean(0),
                                                        stable=True)) for li in layers}
        keep, freq, info = aggregate_paths(layers, all_paths, fk_count, fr_any, budget, self.aggregate,
                                           target.allocation, self.m, tie_rank)
        # group-limited routers (DeepSeek-V3 family) route exactly only with balanced groups
        keep, ginfo = balance_groups(stats, keep, freq, budget.floors)
        info.update(ginfo)
        plans = {li: LayerPlan(num_experts=budget.num_experts[li], keep=tuple(keep[li]),
                               scores=tuple(float(x) for x in freq[li])) for li in layers}
        meta = {"samples_used": used, "paths_per_sample": [int(p.shape[0]) for p in all_paths],
                "force_keep": int(sum(int((c > 0).sum()) for c in fk_count.values())),
                "force_remove": int(sum(int(r.sum()) for r in fr_any.values())), **info}
        logger.info("%s: kept %d experts (%d force-kept, %d force-removed outliers), per layer %s", self.name,
                    sum(len(v) for v in keep.values()), meta["force_keep"], meta["force_remove"],
                    {li: len(v) for li, v in keep.items()})
        return PruningPlan(layers=plans, method=self.name, method_config=self.to_dict(),
                           target=target.to_dict(), model_type=stats.meta.get("model_type"), meta=meta)


@register_method("pathfinder_coroute")
@dataclass(frozen=True)
class PathfinderCoroute(Pathfinder):
    """Pathfinder whose layer-to-layer transitions are MEASURED co-routing: the observed counts
    ``C[i, j]`` (tokens routed to ``i`` in layer ``l`` and ``j`` in the next MoE layer) become
    ``P(j | i) = (C[i, j] + smoothing) / (sum_j' C[i, j'] + smoothing * E_next)`` (additive / Laplace
    smoothing: unseen transitions stay possible; a row without tokens becomes uniform). A path weighs
    ``r_{j_0} * prod_l P(j_{l+1} | j_l) * prod_l e_{j_l}`` (a Markov route probability times the node
    importances), found by the general (non-separable) DP. Transitions are calibration-set totals;
    ``r`` and ``e`` are per sample. ``ablation="is_only"`` drops ``r`` and ``P``; ``"ti_only"``
    drops ``e``. With the default (reference) importance, flat once every L exceeds ~50, the measured
    transitions decide the paths; ``importance="stable_softmax"`` lets ``e`` dominate them instead."""

    needs = ("paths", "transitions")
    smoothing: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.smoothing >= 0:
            raise ValueError(f"smoothing={self.smoothing} must be >= 0 (pseudo-count added to every "
                             "transition)")

    def _prepare(self, stats: ExpertStats, layers: list[int]) -> dict:
        """Smoothed log P(j | i) per consecutive MoE layer pair ``[E_l, E_next]``."""
        logp = []
        for li, nxt in itertools.pairwise(layers):
            declared = layer_meta(stats, "next_moe_layer", li)
            if declared is not None and int(declared) != nxt:
                raise ValueError(f"stats.meta next_moe_layer[{li}] = {declared}, but the next MoE layer in "
                                 f"the stats is {nxt}; the transition counts do not match these layers")
            c = stats.get(li, "transition").to(torch.float64)  # [E_l, E_next]
            want = (stats.num_experts(li), stats.num_experts(nxt))
            if tuple(c.shape) != want:
                raise ValueError(f"transition of layer {li} has shape {tuple(c.shape)}, expected "
                                 f"{list(want)}")
            num = c + self.smoothing
            den = num.sum(1, keepdim=True)
            p = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, 1.0 / c.shape[1]))
            logp.append(torch.log(p + GUARD))
        return {"logp": logp}

    def _graph(self, stats, layers, s, e, enabled, ctx):
        def imp(ei, en):
            x = torch.zeros_like(ei) if self.ablation == "ti_only" else torch.log(ei + GUARD)
            return x.masked_fill(~en, float("-inf"))

        is_only = self.ablation == "is_only"
        r0 = stats.get(layers[0], "sample_prob_mean")[s].to(torch.float64)
        source = (torch.zeros_like(r0) if is_only else torch.log(r0 + GUARD)) + imp(e[0], enabled[0])
        edges = []
        for l in range(1, len(layers)):
            t = torch.zeros_like(ctx["logp"][l - 1]) if is_only else ctx["logp"][l - 1]
            edges.append((t + imp(e[l], enabled[l]).unsqueeze(0)).masked_fill(~enabled[l - 1].unsqueeze(1),
                                                                              float("-inf")))
        sink = torch.zeros(e[-1].numel(), dtype=torch.float64)
        return source, edges, sink, list(range(len(layers)))


def _num_samples(stats: ExpertStats, layers: list[int]) -> int:
    """Number of calibration samples, checked consistent across layers and statistics."""
    ns = {(li, k): int(stats.get(li, k).shape[0]) for li in layers
          for k in ("sample_prob_mean", "sample_norm_mean", "sample_recon_loss")}
    if len(set(ns.values())) != 1:
        raise ValueError(f"per-sample statistics disagree on the number of samples: {ns}")
    n = next(iter(ns.values()))
    if n == 0:
        raise ValueError("the 'paths' statistics hold no calibration sample; re-run observe with "
                         "feature 'paths'")
    return n
