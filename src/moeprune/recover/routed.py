"""Routed output of one MoE layer on captured inputs, unpruned and as the pruned model computes it.

The pruned routing is the model's own router run under ``apply.masking.mask_experts`` for this layer
(the masked model equals the pruned model, tested in tests/test_apply_*): dropped rows get ``-inf``,
softmax routers renormalise over the kept experts, neuron plans zero the removed channels. The expert
maths is ``ExpertBank``'s. Sums are float64; expert outputs are computed in the model dtype.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from moeprune.apply.masking import mask_experts
from moeprune.observe.experts import ExpertBank
from moeprune.plan import LayerPlan, PruningPlan


@dataclass
class Routed:
    """One routing of ``x [N, H]``: ``idx [N, k]``, float64 gates ``w [N, k]`` (times the family's output
    scale), per-slot un-gated outputs ``f [N, k, H]`` (model dtype) and the routed sum ``y [N, H]`` (f64)."""

    idx: torch.Tensor
    w: torch.Tensor
    f: torch.Tensor
    y: torch.Tensor


def check_supported(bank: ExpertBank, what: str) -> None:
    """Recovery rewrites fused expert tensors; other layouts are refused with the reason."""
    if bank.kind != "fused" or bank.gate_on_input or bank.post_norm:
        why = ("a norm over the expert output" if bank.post_norm else
               "the gate scales the expert input" if bank.gate_on_input else f"the {bank.kind!r} expert layout")
        raise NotImplementedError(f"recovery {what!r} on MoE layer {bank.layer} ({type(bank.experts).__name__}): "
                                  f"{why} is not supported; run without recovery (recovery: null)")


def route(bank: ExpertBank, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [N, k] long, w [N, k] float64)`` from the block's own router (the experts' gate weights)."""
    out = bank.router(x)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    idx = next((t for t in outs if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
    w = next((t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point() and idx is not None
              and t.shape == idx.shape), None)
    if idx is None or w is None:
        raise NotImplementedError(f"recovery: the router of MoE layer {bank.layer} ({type(bank.router).__name__}) "
                                  "does not return (logits, top-k weights, top-k indices); not supported")
    return idx.long(), w.double() * float(bank.routing.get("output_scale", 1.0))


def routed(bank: ExpertBank, x: torch.Tensor) -> Routed:
    """The routed output of the block in its current state (call under a mask for the pruned one)."""
    idx, w = route(bank, x)
    f, _ = bank.slots(x, idx)  # [N, k, H]
    y = torch.einsum("nk,nkh->nh", w, f.double())
    return Routed(idx, w, f, y)


def layer_plan(plan: PruningPlan, li: int) -> PruningPlan:
    """The plan restricted to layer ``li`` (so a mask touches only that block)."""
    return PruningPlan(layers={li: plan.layers[li]}, method=plan.method, model_type=plan.model_type)


def pruned_context(model: nn.Module, plan: PruningPlan, li: int):
    """Context in which ``model``'s layer ``li`` computes as pruned by ``plan``."""
    lp: LayerPlan = plan.layers[li]
    if len(lp.keep) == lp.num_experts and not lp.neurons:
        return nullcontext(model)
    return mask_experts(model, layer_plan(plan, li))


@torch.no_grad()
def pruned_routed(model: nn.Module, bank: ExpertBank, plan: PruningPlan, x: torch.Tensor) -> Routed:
    with pruned_context(model, plan, bank.layer):
        return routed(bank, x)


@torch.no_grad()
def check_additive(model: nn.Module, bank: ExpertBank, plan: PruningPlan, x: torch.Tensor,
                   full: Routed, pruned: Routed) -> None:
    """The block's own output minus our routed sum (shared experts etc.) must not depend on the pruning:
    otherwise our routed maths misses something this family does, and a fit would be wrong."""
    def rest(y_routed):
        out = bank.block(x.unsqueeze(0))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.reshape(x.shape).double() - y_routed

    c_full = rest(full.y)
    with pruned_context(model, plan, bank.layer):
        c_pruned = rest(pruned.y)
    diff = (c_full - c_pruned).norm()
    noise = 16 * torch.finfo(x.dtype).eps * (full.y.norm() + c_full.norm())
    if diff > 0.25 * (full.y - pruned.y).norm() + noise:
        raise NotImplementedError(
            f"recovery: MoE layer {bank.layer} ({type(bank.block).__name__}) does not compute shared + sum of "
            f"gate * expert as recovery models it (non-routed part changed by {float(diff):.3g} under pruning); "
            "this family is not supported, run without recovery")


def rel_residual(target: torch.Tensor, y: torch.Tensor) -> float:
    """``||target - y||^2 / ||target||^2`` (float64)."""
    den = float(target.pow(2).sum())
    return float((target - y).pow(2).sum()) / den if den > 0 else 0.0
