"""TENP: Trapezoidal Expert Neuron Pruning (He, Zhu, Xiong, Findings of ACL 2026, arXiv 2606.09885).

No public code exists; this follows the paper summary (dossier section 4) and fixes its unknowns as follows.

1. **Expert importance** ``I_j = sum_{t routed to j} g * ||f|| * (1 - cos(x_t, f))`` (``gate_norm_dir_sum``,
   cosine between the expert's input and its own output, as summarised), or EASY-EP's residual-stream
   variant ``easyep_sum`` (``importance="easyep"``).
2. **Trapezoid.** MoE layer ``i`` of ``L`` (0-based, model order) keeps the ``n_i`` most important experts at
   full width, ``n_i = clamp(floor(E_i * (full_start + (full_end - full_start) * i/(L-1)) + 1/2), 0, E_i)``
   (``i / (L - 1) := 1/2`` when ``L = 1``): few in shallow layers, more in deep ones, a linear ramp.
3. **Width.** Every other expert is narrowed to ``k_i`` of its ``I_i`` channels. With ``P_i`` parameters per
   expert and ``c_i = P_i / I_i`` per channel, the budget ``B`` (routed-expert parameters) must satisfy
   ``sum_i [n_i + (E_i - n_i) * w] * P_i = B``, i.e. ``p_i + (1 - p_i) * w = E_i`` per layer in the paper's
   notation with one width ratio ``w`` shared by all layers (``width="global"``: retained capacity then
   grows with depth -- the trapezoid), or per layer ``w_i = (r * E_i - n_i) / (E_i - n_i)`` for
   ``r = B / total`` (``width="layer"``). ``k_i = floor(w * I_i / m) * m`` (``m = channel_multiple``, at
   least ``min_channels``); the leftover budget then widens whole layers by ``m`` channels, deepest
   first, while it fits. So the kept parameters are ``<= B`` and short of it by less than ``m``
   channels per narrowed expert of some layer.
4. **Expert-neuron pruning (ENP).** Channel ``k`` of expert ``j`` is ranked by its projection onto the
   expert output, ``sum_t a_{t,k} <W_down[:, k], f> / ||f||`` over routed tokens (``neuron_proj_sum``; the
   sum ranks like the paper's token mean); ``neuron_score="l2"`` is the ENP-L2 ablation
   (``sum_t |a_{t,k}| * ||W_down[:, k]||``). The top ``k_i`` channels are kept (ties: lower channel id).

Storage caveat: ``B`` counts ragged storage (each expert at its own width), as the paper does. Fused
expert tensors (transformers 5.x, ``apply``) keep one width per layer, so narrowed experts of a layer
that has a full-width expert are padded back (dead channels) and save nothing there;
``plan.meta["params_padded"]`` is that fused-layout count. ``full_start = full_end = 0`` gives the
paper's uniform-width ENP variant, whose savings any layout realises. ``apply`` also rounds a layer's
width up to a multiple of 8 channels (``apply.neurons.ALIGN``: grouped_mm needs 16-byte aligned rows),
so the default ``channel_multiple=8`` plans widths that are stored exactly; ``channel_multiple=1`` is
the paper's per-channel granularity (its odd widths are padded with dead channels when applied).
Parameters per channel are ``P / I`` (the router row, which does not shrink, is spread over the
channels: a slight over-count of the saving).

Targets: ``param_ratio`` / ``memory_gb`` give ``B``; all experts stay routable (the paper's point: no
expert is removed, only narrowed). ``expert_sparsity`` asks for expert removal, so TENP then removes
experts by importance (uniform or global allocation, no neuron pruning) and logs that
``param_ratio = 1 - s`` is the paper's setting. ``allocation`` is otherwise ignored (the trapezoid decides).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from moeprune.methods.allocation import build_plan, plan_from_scores, ranked
from moeprune.methods.registry import MethodConfig, register_method
from moeprune.methods.target import layer_meta

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan

logger = logging.getLogger(__name__)


def trapezoid(num_experts: list[int], full_start: float, full_end: float) -> list[int]:
    """Full-width expert count per MoE layer (model order): linear ramp ``full_start`` -> ``full_end``."""
    L = len(num_experts)
    out = []
    for i, E in enumerate(num_experts):
        x = 0.5 if L == 1 else i / (L - 1)
        out.append(min(E, max(0, math.floor(E * (full_start + (full_end - full_start) * x) + 0.5))))
    return out


@register_method("tenp")
@dataclass(frozen=True)
class TENP(MethodConfig):
    """Important experts at full width (more in deeper layers), the rest narrowed by neuron importance.
    Narrowed widths are multiples of ``channel_multiple`` (default 8: what ``apply`` stores)."""

    importance: str = "tenp"
    neuron_score: str = "proj"
    full_start: float = 0.1
    full_end: float = 0.4
    width: str = "global"
    min_channels: int = 1
    channel_multiple: int = 8  # apply.neurons.ALIGN: planned widths are stored as is

    needs: ClassVar[tuple[str, ...]] = ("routed", "direction", "neurons")

    def __post_init__(self):
        if self.importance not in ("tenp", "easyep"):
            raise ValueError(f"importance={self.importance!r}; choose 'tenp' (gate_norm_dir_sum) or 'easyep'")
        if self.neuron_score not in ("proj", "l2"):
            raise ValueError(f"neuron_score={self.neuron_score!r}; choose 'proj' (ENP) or 'l2' (ENP-L2)")
        if self.width not in ("global", "layer"):
            raise ValueError(f"width={self.width!r}; choose 'global' or 'layer'")
        for name in ("full_start", "full_end"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must be a fraction of experts in [0, 1]")
        if self.min_channels < 1 or self.channel_multiple < 1:
            raise ValueError(
                f"min_channels={self.min_channels} and channel_multiple={self.channel_multiple} must be >= 1"
            )

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        name = "gate_norm_dir_sum" if self.importance == "tenp" else "easyep_sum"
        return {li: stats.get(li, name).double().clone() for li in stats.moe_layers}

    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        scores = self.score(stats)
        if target.expert_sparsity is not None:
            logger.warning(
                "tenp with expert_sparsity=%s removes experts by TENP importance without neuron "
                "pruning; the paper's setting is param_ratio=%s",
                target.expert_sparsity,
                1 - target.expert_sparsity,
            )
            return plan_from_scores(stats, scores, target, method=self.name, method_config=self.to_dict())
        budget = target.resolve(stats, check=False)  # no expert is removed: floors hold
        layers = list(budget.layers)
        ne, P = budget.num_experts, budget.cost
        inter = {li: int(layer_meta(stats, "intermediate_size", li, 0)) for li in layers}
        missing = [li for li in layers if inter[li] <= 0]
        if missing:
            raise ValueError(
                f"tenp needs stats.meta['intermediate_size'] for layers {missing}; re-run observe"
            )
        full = dict(zip(layers, trapezoid([ne[li] for li in layers], self.full_start, self.full_end)))
        B, total = budget.budget, sum(ne[li] * P[li] for li in layers)
        width = self._widths(layers, ne, P, inter, full, B, total)
        nscore = "neuron_proj_sum" if self.neuron_score == "proj" else "neuron_l2_sum"
        neurons, widths = {}, {}
        for li in layers:
            order = ranked(scores[li])
            narrow = order[full[li] :]
            k = width[li]
            widths[str(li)] = k
            if k >= inter[li] or not narrow:
                continue
            ns = stats.get(li, nscore).double()  # [E, I]
            neurons[li] = {e: sorted(ranked(ns[e])[:k]) for e in narrow}
        kept = sum((full[li] + (ne[li] - full[li]) * width[li] / inter[li]) * P[li] for li in layers)
        # fused [E, I, H] tensors hold one width per layer: narrowed experts are padded to the widest
        padded = sum(ne[li] * P[li] * (1.0 if full[li] else width[li] / inter[li]) for li in layers)
        keep = {li: list(range(ne[li])) for li in layers}
        meta = {
            "allocation": "trapezoid",
            "full_width": {str(li): full[li] for li in layers},
            "channels": widths,
            "param_budget": B,
            "params_kept": kept,
            "params_padded": padded,
        }
        return build_plan(
            stats,
            keep,
            target,
            method=self.name,
            method_config=self.to_dict(),
            scores=scores,
            neurons=neurons,
            meta=meta,
        )

    def _widths(self, layers, ne, P, inter, full, B, total) -> dict[int, int]:
        """Channels kept per narrowed expert, per layer (uniform within a layer), spending at most ``B``."""
        full_cost = sum(full[li] * P[li] for li in layers)
        narrow_cost = {li: (ne[li] - full[li]) * P[li] for li in layers}
        if full_cost > B + 1e-6:
            raise ValueError(
                f"tenp: the full-width experts alone need {full_cost:.4g} parameters but the target "
                f"allows {B:.4g}; lower full_start/full_end (now {self.full_start}/{self.full_end}) "
                "or raise the budget"
            )
        if self.width == "global":
            denom = sum(narrow_cost.values())
            w = {li: (B - full_cost) / denom if denom else 1.0 for li in layers}
        else:
            r = B / total
            w = {}
            for li in layers:
                if full[li] > r * ne[li] + 1e-9:
                    raise ValueError(
                        f"tenp width='layer': layer {li} keeps {full[li]} full-width experts, more than "
                        f"its share {r * ne[li]:.3g}; lower full_end or use width='global'"
                    )
                w[li] = (r * ne[li] - full[li]) / (ne[li] - full[li]) if ne[li] > full[li] else 1.0
        m = self.channel_multiple
        k = {li: min(inter[li], math.floor(w[li] * inter[li] / m + 1e-9) * m) for li in layers}
        low = [li for li in layers if k[li] < self.min_channels and ne[li] > full[li]]
        if low:
            raise ValueError(
                f"tenp: the budget leaves narrowed experts of layers {low} fewer than min_channels="
                f"{self.min_channels} channels (widths are multiples of channel_multiple={m}); raise the "
                "budget, lower full_start/full_end or lower channel_multiple"
            )
        per_ch = {li: (ne[li] - full[li]) * P[li] / inter[li] for li in layers}  # cost of +1 channel
        spent = full_cost + sum(k[li] * per_ch[li] for li in layers)
        grown = True
        while grown:  # spend the rounding leftover, deepest layers first
            grown = False
            for li in reversed(layers):
                step = min(m, inter[li] - k[li])
                if step > 0 and per_ch[li] > 0 and spent + step * per_ch[li] <= B + 1e-6:
                    k[li] += step
                    spent += step * per_ch[li]
                    grown = True
        return k
