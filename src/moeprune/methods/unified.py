"""The unified scoring family of "How to Score Experts for One-Shot MoE Expert Pruning" (arXiv 2606.15716).

    S_j(b, alpha, beta) = (1 / N_j^b) * sum_{t : j in topk(t)} g_{j,t}^alpha * ||f_j(x_t)||_2^beta

over routed (top-k), non-padding calibration tokens; ``f_j`` is the un-gated expert output and ``N_j`` the
routed count. The sum is read from one saved accumulator, so exactly these ``(alpha, beta)`` are supported:

    (0,0) count   (1,0) gate_sum   (0,1) norm_sum   (0,2) norm_sq_sum   (1,1) gate_norm_sum
    (2,2) gate_norm_sq_sum

``b`` is any real >= 0 (0 = sum, 1 = mean over routed tokens). An expert never routed (``N_j = 0``) scores
0 whatever ``b`` (its sum is 0; we define 0 / 0^b = 0), so it is pruned first.

Gate ``g`` (``gate`` option, only matters for alpha > 0). Default ``"reference"``: the convention of REAP's
observer (CerebrasResearch/reap ``pruning_metrics.update_pruning_state``), which the How-to-Score code is
built on: ``q = softmax(raw router logits)`` over ALL experts (even for sigmoid routers), divided by the sum
of q over the token's routed experts only when the model config sets ``norm_topk_prob`` (Mixtral has no
such field: no renormalisation). ``"applied"``: the gate the model actually applied (after its own top-k
renormalisation / routed scaling). ``"softmax"`` / ``"renorm"`` force one of the two reference variants.

Named members: one table (``MEMBERS``) registered in a loop; ``unified`` takes a user triple. The paper's
principle: task-agnostic calibration -> MAN / MSAN; task-specific -> (0,1,1) / (0,2,2).

Optional REAP super-expert guard (REAP ``get_super_expert_indices``): ``tau = max(quantile_q(a over all
experts of all layers), max(a) / 10)`` with q = 0.995; experts with ``a > tau`` score ``+inf`` (always kept)
in the first ``guard_layer_frac`` (75 %) of MoE layers. ``a`` (``guard_stat``): ``"signed"`` (default, REAP's
``max_activations``: max element of f over routed tokens, floored at 0) or ``"abs"`` (max |f_i|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from moeprune.methods.registry import MethodConfig, register_method

if TYPE_CHECKING:
    from moeprune.observe.stats import ExpertStats

# (alpha, beta) -> accumulator holding sum_t g^alpha ||f||^beta over routed tokens (applied-gate names)
ACCUMULATORS: dict[tuple[int, int], str] = {
    (0, 0): "count",
    (1, 0): "gate_sum",
    (0, 1): "norm_sum",
    (0, 2): "norm_sq_sum",
    (1, 1): "gate_norm_sum",
    (2, 2): "gate_norm_sq_sum",
}
GATES = ("reference", "applied", "softmax", "renorm")
# gate convention -> prefix replacing "gate" in the gate-using accumulator names (observe/stats.py SCHEMA)
GATE_PREFIX = {"applied": "gate", "softmax": "softmax_gate", "renorm": "renorm_gate"}
GUARD_STATS = {"signed": "max_act_signed", "abs": "max_act"}


def _accumulator(alpha: float, beta: float) -> str:
    key = (int(alpha), int(beta))
    if key != (alpha, beta) or key not in ACCUMULATORS:
        ok = ", ".join(f"(alpha={a}, beta={b})" for a, b in ACCUMULATORS)
        raise ValueError(
            f"(alpha={alpha}, beta={beta}) cannot be computed from the saved routed statistics; "
            f"supported: {ok}. Pick one of these (b is free)"
        )
    return ACCUMULATORS[key]


def resolve_gate(stats: ExpertStats, gate: str) -> str:
    """``reference`` -> ``renorm`` iff the observed model's config set ``norm_topk_prob``, else ``softmax``."""
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is not one of {GATES}")
    if gate != "reference":
        return gate
    flag = stats.meta.get("norm_topk_prob")
    if flag is None:
        raise ValueError(
            "gate='reference' needs meta['norm_topk_prob'] (recorded by observe since the reference-gate "
            "statistics were added); re-run observe, or pick gate='applied', 'softmax' or 'renorm'"
        )
    return "renorm" if flag else "softmax"


def accumulator_name(stats: ExpertStats, alpha: float, beta: float, gate: str = "reference") -> str:
    """The saved statistic holding ``sum_t g^alpha ||f||^beta`` under gate convention ``gate``."""
    name = _accumulator(alpha, beta)
    if alpha == 0:
        return name  # gate-free member: every convention reads the same sum
    return name.replace("gate", GATE_PREFIX[resolve_gate(stats, gate)], 1)


