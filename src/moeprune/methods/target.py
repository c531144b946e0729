"""What to prune to: a ``Target`` (one budget + an allocation rule) and its resolution on saved stats.

Exactly one budget is given:

* ``expert_sparsity=s`` -- fraction of routed experts removed over the MoE layers. Each layer removes
  ``floor(s * E_l)`` experts under uniform allocation (REAP's ``int(N * ratio)``); global allocation
  removes the same total ``sum_l floor(s * E_l)``, so the uniform and the global plan of one target keep
  exactly the same number of experts and compare fairly.
* ``param_ratio=r`` -- fraction of routed-expert *parameters* kept: ``B = r * sum_l E_l * P_l``
  (``P_l`` = ``meta["expert_params"][l]``; equal sizes assumed when absent). Differs from expert sparsity
  with neuron pruning (TENP) or non-uniform expert sizes.
* ``memory_gb=M`` -- total weight memory, ``GB = 1e9 bytes`` (as HF shard sizes): the routed-expert
  parameter budget is ``B = M * 1e9 / dtype_bytes - other_params`` (``meta["dtype_bytes"]``,
  ``meta["other_params"]``, all non-routed-expert parameters incl. shared experts and embeddings).

``allocation``: ``"uniform"`` (same count / fraction in every layer), ``"global"`` (one ranking over all
layers, see ``allocation.py``) or ``"method"`` (the method's own rule, e.g. Pathfinder, C-Prune; score-only
methods treat it as uniform, as their papers do). ``min_keep`` is a per-layer floor on kept experts; it
defaults to the layer's ``top_k`` and may never be below it (a router cannot pick k of fewer than k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeprune.observe.stats import ExpertStats

ALLOCATIONS = ("uniform", "global", "method")
BUDGETS = ("expert_sparsity", "param_ratio", "memory_gb")
_EPS = 1e-9  # guards floor() against 0.3 * 10 = 2.9999999999999996


def layer_meta(stats: ExpertStats, key: str, layer: int, default: Any = None) -> Any:
    """``stats.meta[key][str(layer)]`` (JSON keys are strings), ``default`` when absent."""
    d = stats.meta.get(key) or {}
    v = d.get(str(layer), d.get(layer, default)) if isinstance(d, dict) else default
    return default if v is None else v


def layer_top_k(stats: ExpertStats, layer: int) -> int:
    k = layer_meta(stats, "top_k", layer)
    if k is None:
        raise ValueError(
            f"stats.meta has no top_k for layer {layer}; re-run observe (it records top_k per layer)"
        )
    return int(k)


@dataclass(frozen=True)
class Budget:
    """A ``Target`` resolved on concrete stats (all dicts keyed by MoE layer id).

    ``cost[l]`` is what keeping one expert of layer ``l`` costs in ``unit`` (1 for ``"experts"``,
    ``P_l`` parameters for ``"params"``); ``budget`` is the total cost that may be kept.
    ``uniform_keep[l]`` is the per-layer count under uniform allocation; ``total_keep`` the number of
    experts kept over all layers (``sum(uniform_keep)`` for expert targets, the most that fit in the
    budget in ascending-cost order for parameter targets). ``param_budget`` / ``total_params`` count
    routed-expert parameters (None when ``expert_params`` is not in the metadata)."""

    layers: tuple[int, ...]
    num_experts: dict[int, int]
    top_k: dict[int, int]
    floors: dict[int, int]
    cost: dict[int, float]
    unit: str
    budget: float
    uniform_keep: dict[int, int]
    total_keep: int
    param_budget: float | None = None
    total_params: float | None = None
    expert_params: dict[int, float] | None = None

    @property
    def min_cost(self) -> float:
        """Cost of keeping exactly the floors: the smallest feasible budget."""
        return sum(self.floors[li] * self.cost[li] for li in self.layers)


@dataclass(frozen=True)
class Target:
    """Pruning budget + allocation rule: exactly one of expert_sparsity / param_ratio / memory_gb."""

    expert_sparsity: float | None = None
    param_ratio: float | None = None
    memory_gb: float | None = None
    allocation: str = "uniform"
    min_keep: int | None = None

    def __post_init__(self):
        given = {k: getattr(self, k) for k in BUDGETS if getattr(self, k) is not None}
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of expert_sparsity / param_ratio / memory_gb, got {given or 'none'}"
            )
        if self.expert_sparsity is not None and not 0.0 <= self.expert_sparsity < 1.0:
            raise ValueError(
                f"expert_sparsity={self.expert_sparsity} must lie in [0, 1): it is the fraction of "
                "routed experts removed (0.5 = half)"
            )
        if self.param_ratio is not None and not 0.0 < self.param_ratio <= 1.0:
            raise ValueError(
                f"param_ratio={self.param_ratio} must lie in (0, 1]: it is the fraction of "
                "routed-expert parameters kept"
            )
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(
                f"memory_gb={self.memory_gb} must be > 0 (total weight memory in GB = 1e9 bytes)"
            )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r}; choose one of {list(ALLOCATIONS)}")
        if self.min_keep is not None and (int(self.min_keep) != self.min_keep or self.min_keep < 1):
            raise ValueError(f"min_keep={self.min_keep} must be a positive integer (it is never below top_k)")

    @property
    def kind(self) -> str:
        """Which budget is given: ``"expert_sparsity"``, ``"param_ratio"`` or ``"memory_gb"``."""
        return next(k for k in BUDGETS if getattr(self, k) is not None)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        return cls(**d)

    # ------------------------------------------------------------------ resolution
    def floors(self, stats: ExpertStats) -> dict[int, int]:
        """Per-layer minimum kept experts: ``max(top_k, min_keep)`` capped at ``E_l``."""
        out = {}
        for li in stats.moe_layers:
            k = layer_top_k(stats, li)
            if self.min_keep is not None and self.min_keep < k:
                raise ValueError(
                    f"min_keep={self.min_keep} is below top_k={k} of layer {li}; a router needs at "
                    f"least top_k experts: use min_keep >= {k} or leave it unset"
                )
            out[li] = min(max(k, self.min_keep or 0), stats.num_experts(li))
        return out

    def resolve(self, stats: ExpertStats, *, check: bool = True) -> Budget:
        """Turn the target into per-layer counts / a total budget for ``stats``; raise if infeasible.

        ``check=False`` skips the expert-count feasibility checks (for methods that remove no experts,
        e.g. TENP narrowing experts to a parameter budget)."""
        common = self._common(stats)
        if self.expert_sparsity is not None:
            budget = self._expert_budget(common)
        else:
            budget = self._param_budget(stats, common)
        if check:
            self._check_kind(budget, stats)
        return budget

    def _common(self, stats: ExpertStats) -> dict[str, Any]:
        """The per-layer facts every budget kind needs (``Budget`` fields shared by all kinds)."""
        layers = tuple(stats.moe_layers)
        if not layers:
            raise ValueError("stats hold no MoE layers")
        ep_meta = {li: layer_meta(stats, "expert_params", li) for li in layers}
        ep = {li: float(v) for li, v in ep_meta.items()} if all(v is not None for v in ep_meta.values()) else None
        ne = {li: stats.num_experts(li) for li in layers}
        return {
            "layers": layers,
            "num_experts": ne,
            "top_k": {li: layer_top_k(stats, li) for li in layers},
            "floors": self.floors(stats),
            "total_params": sum(ne[li] * ep[li] for li in layers) if ep else None,
            "expert_params": ep,
        }

    def _expert_budget(self, common: dict[str, Any]) -> Budget:
        """``expert_sparsity``: ``floor(s * E_l)`` removed per layer, the same total for every allocation."""
        layers, ne, ep = common["layers"], common["num_experts"], common["expert_params"]
        s = self.expert_sparsity
        uk = {li: ne[li] - math.floor(s * ne[li] + _EPS) for li in layers}
        total = sum(uk.values())
        return Budget(cost={li: 1.0 for li in layers}, unit="experts", budget=float(total), uniform_keep=uk,
                      total_keep=total, param_budget=sum(uk[li] * ep[li] for li in layers) if ep else None,
                      **common)

    def _param_budget(self, stats: ExpertStats, common: dict[str, Any]) -> Budget:
        """``param_ratio`` / ``memory_gb``: a routed-expert parameter budget ``b``."""
        layers, ne, floors = common["layers"], common["num_experts"], common["floors"]
        if common["expert_params"] is None and self.memory_gb is not None:
            raise ValueError("memory_gb needs stats.meta['expert_params'] (parameters per expert per layer); "
                             "re-run observe, or use expert_sparsity / param_ratio")
        # param_ratio without sizes: all experts the same size
        ep_eff = common["expert_params"] or {li: 1.0 for li in layers}
        total_p = sum(ne[li] * ep_eff[li] for li in layers)
        if self.param_ratio is not None:
            b = self.param_ratio * total_p
        else:
            other, nbytes = _memory_meta(stats)
            b = self.memory_gb * 1e9 / nbytes - other
            if b <= 0:
                raise ValueError(
                    f"memory_gb={self.memory_gb}: the non-expert weights alone take "
                    f"{other * nbytes / 1e9:.4g} GB; the smallest feasible memory_gb is "
                    f"{(other + sum(floors[li] * ep_eff[li] for li in layers)) * nbytes / 1e9:.4g}"
                )
            b = min(b, total_p)
        q = b / total_p
        uk = {li: min(ne[li], math.floor(q * ne[li] + _EPS)) for li in layers}
        total_keep, acc = 0, 0.0
        for li in sorted(layers, key=lambda li: ep_eff[li]):  # most experts that fit, cheapest first
            n = min(ne[li], int((b - acc + _EPS) // ep_eff[li]))
            total_keep, acc = total_keep + n, acc + n * ep_eff[li]
        return Budget(cost=ep_eff, unit="params", budget=b, uniform_keep=uk, total_keep=total_keep,
                      param_budget=b, **{**common, "total_params": total_p, "expert_params": ep_eff})

    def _check_kind(self, budget: Budget, stats: ExpertStats) -> None:
        """Feasibility of ``budget`` with the limit message of the given budget kind."""
        ne, floors, layers = budget.num_experts, budget.floors, budget.layers
        if self.expert_sparsity is not None:
            self._check(budget, "expert_sparsity", self.expert_sparsity,
                        lambda: min((ne[li] - floors[li]) / ne[li] for li in layers), "at most")
        elif self.param_ratio is not None:
            self._check(budget, "param_ratio", self.param_ratio,
                        lambda: max(floors[li] / ne[li] for li in layers), "at least")
        else:
            other, nbytes = _memory_meta(stats)
            total_p = budget.total_params

            def limit() -> float:
                if self.allocation == "uniform":
                    return (other + max(floors[li] / ne[li] for li in layers) * total_p) * nbytes / 1e9
                return (other + budget.min_cost) * nbytes / 1e9

            self._check(budget, "memory_gb", self.memory_gb, limit, "at least")

    def _check(self, budget: Budget, name: str, value: float, uniform_limit, word: str) -> None:
        """Raise naming the value, the minimum that keeping the floors needs, and the fix."""
        fl = budget.floors
        why = (
            f"keeping top_k experts per layer (floors {sorted(set(fl.values()))}"
            f"{', min_keep=' + str(self.min_keep) if self.min_keep else ''})"
        )
        if self.allocation == "uniform":
            bad = [li for li in budget.layers if budget.uniform_keep[li] < fl[li]]
            if bad:
                li = bad[0]
                alts = ", or allocation='global'" if budget.budget + _EPS >= budget.min_cost else ""
                alts += ", or a smaller min_keep" if self.min_keep else ""
                raise ValueError(
                    f"{name}={value} keeps {budget.uniform_keep[li]} of {budget.num_experts[li]} experts "
                    f"in layer {li} under uniform allocation, but {why} needs {fl[li]}; use {name} {word} "
                    f"{_fmt(uniform_limit(), word)}{alts}"
                )
        elif budget.budget + _EPS < budget.min_cost:
            if budget.unit == "experts":
                lim = _fmt(1 - sum(fl.values()) / sum(budget.num_experts.values()), word)
                have = f"keeps {int(budget.budget)} experts"
                need = f"{sum(fl.values())}"
            else:
                lim = _fmt(
                    budget.min_cost / budget.total_params if name == "param_ratio" else uniform_limit(), word
                )
                have = f"keeps {budget.budget:.4g} routed-expert parameters"
                need = f"{budget.min_cost:.4g}"
            raise ValueError(
                f"{name}={value} {have} in total, but {why} needs {need}; use {name} {word} {lim}"
            )


def _memory_meta(stats: ExpertStats) -> tuple[float, float]:
    """``(other_params, dtype_bytes)`` from the stats meta, which ``memory_gb`` needs."""
    missing = [k for k in ("other_params", "dtype_bytes") if stats.meta.get(k) is None]
    if missing:
        raise ValueError(f"memory_gb needs stats.meta {missing}; re-run observe or use param_ratio")
    return float(stats.meta["other_params"]), float(stats.meta["dtype_bytes"])


def _fmt(x: float, word: str) -> str:
    """Round the feasibility limit to 4 significant digits in the safe direction for the message."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    scale = 10.0 ** (math.floor(math.log10(abs(x))) - 3)
    v = round(x / scale, 6)  # absorb float noise (0.75 / 1e-4 = 7499.999...) before rounding outwards
    return f"{(math.floor(v) if word == 'at most' else math.ceil(v)) * scale:.4g}"
