"""The unified scoring family of "How to Score Experts for One-Shot MoE Expert Pruning" (arXiv 2606.15716).

    S_j(b, alpha, beta) = (1 / N_j^b) * sum_{t : j in topk(t)} g_{j,t}^alpha * ||f_j(x_t)||_2^beta

over routed (top-k), non-padding calibration tokens; ``g`` is the gate weight the model actually applied
(after top-k renormalisation / routed scaling), ``f_j`` the un-gated expert output, ``N_j`` the routed
count. The sum is read from one saved accumulator, so exactly these ``(alpha, beta)`` are supported:

    (0,0) count   (1,0) gate_sum   (0,1) norm_sum   (0,2) norm_sq_sum   (1,1) gate_norm_sum
    (2,2) gate_norm_sq_sum

``b`` is any real >= 0 (0 = sum, 1 = mean over routed tokens). An expert never routed (``N_j = 0``) scores
0 whatever ``b`` (its sum is 0; we define 0 / 0^b = 0), so it is pruned first.

Named members (own registered methods): frequency (0,0,0), soft_frequency (0,1,0) (SEER-MoE soft
counting), ean (0,0,1), reap (1,1,1), man (1,0,1), msan (1,0,2), gated_ean_sum (0,1,1),
squared_gated_sum (0,2,2); ``unified`` takes a user triple. The paper's principle: task-agnostic
calibration -> MAN / MSAN; task-specific -> (0,1,1) / (0,2,2).

Optional REAP super-expert guard (REAP code, ``preserve_super_experts``): threshold
``tau = max(quantile_q(max_act of all experts of all layers), max(max_act) / 10)`` with q = 0.995; experts
with ``max_act > tau`` score ``+inf`` (always kept) in the first ``guard_layer_frac`` (75 %) of MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from moeprune.methods.registry import MethodConfig, register_method

if TYPE_CHECKING:
    from moeprune.observe.stats import ExpertStats

# (alpha, beta) -> accumulator holding sum_t g^alpha ||f||^beta over routed tokens
ACCUMULATORS: dict[tuple[int, int], str] = {
    (0, 0): "count",
    (1, 0): "gate_sum",
    (0, 1): "norm_sum",
    (0, 2): "norm_sq_sum",
    (1, 1): "gate_norm_sum",
    (2, 2): "gate_norm_sq_sum",
}


def _accumulator(alpha: float, beta: float) -> str:
    key = (int(alpha), int(beta))
    if key != (alpha, beta) or key not in ACCUMULATORS:
        ok = ", ".join(f"(alpha={a}, beta={b})" for a, b in ACCUMULATORS)
        raise ValueError(
            f"(alpha={alpha}, beta={beta}) cannot be computed from the saved routed statistics; "
            f"supported: {ok}. Pick one of these (b is free)"
        )
    return ACCUMULATORS[key]


def unified_score(stats: ExpertStats, b: float, alpha: float, beta: float) -> dict[int, torch.Tensor]:
    """``{layer: S(b, alpha, beta) [E]}`` (float64)."""
    if b < 0:
        raise ValueError(f"b={b} must be >= 0 (0: sum over routed tokens, 1: mean)")
    name = _accumulator(alpha, beta)
    out = {}
    for li in stats.moe_layers:
        total = stats.get(li, name).double()  # [E] sum_t g^alpha ||f||^beta
        if b == 0:
            out[li] = total.clone()
            continue
        n = stats.get(li, "count").double()  # [E] N_j
        out[li] = torch.where(n > 0, total / n.clamp_min(1e-300) ** b, torch.zeros_like(total))
    return out


def super_expert_mask(
    stats: ExpertStats, quantile: float = 0.995, layer_frac: float = 0.75
) -> dict[int, torch.Tensor]:
    """REAP's super experts: ``max_act`` above ``max(quantile over all experts, global max / 10)``."""
    layers = stats.moe_layers
    acts = {li: stats.get(li, "max_act").double() for li in layers}
    allv = torch.cat(list(acts.values()))
    tau = max(float(torch.quantile(allv, quantile)), float(allv.max()) / 10)
    n_guard = int(len(layers) * layer_frac)
    return {
        li: (acts[li] > tau) if i < n_guard else torch.zeros_like(acts[li], dtype=torch.bool)
        for i, li in enumerate(layers)
    }


@dataclass(frozen=True)
class _UnifiedBase(MethodConfig):
    """Shared scoring: the triple comes from ``triple()``; optional REAP super-expert guard."""

    preserve_super_experts: bool = False
    guard_quantile: float = 0.995
    guard_layer_frac: float = 0.75

    needs: ClassVar[tuple[str, ...]] = ("routed",)
    TRIPLE: ClassVar[tuple[float, float, float]] = (1, 1, 1)

    def triple(self) -> tuple[float, float, float]:
        return self.TRIPLE

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        scores = unified_score(stats, *self.triple())
        if self.preserve_super_experts:
            for li, m in super_expert_mask(stats, self.guard_quantile, self.guard_layer_frac).items():
                scores[li] = torch.where(m, torch.full_like(scores[li], float("inf")), scores[li])
        return scores


@register_method("frequency")
@dataclass(frozen=True)
class Frequency(_UnifiedBase):
    """N_j: routed-token count (SEER-MoE heavy hitters)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (0, 0, 0)


@register_method("soft_frequency")
@dataclass(frozen=True)
class SoftFrequency(_UnifiedBase):
    """Sum of gates over routed tokens (SEER-MoE soft counting)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (0, 1, 0)


@register_method("ean")
@dataclass(frozen=True)
class EAN(_UnifiedBase):
    """Expert activation norm: sum over routed tokens of ||f|| (arXiv 2504.05586)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (0, 0, 1)


@register_method("reap")
@dataclass(frozen=True)
class REAP(_UnifiedBase):
    """REAP: mean over routed tokens of g * ||f|| (arXiv 2510.13999)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (1, 1, 1)


@register_method("man")
@dataclass(frozen=True)
class MAN(_UnifiedBase):
    """Mean activation norm: mean over routed tokens of ||f|| (task-agnostic pick)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (1, 0, 1)


@register_method("msan")
@dataclass(frozen=True)
class MSAN(_UnifiedBase):
    """Mean squared activation norm: mean over routed tokens of ||f||^2 (task-agnostic pick)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (1, 0, 2)


@register_method("gated_ean_sum")
@dataclass(frozen=True)
class GatedEANSum(_UnifiedBase):
    """Sum over routed tokens of g * ||f|| (task-specific pick)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (0, 1, 1)


@register_method("squared_gated_sum")
@dataclass(frozen=True)
class SquaredGatedSum(_UnifiedBase):
    """Sum over routed tokens of (g * ||f||)^2 (task-specific pick)."""

    TRIPLE: ClassVar[tuple[float, float, float]] = (0, 2, 2)


@register_method("unified")
@dataclass(frozen=True)
class Unified(_UnifiedBase):
    """Any member S(b, alpha, beta) of the family; (alpha, beta) must map to a saved accumulator."""

    b: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self):
        _accumulator(self.alpha, self.beta)  # fail at construction, not after observe
        if self.b < 0:
            raise ValueError(f"b={self.b} must be >= 0 (0: sum over routed tokens, 1: mean)")

    def triple(self) -> tuple[float, float, float]:
        return (self.b, self.alpha, self.beta)
