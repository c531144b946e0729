"""C-Prune: cluster-driven expert pruning (Guo et al., arXiv 2504.07807).

**Which algorithm.** The *released code* (Fighoture/MoE_unsupervised_pruning @65719c5, ``pruning_mask.py``,
``utils/uns_utils.py``), not the paper's equations (they leave alpha, gamma, beta, ... unspecified and add
merging the code never ran). With default options every step below is the code's.

Statistic: ``sentence_out [N, E, H]`` = ``f_j(mean of sample n's tokens)`` for every expert j.

1. **Layer stage** (rate ``lr``). Samples are split into batches of ``batch_size``. Per batch, expert j's
   feature is ``v_j = fp16(flatten(sentence_out[batch, j])) [B*H]``; ``Z = linkage(squareform(pdist(V)),
   "ward")`` (SciPy reads the rows of the square distance matrix as observations) and
   ``fcluster(Z, layer_clusters, "maxclust")``; ``d_j = ||v_j - mean of its cluster||`` in fp16 numpy
   arithmetic. A cluster C with ``|C| < 3`` selects all members, else the
   ``int(c * (1 - lr) * |C|)`` nearest (distance ties: lower id first), with the code's coefficient
   (operator precedence kept) ``p = |C| / E``, ``c = 0.6 * (exp(.5-p) - exp(p-.5) / (exp(p-.5) + exp(.5-p)))
   + .5``. ``count_j`` = batches selecting j; the ``int(lr * E)`` lowest counts go, **equal counts: the
   lowest id goes first** (a stable ascending sort).
2. **Global stage** (rate ``gr``). The survivors of all layers are pooled (layer order, then id); the same
   counting with ``global_clusters`` and ``gr`` (``p = |C| / E`` still); the ``int(gr * pool)`` lowest
   counts go (ties: lowest pool position). Per layer the global list is cut to its first
   ``int(n_layer // lr * 0.9)`` entries when ``n_layer + n_global`` exceeds that number (the code's cap,
   float floor division kept; skipped when ``lr == 0``, where the code divides by zero).

**Rates and the Target.** The code has two rates (``0.1 / 0.1`` in its script) and no total target.
``layer_rate`` / ``global_rate`` given: used verbatim. Not given: derived from the target's pruned fraction
``s = 1 - total_keep / sum E``: two-stage allocations (``"method"`` / ``"global"``) use equal rates
``r = 1 - sqrt(1 - s)`` (so ``s = 0.19`` gives the code's 0.1 / 0.1); one rate given, the other solves
``(1 - lr)(1 - gr) = 1 - s``; ``allocation="uniform"`` runs the layer stage alone, pruning the target's
per-layer count. The code's ``int()`` counts and cap usually prune a little less than ``s``: the plan
records ``achieved_expert_sparsity`` and warns; ``global_stage="exact"`` hits the target instead.

**Floors.** The code can leave a layer fewer than ``top_k`` experts; that raises an error naming the layer,
unless ``respect_floors=True`` (the layer's global list, then its layer count, is cut to its floor).

Options (each a deliberate, non-default deviation): ``precision="float64"`` (no fp16 rounding / overflow of
distances), ``ward_on_distances=False`` (Ward on the feature vectors), ``ties="keep_lower_id"`` (library
convention), ``global_stage="exact"`` (the global stage prunes exactly the rest of the target, skipping
layers at their floor, no 0.9 cap), ``shuffle`` (seeded batch order), ``clustering="kmeans"`` (the code's
KMeans(random_state=0) alternative). Not reproduced: the code's sentence mean includes padding positions
(observe averages valid tokens only). Group-limited layers are re-balanced with ``balance_groups``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from moeprune.methods.allocation import balance_groups, build_plan
from moeprune.methods.cprune_counting import prune_order, reference_cap, selection_counts
from moeprune.methods.registry import MethodConfig, register_method

if TYPE_CHECKING:
    from moeprune.methods.target import Budget, Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan

_CHOICES = {
    "clustering": ("ward", "kmeans"),
    "precision": ("float16", "float64"),
    "ties": ("reference", "keep_lower_id"),
    "global_stage": ("reference", "exact"),
}


@register_method("cprune")
@dataclass(frozen=True)
class CPrune(MethodConfig):
    """Per-batch clustering of expert outputs; experts rarely chosen as cluster representatives go."""

    batch_size: int = 32
    layer_clusters: int = 12
    global_clusters: int = 6
    layer_rate: float | None = None
    global_rate: float | None = None
    global_stage: str = "reference"
    clustering: str = "ward"
    ward_on_distances: bool = True
    precision: str = "float16"
    ties: str = "reference"
    respect_floors: bool = False
    shuffle: bool = False
    seed: int = 42

    needs: ClassVar[tuple[str, ...]] = ("cluster",)

    def __post_init__(self):
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose one of {list(choices)}")
        for field in ("layer_rate", "global_rate"):
            v = getattr(self, field)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(
                    f"{field}={v} must lie in [0, 1) (fraction pruned by that stage) or be unset"
                )
        if self.batch_size < 1 or self.layer_clusters < 1 or self.global_clusters < 1:
            raise ValueError("batch_size, layer_clusters and global_clusters must be >= 1")

    # ------------------------------------------------------------------ clustering + counting
    def _count(
        self,
        feats: torch.Tensor,
        batches: list[torch.Tensor],
        n_clusters: int,
        rate: float,
        num_experts: int,
        overflow: list[int],
    ) -> list[int]:
        counts, n_inf = selection_counts(
            feats,
            batches,
            n_clusters,
            rate,
            num_experts,
            precision=self.precision,
            clustering=self.clustering,
            ward_on_distances=self.ward_on_distances,
        )
        overflow[0] += n_inf
        return counts

    def _batches(self, n: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        return list(perm.split(self.batch_size))

    # ------------------------------------------------------------------ rates and counts
    def _rates(self, budget: Budget, two_stage: bool) -> tuple[float, float]:
        """(layer rate, global rate): given verbatim, else derived from the target (module docstring)."""
        s = 1 - budget.total_keep / sum(budget.num_experts.values())
        lr, gr = self.layer_rate, self.global_rate
        if not two_stage:
            if gr not in (None, 0.0):
                raise ValueError(
                    f"cprune: global_rate={gr} needs allocation='method' (or 'global'); "
                    "allocation='uniform' runs the layer stage alone"
                )
            return (s if lr is None else lr), 0.0
        if lr is None and gr is None:
            r = round(1 - math.sqrt(1 - s), 12)
            return r, r
        if lr is not None and gr is not None:
            return lr, gr
        other = round(1 - (1 - s) / (1 - (lr if gr is None else gr)), 12)
        if other < 0:
            given = f"layer_rate={lr}" if gr is None else f"global_rate={gr}"
            raise ValueError(
                f"cprune: {given} alone prunes more than the target's fraction {s:.4f}; lower it, "
                "give both rates, or leave both unset"
            )
        return (lr, other) if gr is None else (other, gr)

    def _layer_counts(self, budget: Budget, lr: float, two_stage: bool) -> dict[int, int]:
        out = {}
        for li in budget.layers:
            E, floor = budget.num_experts[li], budget.floors[li]
            derived_uniform = not two_stage and self.layer_rate is None
            n = E - budget.uniform_keep[li] if derived_uniform else int(lr * E)
            if n > E - floor:
                if not self.respect_floors:
                    raise ValueError(
                        f"cprune: layer {li}: the layer stage would prune {n} of {E} experts, leaving fewer than "
                        f"its floor {floor} (top_k / min_keep); lower layer_rate or set respect_floors=True"
                    )
                n = E - floor
            out[li] = n
        return out

    def _global_lists(
        self,
        counts: list[int],
        pool: list[tuple[int, int]],
        n_global: int,
        n_layer: dict[int, int],
        lr: float,
        budget: Budget,
    ) -> tuple[dict[int, list[int]], dict]:
        """Global-stage removals per layer (in prune order) and what the cap / floors cut."""
        order = prune_order(counts, pool, self.ties)
        out: dict[int, list[int]] = {li: [] for li in budget.layers}
        info: dict[str, dict[str, int]] = {}
        if self.global_stage == "exact":  # lowest counts, skipping layers at their floor, exactly n_global
            left = {li: budget.num_experts[li] - n_layer[li] for li in budget.layers}
            for i in order:
                if sum(map(len, out.values())) == n_global:
                    break
                li, e = pool[i]
                if left[li] > budget.floors[li]:
                    out[li].append(e)
                    left[li] -= 1
            return out, info
        for i in order[:n_global]:
            out[pool[i][0]].append(pool[i][1])
        for li in budget.layers:
            cap = reference_cap(n_layer[li], lr)
            if cap is not None and len(out[li]) + n_layer[li] > cap and len(out[li]) > cap:
                info.setdefault("global_capped", {})[str(li)] = len(out[li]) - cap
                out[li] = out[li][:cap]
            room = budget.num_experts[li] - n_layer[li] - budget.floors[li]
            if len(out[li]) > room:
                if not self.respect_floors:
                    raise ValueError(
                        f"cprune: layer {li} would keep {budget.num_experts[li] - n_layer[li] - len(out[li])} "
                        f"experts, below its floor {budget.floors[li]} (top_k / min_keep): the reference code "
                        f"prunes {n_layer[li]} there layer-wise and {len(out[li])} globally; set "
                        "respect_floors=True, lower global_rate / the target, or use global_stage='exact'"
                    )
                info.setdefault("floor_cut", {})[str(li)] = len(out[li]) - room
                out[li] = out[li][:room]
        return out, info

    def _layer_stage(
        self,
        feats: dict[int, torch.Tensor],
        batches: list[torch.Tensor],
        n_layer: dict[int, int],
        lr: float,
        ne: dict[int, int],
        overflow: list[int],
    ) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Per layer: kept ids after pruning the ``n_layer`` lowest selection counts; selection frequency."""
        keep, freq = {}, {}
        for li, f in feats.items():
            c = self._count(f, batches, self.layer_clusters, lr, ne[li], overflow)
            freq[li] = torch.tensor(c, dtype=torch.float64) / len(batches)  # [E]
            gone = set(prune_order(c, [(li, e) for e in range(ne[li])], self.ties)[: n_layer[li]])
            keep[li] = [e for e in range(ne[li]) if e not in gone]
        return keep, freq

    # ------------------------------------------------------------------ plan
    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        budget = target.resolve(stats)
        layers, ne = list(budget.layers), budget.num_experts
        if self.precision == "float64" and any(stats.get(li, "sentence_out").dtype == torch.float16 for li in layers):
            raise ValueError("cprune precision='float64' needs float64 sentence_out; these statistics store float16 "
                             "rows (calibration.cluster_dtype: float16): calibrate with cluster_dtype float64, or "
                             "use precision='float16' (the reference's)")
        feats = {li: stats.get(li, "sentence_out").double() for li in layers}  # [N, E, H]
        n_samples = {f.shape[0] for f in feats.values()}
        if len(n_samples) != 1:
            raise ValueError(f"sentence_out holds different sample counts per layer: {sorted(n_samples)}")
        batches, overflow = self._batches(n_samples.pop()), [0]
        two_stage = target.allocation != "uniform"
        lr, gr = self._rates(budget, two_stage)
        n_layer = self._layer_counts(budget, lr, two_stage)
        keep, freq = self._layer_stage(feats, batches, n_layer, lr, ne, overflow)
        total, n_prune = sum(ne.values()), sum(ne.values()) - budget.total_keep
        n_global = 0
        if two_stage:
            pool = [(li, e) for li in layers for e in keep[li]]
            n_global = (
                n_prune - sum(n_layer.values()) if self.global_stage == "exact" else int(gr * len(pool))
            )
            if n_global < 0:
                raise ValueError(
                    f"cprune: the layer stage prunes {sum(n_layer.values())} experts, more than the "
                    f"target's {n_prune}; lower layer_rate or leave it unset"
                )
        meta = {
            "allocation": "two_stage" if two_stage else "uniform",
            "layer_rate": lr,
            "global_rate": gr,
            "layer_stage_pruned": {str(li): n_layer[li] for li in layers},
        }
        if n_global > 0:
            pooled = torch.cat([feats[li][:, keep[li]] for li in layers], dim=1)  # [N, sum R_l, H]
            c = self._count(pooled, batches, self.global_clusters, gr, max(ne.values()), overflow)
            removed, info = self._global_lists(c, pool, n_global, n_layer, lr, budget)
            keep = {li: [e for e in keep[li] if e not in set(removed[li])] for li in layers}
            meta.update(info, global_counts={f"{li}:{e}": v for (li, e), v in zip(pool, c)})
        meta["global_stage_pruned"] = total - sum(map(len, keep.values())) - sum(n_layer.values())
        self._report(meta, total, keep, budget, overflow[0])
        keep, ginfo = balance_groups(stats, keep, freq, budget.floors)
        return build_plan(
            stats,
            keep,
            target,
            method=self.name,
            method_config=self.to_dict(),
            scores=freq,
            meta={**meta, **ginfo},
        )

    def _report(
        self, meta: dict, total: int, keep: dict[int, list[int]], budget: Budget, overflow: int
    ) -> None:
        """Record the achieved sparsity (and fp16 overflow); warn where they deserve attention."""
        kept = sum(map(len, keep.values()))
        meta["achieved_expert_sparsity"] = 1 - kept / total
        meta["target_expert_sparsity"] = 1 - budget.total_keep / total
        if kept != budget.total_keep:
            warnings.warn(
                f"cprune: the code's counting (layer_rate={meta['layer_rate']}, global_rate="
                f"{meta['global_rate']}) keeps {kept} of {total} experts (sparsity "
                f"{meta['achieved_expert_sparsity']:.4f}); the target asks {budget.total_keep} "
                f"({meta['target_expert_sparsity']:.4f}); global_stage='exact' hits the target",
                stacklevel=3,
            )
        if overflow:
            meta["fp16_inf_distances"] = overflow
            warnings.warn(
                f"cprune: {overflow} distances overflowed fp16 (inf, as in the reference code; ties "
                "then go to the lower id); precision='float64' avoids it",
                stacklevel=3,
            )
