"""Synthetic ``ExpertStats`` for method tests: hand-written numbers, full metadata."""

from __future__ import annotations

from typing import Any

import torch

from moeprune.observe.stats import ExpertStats


def make_stats(
    layers: dict[int, dict[str, Any]],
    *,
    top_k: int | dict[int, int] = 2,
    num_experts: int | dict[int, int] | None = None,
    expert_params: float | dict[int, float] = 100,
    intermediate_size: int | dict[int, int] = 10,
    n_group: dict[int, list[int]] | None = None,
    router: dict[str, Any] | None = None,
    other_params: float = 1000,
    dtype_bytes: int = 2,
    **meta,
) -> ExpertStats:
    """``layers = {layer: {stat name: values}}``; values become float64 tensors.

    ``num_experts`` defaults to the length of the layer's ``count`` (or first 1-D statistic)."""

    def per(v, li):
        return v[li] if isinstance(v, dict) else v

    data = {
        li: {k: torch.as_tensor(v, dtype=torch.float64) for k, v in d.items()} for li, d in layers.items()
    }
    ne = {}
    for li, d in data.items():
        n = per(num_experts, li)
        if n is None:
            t = d.get("count", next(iter(d.values())))
            n = t.shape[1] if t.dim() > 1 and "count" not in d else t.shape[0]
        ne[li] = int(n)
    m = {
        "model_type": "synthetic",
        "moe_layers": sorted(data),
        "num_experts": {str(li): ne[li] for li in data},
        "top_k": {str(li): int(per(top_k, li)) for li in data},
        "intermediate_size": {str(li): int(per(intermediate_size, li)) for li in data},
        "expert_params": {str(li): per(expert_params, li) for li in data},
        "other_params": other_params,
        "dtype_bytes": dtype_bytes,
        "hidden_size": 4,
        "router": {
            str(li): dict(router or {"score": "softmax", "renormalize": True, "scale": 1.0}) for li in data
        },
    }
    if n_group:
        m["n_group"] = {str(li): list(v) for li, v in n_group.items()}
    m.update(meta)
    return ExpertStats(layers=data, meta=m)


def routed_from_tokens(tokens: list[list[tuple[float, float]]]) -> dict[str, list[float]]:
    """Per-expert lists of routed (g, ||f||) pairs -> the six routed accumulators (the naive sums)."""
    acc = {
        k: [] for k in ("count", "gate_sum", "norm_sum", "norm_sq_sum", "gate_norm_sum", "gate_norm_sq_sum")
    }
    for toks in tokens:
        acc["count"].append(float(len(toks)))
        acc["gate_sum"].append(sum(g for g, _ in toks))
        acc["norm_sum"].append(sum(n for _, n in toks))
        acc["norm_sq_sum"].append(sum(n * n for _, n in toks))
        acc["gate_norm_sum"].append(sum(g * n for g, n in toks))
        acc["gate_norm_sq_sum"].append(sum((g * n) ** 2 for g, n in toks))
    return acc