def unified_score(
    stats: ExpertStats, b: float, alpha: float, beta: float, gate: str = "reference"
) -> dict[int, torch.Tensor]:
    """``{layer: S(b, alpha, beta) [E]}`` (float64)."""
    if b < 0:
        raise ValueError(f"b={b} must be >= 0 (0: sum over routed tokens, 1: mean)")
    name = accumulator_name(stats, alpha, beta, gate)
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
    stats: ExpertStats, quantile: float = 0.995, layer_frac: float = 0.75, stat: str = "signed"
) -> dict[int, torch.Tensor]:
    """REAP's super experts: max activation above ``max(quantile over all experts, global max / 10)``."""
    if stat not in GUARD_STATS:
        raise ValueError(f"guard_stat={stat!r} is not one of {tuple(GUARD_STATS)}")
    layers = stats.moe_layers
    acts = {li: stats.get(li, GUARD_STATS[stat]).double() for li in layers}  # [E] per layer
    allv = torch.cat(list(acts.values()))
    tau = max(float(torch.quantile(allv, quantile)), float(allv.max()) / 10)
    n_guard = int(len(layers) * layer_frac)
    return {
        li: (acts[li] > tau) if i < n_guard else torch.zeros_like(acts[li], dtype=torch.bool)
        for i, li in enumerate(layers)
    }


@dataclass(frozen=True)
class _UnifiedBase(MethodConfig):
    """Shared scoring: the triple comes from ``triple()``; gate convention; optional super-expert guard."""

    gate: str = "reference"
    preserve_super_experts: bool = False
    guard_stat: str = "signed"
    guard_quantile: float = 0.995
    guard_layer_frac: float = 0.75

    needs: ClassVar[tuple[str, ...]] = ("routed",)
    TRIPLE: ClassVar[tuple[float, float, float]] = (1, 1, 1)

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} is not one of {GATES} ('reference': REAP's softmax gate, "
                             "'applied': the gate the model applied)")
        if self.guard_stat not in GUARD_STATS:
            raise ValueError(f"guard_stat={self.guard_stat!r} is not one of {tuple(GUARD_STATS)} "
                             "('signed': REAP's max element floored at 0, 'abs': max |f_i|)")

    def triple(self) -> tuple[float, float, float]:
        return self.TRIPLE

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        scores = unified_score(stats, *self.triple(), gate=self.gate)
        if self.preserve_super_experts:
            mask = super_expert_mask(stats, self.guard_quantile, self.guard_layer_frac, self.guard_stat)
            for li, m in mask.items():
                scores[li] = torch.where(m, torch.full_like(scores[li], float("inf")), scores[li])
        return scores


# (registered name, class name, (b, alpha, beta), description): one row per named member
MEMBERS: tuple[tuple[str, str, tuple[float, float, float], str], ...] = (
    ("frequency", "Frequency", (0, 0, 0), "N_j: routed-token count (SEER-MoE heavy hitters)."),
    ("soft_frequency", "SoftFrequency", (0, 1, 0), "Sum of gates over routed tokens (SEER-MoE soft counting)."),
    ("ean", "EAN", (0, 0, 1), "Expert activation norm: sum over routed tokens of ||f|| (arXiv 2504.05586)."),
    ("reap", "REAP", (1, 1, 1), "REAP: mean over routed tokens of g * ||f|| (arXiv 2510.13999)."),
    ("man", "MAN", (1, 0, 1), "Mean activation norm: mean over routed tokens of ||f|| (task-agnostic pick)."),
    ("msan", "MSAN", (1, 0, 2),
     "Mean squared activation norm: mean over routed tokens of ||f||^2 (task-agnostic pick)."),
    ("gated_ean_sum", "GatedEANSum", (0, 1, 1), "Sum over routed tokens of g * ||f|| (task-specific pick)."),
    ("squared_gated_sum", "SquaredGatedSum", (0, 2, 2),
     "Sum over routed tokens of (g * ||f||)^2 (task-specific pick)."),
)


def _member(name: str, cls_name: str, triple: tuple[float, float, float], doc: str) -> type[_UnifiedBase]:
    """A frozen config class for one fixed triple, registered under ``name``."""
    body = {"__doc__": doc, "__module__": __name__, "__qualname__": cls_name, "TRIPLE": triple,
            "__annotations__": {}}
    return register_method(name)(dataclass(frozen=True)(type(cls_name, (_UnifiedBase,), body)))


for _row in MEMBERS:
    globals()[_row[1]] = _member(*_row)


@register_method("unified")
@dataclass(frozen=True)
class Unified(_UnifiedBase):
    """Any member S(b, alpha, beta) of the family; (alpha, beta) must map to a saved accumulator."""

    b: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _accumulator(self.alpha, self.beta)  # fail at construction, not after observe
        if self.b < 0:
            raise ValueError(f"b={self.b} must be >= 0 (0: sum over routed tokens, 1: mean)")

    def triple(self) -> tuple[float, float, float]:
        return (self.b, self.alpha, self.beta)
