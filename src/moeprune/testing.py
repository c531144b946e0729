"""Test support shipped with the package: deterministic example plans for the tiny models of
``moeprune.arch.tiny`` (tests, benchmarks, the demo). Not used by the pipeline itself."""
from __future__ import annotations

import torch

from moeprune.arch.structure import (
    current_top_k,
    get_router,
    group_info,
    intermediate_size_of,
    iter_moe_blocks,
    num_experts_of,
)
from moeprune.plan import LayerPlan, PruningPlan

__all__ = ["example_plan", "logits", "state_dicts_equal"]


def example_plan(model: torch.nn.Module, *, seed: int = 0, uniform: bool = False,
                 neurons: bool = False) -> PruningPlan:
    """A deterministic plan for ``model`` (tests, demo): non-uniform kept counts (6/5/4/3 of 8 by
    layer), balanced across router groups for group-limited routers (3 then 2 per group of 4), or
    ``uniform`` (E-2 everywhere, one per group); ``neurons`` adds ragged channel keeps per kept expert
    (original ids)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for j, (li, _, block) in enumerate(iter_moe_blocks(model)):
        n, (ng, _tg) = num_experts_of(block), group_info(block)
        grouped = ng > 1 and getattr(get_router(block), "topk_method", "") != "greedy"
        if grouped:
            size = n // ng
            per = size - 1 if uniform else max(2, size - 1 - j % 2)
            keep = [q * size + e for q in range(ng) for e in torch.randperm(size, generator=g)[:per].tolist()]
        else:
            count = n - 2 if uniform else max(current_top_k(block) or 1, [6, 5, 4, 3][j % 4] * n // 8)
            keep = torch.randperm(n, generator=g)[:count].tolist()
        chans = None
        if neurons:
            inter = intermediate_size_of(block)
            chans = {e: torch.randperm(inter, generator=g)[: inter * 3 // 4 - 3 * (i % 3) - 4 * (j % 2)].tolist()
                     for i, e in enumerate(sorted(keep))}
        layers[li] = LayerPlan(num_experts=n, keep=tuple(keep), neurons=chans)
    return PruningPlan(layers=layers, method="example", model_type=model.config.model_type)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids).logits`` without autograd (the equivalence tests compare these)."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same keys, dtypes and values (bitwise): a reload must give back exactly what was saved."""
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
