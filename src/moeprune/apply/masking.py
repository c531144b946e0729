"""Simulate a pruning plan without slicing: router masking (the reference for equivalence tests).

Inside ``with mask_experts(model, plan):`` the pruned experts' router logits are ``-inf`` and
every selection-only bias of theirs is ``-inf`` (``sigmoid(-inf) + bias`` could still win
otherwise), so they are never selected and softmax routers renormalise over the kept experts,
exactly as in the pruned model. Neuron plans are simulated by zeroing the removed channels.
LongCat's zero-compute experts and Inkling's shared rows are never masked. On exit every tensor is
restored bit for bit, also when the block raises.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moeprune.apply.experts import check_expert_ids, moe_blocks
from moeprune.apply.neurons import check_neuron_ids
from moeprune.arch.structure import (
    get_router,
    inter_layout,
    intermediate_size_of,
    kill_channels_,
    num_experts_of,
    router_weight,
    selection_biases,
)
from moeprune.plan import PruningPlan

_LINEAR = (F.linear, torch.mm, torch.matmul, torch.Tensor.__matmul__)


class _AddRouterMask(TorchFunctionMode):
    """Adds ``mask [E_router]`` to the first linear output with ``E_router`` columns computed while a
    router is running (armed by router pre-hooks, disarmed by post-hooks): works whether the router
    calls ``F.linear`` on its own weight or an ``nn.Linear`` child (``layer``/``wg``/``classifier``)."""

    def __init__(self):
        super().__init__()
        self.active: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        mask = self.active
        if mask is not None and func in _LINEAR and isinstance(out, torch.Tensor) and out.shape[-1] == mask.numel():
            self.active = None
            out = out + mask.to(device=out.device, dtype=out.dtype)
        return out


def _plan_parts(model: nn.Module, plan: PruningPlan | dict) -> tuple[dict, dict]:
    if not isinstance(plan, PruningPlan):
        return {int(k): list(v) for k, v in plan.items()}, {}
    blocks = moe_blocks(model)
    for li, lp in plan.layers.items():
        if li in blocks and lp.num_experts != num_experts_of(blocks[li]):
            raise ValueError(f"plan layer {li} was made for {lp.num_experts} experts, the model layer has "
                             f"{num_experts_of(blocks[li])}")
    return plan.keep(), {li: dict(lp.neurons) for li, lp in plan.layers.items() if lp.neurons}


@contextlib.contextmanager
def mask_experts(model: nn.Module, plan: PruningPlan | dict[int, list[int]]) -> Iterator[nn.Module]:
    """Run ``model`` as if ``plan`` were applied (original expert ids; ``{layer: kept ids}`` or a
    ``PruningPlan``, whose neuron keeps are simulated by zeroing channels)."""
    keep, neurons = _plan_parts(model, plan)
    keep = check_expert_ids(model, keep)
    neurons = check_neuron_ids(model, neurons, expert_ids=keep)
    blocks = moe_blocks(model)
    mode = _AddRouterMask()
    handles, saved = [], []
    try:
        with torch.no_grad():
            for li, ids in keep.items():
                block, router = blocks[li], get_router(blocks[li])
                n, e_router = num_experts_of(block), router_weight(router).shape[0]
                mask = torch.full((e_router,), float("-inf"))
                mask[torch.as_tensor(ids, dtype=torch.long)] = 0.0
                mask[n:] = 0.0  # LongCat zero-compute experts / Inkling shared rows
                handles.append(router.register_forward_pre_hook(lambda m, a, _k=mask: setattr(mode, "active", _k)))
                handles.append(router.register_forward_hook(lambda m, a, o: setattr(mode, "active", None)))
                removed = torch.nonzero(torch.isinf(mask)).reshape(-1)
                for mod, attr, dim in selection_biases(block):
                    t = getattr(mod, attr)
                    saved.append((t, t.detach().clone()))
                    t.index_fill_(dim, removed[removed < t.shape[dim]].to(t.device), float("-inf"))
            for li, per in neurons.items():
                block = blocks[li]
                for owner, attr, _kind, _dim in inter_layout(block):
                    t = getattr(owner, attr)
                    saved.append((t, t.detach().clone()))
                dead = torch.ones(num_experts_of(block), intermediate_size_of(block), dtype=torch.bool)
                dead[[e for e in range(dead.shape[0]) if e not in per]] = False
                for e, ch in per.items():
                    dead[e, ch] = False
                kill_channels_(block, dead)
        with mode:
            yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for t, v in reversed(saved):
                t.copy_(v)
