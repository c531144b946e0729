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
    """One routing of the block input ``x [N, H]`` as the block itself computes it: the experts' input
    ``xin [N, H]``, ``idx [N, k]``, float64 gates ``w [N, k]`` (times the family's output scale),
    per-slot un-gated outputs ``f [N, k, H]`` (model dtype), the routed sum ``y [N, H]`` and the whole
    block output ``out [N, H]`` (float64)."""

    xin: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    f: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor


def check_supported(bank: ExpertBank, what: str) -> None:
    """Recovery rewrites fused expert tensors; other layouts are refused with the reason."""
    if bank.kind != "fused" or bank.gate_on_input or bank.post_norm:
        why = ("a norm over the expert output" if bank.post_norm else
               "gates applied to the expert input" if bank.gate_on_input else f"the {bank.kind!r} expert layout")
        raise NotImplementedError(f"recovery {what!r} on MoE layer {bank.layer} ({type(bank.experts).__name__}): "
                                  f"not supported with {why}; run without recovery (recovery: null)")


def _experts_call(bank: ExpertBank, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the block on ``x [N, H]``; ``(block output [N, H], experts input, top-k idx, top-k weights)``
    as the block passed them to its experts (selection biases, group limits, scaling all applied)."""
    got: dict = {}

    def pre(mod, args, kwargs):
        vals = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        idx = next((v for v in vals if not v.is_floating_point() and v.dim() == 2), None)
        w = next((v for v in vals if idx is not None and v.is_floating_point() and v.shape == idx.shape), None)
        got.update(xin=vals[0], idx=idx, w=w)

    h = bank.experts.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        out = bank.block(x.unsqueeze(0))
    finally:
        h.remove()
    out = out[0] if isinstance(out, (tuple, list)) else out
    if got.get("idx") is None or got.get("w") is None:
        raise NotImplementedError(f"recovery: the experts of MoE layer {bank.layer} ({type(bank.experts).__name__}) "
                                  "are not called with (hidden, top-k indices, top-k weights); not supported")
    return out.reshape(x.shape), got["xin"].reshape(-1, x.shape[-1]), got["idx"].long(), got["w"]


def routed(bank: ExpertBank, x: torch.Tensor) -> Routed:
    """The routed output of the block in its current state (call under a mask for the pruned one)."""
    out, xin, idx, w = _experts_call(bank, x)
    w = w.double() * float(bank.routing.get("output_scale", 1.0))
    f, _ = bank.slots(xin, idx)  # [N, k, H]
    y = torch.einsum("nk,nkh->nh", w, f.double())
    return Routed(xin, idx, w, f, y, out.double())


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


def check_additive(bank: ExpertBank, full: Routed, pruned: Routed) -> None:
    """The block's own output minus our routed sum (shared experts etc.) must not depend on the pruning:
    otherwise our routed maths misses something this family does, and a fit would be wrong."""
    c_full, c_pruned = full.out - full.y, pruned.out - pruned.y
    diff = (c_full - c_pruned).norm()
    noise = 16 * torch.finfo(full.f.dtype).eps * (full.out.norm() + full.y.norm())
    if diff > 0.25 * (full.y - pruned.y).norm() + noise:
        raise NotImplementedError(
            f"recovery: MoE layer {bank.layer} ({type(bank.block).__name__}) does not compute shared + sum of "
            f"gate * expert as recovery models it (non-routed part changed by {float(diff):.3g} under pruning); "
            "this family is not supported, run without recovery")


def rel_residual(target: torch.Tensor, y: torch.Tensor) -> float:
    """``||target - y||^2 / ||target||^2`` (float64)."""
    den = float(target.pow(2).sum())
    return float((target - y).pow(2).sum()) / den if den > 0 else 0.0
