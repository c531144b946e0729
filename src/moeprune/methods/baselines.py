"""Baselines: random and EASY-EP (Dong et al., NeurIPS 2025, arXiv 2504.06792); NAEE lives in ``naee.py``.

* ``random``: seeded uniform scores; with ``allocation="global"`` the raw scores are compared directly
  (``normalize="none"``), so every expert of every layer is equally likely to go.
* ``easyep``: ``sum_t g * ||f|| * max(1 - cos(h_t, h_t + r_t), 0)`` over routed tokens (``easyep_sum``;
  ``h_t`` the residual stream before the block, ``r_t`` the routed output), highest kept per layer
  (the paper keeps the same count in every layer; global allocation is available too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from moeprune.methods.allocation import plan_from_scores
from moeprune.methods.registry import MethodConfig, register_method

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan


@register_method("random")
@dataclass(frozen=True)
class Random(MethodConfig):
    """Uniformly random expert choice (seeded); the lower bound every method must beat."""

    seed: int = 0

    needs: ClassVar[tuple[str, ...]] = ()

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {
            li: torch.rand(stats.num_experts(li), generator=gen, dtype=torch.float64)
            for li in stats.moe_layers
        }

    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        return plan_from_scores(
            stats, self.score(stats), target, method=self.name, method_config=self.to_dict(), normalize="none"
        )


@register_method("easyep")
@dataclass(frozen=True)
class EasyEP(MethodConfig):
    """EASY-EP: gate x output norm x residual direction change, summed over routed tokens."""

    needs: ClassVar[tuple[str, ...]] = ("routed", "direction")

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        return {li: stats.get(li, "easyep_sum").double().clone() for li in stats.moe_layers}
