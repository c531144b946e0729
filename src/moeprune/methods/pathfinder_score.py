"""MoE Pathfinder's per-sample, per-layer scoring: IQR outliers and expert importance (node weights).

Pure functions of one layer's statistics of one calibration sample; ``pathfinder`` builds the path
graph from them. Reference: xicyang/MoE-Pruning@121e214, ``pruning/moe_prune/pruning/path_search.py``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moeprune.observe.stats import ExpertStats

GUARD = 1e-10  # the reference code's log guard: log(w + 1e-10)
SUM_FLOOR = 1e-10  # the reference code's clamp of the importance denominator: max(sum exp(-L / tau), 1e-10)
IMPORTANCES = ("reference", "stable_softmax")
L_NORMS = (None, "relative", "rms")


def iqr_outliers(loss: torch.Tensor, norm: torch.Tensor, loss_mult: float = 3.0, norm_mult: float = 3.0,
                 min_values: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(force_keep [E], force_remove [E])`` of one layer and sample by the reference IQR rule.

    Bounds ``Q1 - k IQR, Q3 + k IQR`` with linearly interpolated quartiles, only with ``>= min_values``
    values and ``IQR > 1e-12``. Loss below / norm above the bounds keeps, loss above / norm below removes;
    an expert marked both ways is kept."""
    keep = torch.zeros(loss.numel(), dtype=torch.bool)
    remove = torch.zeros_like(keep)
    for vals, mult, low_keeps in ((loss, loss_mult, True), (norm, norm_mult, False)):
        v = vals.to(torch.float64)
        if v.numel() < max(min_values, 4):
            continue
        q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
        if q3 - q1 <= 1e-12:
            continue
        lo, hi = v < q1 - mult * (q3 - q1), v > q3 + mult * (q3 - q1)
        keep |= lo if low_keeps else hi
        remove |= hi if low_keeps else lo
    return keep, remove & ~keep


def node_importance(loss: torch.Tensor, enabled: torch.Tensor, tau: float,
                    mode: str = "reference") -> torch.Tensor:
    """Expert node weights ``e [E]`` of one layer and sample; disabled experts weigh 0.

    ``"reference"``: the code's ``exp(-L / tau) / max(sum_enabled exp(-L / tau), 1e-10)`` in float64
    without max subtraction (it underflows for large ``L``: then every enabled expert gets the same
    ``log(e + 1e-10)``). ``"stable_softmax"``: ``softmax(-L / tau)`` over the enabled experts."""
    if mode not in IMPORTANCES:
        raise ValueError(f"importance={mode!r}; choose one of {list(IMPORTANCES)}")
    if not bool(enabled.any()):
        return torch.zeros_like(loss, dtype=torch.float64)
    z = -loss.to(torch.float64) / tau  # [E]
    if mode == "stable_softmax":
        return torch.softmax(z.masked_fill(~enabled, float("-inf")), 0)
    ex = torch.exp(z).masked_fill(~enabled, 0.0)  # [E], 0 once L / tau > ~745
    return ex / ex.sum().clamp_min(SUM_FLOOR)


def normalised_loss(stats: ExpertStats, layer: int, s: int, mode: str | None) -> torch.Tensor:
    """``L [E]`` of sample ``s`` rescaled for the importance term (``mode=None``: as observed).

    ``"relative"``: ``L / ||Y||_F`` (``Y`` the routed block output): a dimensionless relative error,
    invariant to tokens, hidden size and the output scale of the model and layer, so one ``tau`` means
    the same thing everywhere (``tau = 0.1``: 10 % more relative error costs 1 nat). ``"rms"``:
    ``L / sqrt(T H)``, the per-element RMS error: invariant to ``T`` and ``H`` but still in the units of
    the layer's output (its scale differs across models and layers); needs no extra statistic."""
    loss = stats.get(layer, "sample_recon_loss")[s].to(torch.float64)
    if mode is None:
        return loss
    if mode == "relative":
        if "sample_out_norm" not in stats.layers[layer]:
            raise KeyError(f"l_norm='relative' needs statistic 'sample_out_norm' (layer {layer}), written "
                           "by observe since it was added; re-run observe with feature 'paths', or use "
                           "l_norm='rms'")
        den = float(stats.get(layer, "sample_out_norm")[s])
    else:
        hidden = stats.meta.get("hidden_size")
        if not hidden:
            raise ValueError("l_norm='rms' needs stats.meta['hidden_size']; re-run observe or set it")
        den = math.sqrt(float(stats.get(layer, "sample_tokens")[s]) * float(hidden))
    return loss / max(den, 1e-30)
