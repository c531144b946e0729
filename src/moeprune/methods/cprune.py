"""C-Prune: cluster-driven expert pruning (Guo et al., arXiv 2504.07807).

**Which algorithm.** This implements the *released code* (Fighoture/MoE_unsupervised_pruning,
``pruning_mask.py``), not the paper's equations: the equations leave alpha, gamma, beta, delta, eta,
lambda, epsilon, zeta and r unspecified and add weight merging and router averaging that the code never
ran, whereas the code is fully specified and is what the paper's tables and Table-4 defaults describe.

Statistic: ``sentence_out [N, E, H]`` = ``f_j(mean of sample n's valid tokens)`` for every expert j.

1. **Layer-wise stage.** Samples are split into batches of ``batch_size`` (sample order, or a seeded
   shuffle). Per batch, expert j's feature is ``v_j = flatten(sentence_out[batch, j]) [B*H]``; experts are
   clustered into ``layer_clusters`` clusters (Ward linkage + ``fcluster(maxclust)``, or seeded k-means).
   In each cluster C: if ``|C| < 3`` all members are *selected*, else the
   ``int(c(p) * (1 - rate) * |C|)`` members nearest the cluster mean (capped at ``|C|``), with the code's
   coefficient (operator precedence kept) ``p = |C| / E``,
   ``c = 0.6 * (exp(0.5 - p) - exp(p - 0.5) / (exp(p - 0.5) + exp(0.5 - p))) + 0.5``.
   ``count_j`` = number of batches that selected j; the layer prunes its ``n_l`` lowest counts.
2. **Global stage** (``allocation`` global / method): the surviving experts of all layers are pooled and
   the same per-batch clustering (``global_clusters``) and counting runs on the pool; the lowest counts go,
   never taking a layer below its floor (top_k / min_keep; the code's ``0.9 * N`` cap is replaced by it).

**Mapping to the Target.** With total pruned fraction ``s`` (``1 - total_keep / sum E``):
``allocation="uniform"`` -> the layer stage alone prunes ``E_l - uniform_keep_l`` per layer;
otherwise the layer stage prunes ``floor(layer_rate * E_l)`` per layer with
``layer_rate = 1 - sqrt(1 - s)`` unless given (the paper's equal rates: 0.1 + 0.1 ~ 0.19 total), and the
global stage prunes exactly the rest. ``rate`` in the coefficient is the stage's own pruned fraction.

Deviations, deliberate: Ward runs on the feature vectors (the code passes the square distance matrix
to ``linkage``, i.e. Ward on rows of the distance matrix; ``ward_on_distances=True`` reproduces that);
count ties keep the lower expert id (library-wide convention); no padding positions enter the sentence
mean (observe masks them). Group-limited layers are re-balanced with ``allocation.balance_groups``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from moeprune.methods.allocation import balance_groups, build_plan, ranked
from moeprune.methods.registry import MethodConfig, register_method

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan


def coefficient(size: int, num_experts: int) -> float:
    """The released code's dynamic selection coefficient (precedence as written there)."""
    p = size / num_experts
    return 0.6 * (math.exp(0.5 - p) - math.exp(p - 0.5) / (math.exp(p - 0.5) + math.exp(0.5 - p))) + 0.5


