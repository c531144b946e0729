"""Baselines: random and EASY-EP (Dong et al., NeurIPS 2025, arXiv 2504.06792); NAEE lives in ``naee.py``.

* ``random``: seeded uniform scores; with ``allocation="global"`` the raw scores are compared directly
  (``normalize="none"``), so every expert of every layer is equally likely to go.
* ``easyep``: ``sum_t g * ||f|| * max(1 - cos(h_t, h_t + r_t), 0)`` over routed tokens (``easyep_sum``;
  ``g`` the model's top-k routing weight, ``h_t`` the residual stream before the block, ``r_t`` the routed
  output without shared experts), highest kept per layer, as RUCAIBox/EASYEP @7324eb1
  ``pruning/expert_selection.py`` (global allocation is available too). The reference scores the 25
  longest of its seeded-shuffled samples; moeprune scores every calibration sample it is given (choose
  the samples in the calibration config). Group-limited routers: see ``EasyEP.groups``.
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
    """EASY-EP: gate x output norm x residual direction change, summed over routed tokens.

    ``groups``: ``"balance"`` (default) keeps a router-group-balanced set on group-limited routers (the
    plain top-k of the reference usually leaves unequal groups, which ``apply`` can only realise by
    changing the routing to n_group=1); ``"ignore"`` is the reference's plain per-layer top-k everywhere.
    Both are the same on routers without groups."""

    groups: str = "balance"

    needs: ClassVar[tuple[str, ...]] = ("routed", "direction")

    def __post_init__(self):
        if self.groups not in ("balance", "ignore"):
            raise ValueError(f"groups={self.groups!r}; choose 'balance' or 'ignore' (the reference's plain top-k)")

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        return {li: stats.get(li, "easyep_sum").double().clone() for li in stats.moe_layers}

    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        return plan_from_scores(
            stats, self.score(stats), target, method=self.name, method_config=self.to_dict(), groups=self.groups
        )