@register_method("cprune")
@dataclass(frozen=True)
class CPrune(MethodConfig):
    """Per-batch clustering of expert outputs; experts rarely chosen as cluster representatives go."""

    batch_size: int = 32
    layer_clusters: int = 12
    global_clusters: int = 6
    layer_rate: float | None = None
    clustering: str = "ward"
    ward_on_distances: bool = False
    shuffle: bool = False
    seed: int = 42

    needs: ClassVar[tuple[str, ...]] = ("cluster",)

    def __post_init__(self):
        if self.clustering not in ("ward", "kmeans"):
            raise ValueError(f"clustering={self.clustering!r}; choose 'ward' or 'kmeans'")
        if self.layer_rate is not None and not 0.0 <= self.layer_rate < 1.0:
            raise ValueError(f"layer_rate={self.layer_rate} must lie in [0, 1)")
        if self.batch_size < 1 or self.layer_clusters < 1 or self.global_clusters < 1:
            raise ValueError("batch_size, layer_clusters and global_clusters must be >= 1")

    # ------------------------------------------------------------------ clustering + counting
    def _labels(self, V: np.ndarray, n: int) -> np.ndarray:
        if n >= V.shape[0]:
            return np.arange(V.shape[0])
        if self.clustering == "kmeans":
            from sklearn.cluster import KMeans

            return KMeans(n_clusters=n, random_state=self.seed, n_init=10).fit(V).labels_
        from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage
        from scipy.spatial.distance import pdist, squareform

        if not self.ward_on_distances:
            return fcluster(linkage(V, method="ward"), t=n, criterion="maxclust")
        with warnings.catch_warnings():  # deliberate: the code's square matrix read as observations
            warnings.simplefilter("ignore", ClusterWarning)
            return fcluster(linkage(squareform(pdist(V)), method="ward"), t=n, criterion="maxclust")

    def _count(
        self, feats: torch.Tensor, batches: list[torch.Tensor], n_clusters: int, rate: float, num_experts: int
    ) -> torch.Tensor:
        """``feats [N, M, H]`` (M candidate experts) -> ``[M]`` number of batches selecting each candidate."""
        counts = torch.zeros(feats.shape[1], dtype=torch.float64)
        for idx in batches:
            V = feats[idx].permute(1, 0, 2).reshape(feats.shape[1], -1).numpy()  # [M, B*H]
            labels = self._labels(V, n_clusters)
            for lab in np.unique(labels):
                members = np.flatnonzero(labels == lab)
                if len(members) < 3:
                    counts[members] += 1
                    continue
                dist = np.linalg.norm(V[members] - V[members].mean(0), axis=1)
                n_sel = min(
                    len(members), int(coefficient(len(members), num_experts) * (1 - rate) * len(members))
                )
                order = sorted(range(len(members)), key=lambda i: (dist[i], members[i]))
                counts[members[order[:n_sel]]] += 1
        return counts

    def _batches(self, n: int) -> list[torch.Tensor]:
        perm = (
            torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            if self.shuffle
            else torch.arange(n)
        )
        return list(perm.split(self.batch_size))

    # ------------------------------------------------------------------ plan
    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        budget = target.resolve(stats)
        layers = list(budget.layers)
        ne, floors = budget.num_experts, budget.floors
        feats = {li: stats.get(li, "sentence_out").double() for li in layers}  # [N, E, H]
        n_samples = {f.shape[0] for f in feats.values()}
        if len(n_samples) != 1:
            raise ValueError(f"sentence_out holds different sample counts per layer: {sorted(n_samples)}")
        batches = self._batches(n_samples.pop())
        total = sum(ne.values())
        two_stage = target.allocation != "uniform"
        if not two_stage:
            n_layer = {li: ne[li] - budget.uniform_keep[li] for li in layers}
            n_global = 0
        else:
            n_prune = total - budget.total_keep
            r = self.layer_rate if self.layer_rate is not None else 1 - math.sqrt(1 - n_prune / total)
            n_layer = {li: min(math.floor(r * ne[li] + 1e-9), ne[li] - floors[li]) for li in layers}
            n_global = n_prune - sum(n_layer.values())
            if n_global < 0:
                raise ValueError(
                    f"cprune: layer_rate={r} prunes {sum(n_layer.values())} experts in the layer stage, "
                    f"more than the target's {n_prune}; lower layer_rate or leave it unset"
                )
        keep, freq = {}, {}
        for li in layers:
            c = self._count(feats[li], batches, self.layer_clusters, n_layer[li] / ne[li], ne[li])
            freq[li] = c / len(batches)
            keep[li] = sorted(ranked(c)[: ne[li] - n_layer[li]])
        meta = {
            "allocation": "two_stage" if two_stage else "uniform",
            "layer_stage_pruned": {str(li): n_layer[li] for li in layers},
            "global_stage_pruned": n_global,
        }
        if n_global > 0:
            pool = [(li, e) for li in layers for e in keep[li]]
            pooled = torch.cat([feats[li][:, keep[li]] for li in layers], dim=1)  # [N, sum R_l, H]
            rate = n_global / len(pool)
            c = self._count(pooled, batches, self.global_clusters, rate, max(ne.values()))
            vals = c.tolist()
            order = sorted(
                range(len(pool)), key=lambda i: (vals[i], -pool[i][0], -pool[i][1])
            )  # lowest first
            left, removed = {li: len(keep[li]) for li in layers}, set()
            for i in order:
                if len(removed) == n_global:
                    break
                li, e = pool[i]
                if left[li] > floors[li]:
                    removed.add((li, e))
                    left[li] -= 1
            keep = {li: [e for e in keep[li] if (li, e) not in removed] for li in layers}
            meta["global_counts"] = {f"{li}:{e}": vals[i] for i, (li, e) in enumerate(pool)}
        keep, ginfo = balance_groups(stats, keep, freq, floors)
        return build_plan(
            stats,
            keep,
            target,
            method=self.name,
            method_config=self.to_dict(),
            scores=freq,
            meta={**meta, **ginfo},
        )
