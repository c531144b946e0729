"""Architecture knowledge as data, part 2: expert layouts and the router recipe of an adapted block.

Everything here is read from the family's :class:`~moeprune.arch.adapters.Adapter` and the model config,
never guessed from numbers or from source text. ``observe`` builds its ``ExpertBank`` from these answers;
the numeric side (observed weights) only CHECKS them (:func:`routing_mismatch`) and warns on a contradiction.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeprune.arch.adapters import Adapter, UnsupportedModelError, router_info
from moeprune.arch.structure import get_experts

# How the per-expert maths of a block is stored (``Adapter.layout``):
#   fused   3-D ``gate_up_proj``/``up_proj`` + ``down_proj`` of an ``@use_experts_implementation`` class
#   longcat fused tensors plus identity ("zero-compute") experts after the real ones
#   dbrx    2-D ``[E*I, H]`` w1 / v1 / w2
#   llama4  transposed fused tensors, every expert on every token, the sigmoid gate scales the INPUT
#   jetmoe  the block itself holds ``input_linear`` / ``output_linear`` (no experts module)
LAYOUTS = ("fused", "longcat", "dbrx", "llama4", "jetmoe")


def expert_layout(block: nn.Module, adapter: Adapter) -> str:
    """The adapter's layout, after checking the modules really have it (a clear error otherwise)."""
    layout, ex = adapter.layout, get_experts(block)
    if layout not in LAYOUTS:
        raise ValueError(f"adapter {adapter.model_type!r}: layout {layout!r} unknown; use one of {LAYOUTS}")
    ok = {"fused": hasattr(ex, "gate_up_proj") or hasattr(ex, "up_proj"),
          "longcat": hasattr(ex, "num_routed_experts"),
          "dbrx": hasattr(getattr(ex, "mlp", None), "w1"),
          "llama4": hasattr(ex, "gate_up_proj") and ex is not block,
          "jetmoe": ex is block and hasattr(block, "output_linear")}[layout]
    if not ok:
        raise UnsupportedModelError(
            f"{type(ex).__name__} (model_type {adapter.model_type!r}) does not have the {layout!r} expert layout its "
            "adapter declares; the installed transformers changed this family: fix `layout` in arch/adapters.py")
    return layout


def routing_of(block: nn.Module, adapter: Adapter, config: Any = None) -> dict[str, Any]:
    """The router record observe writes into ``stats.meta["router"]``: ``router_info`` with ``scale``
    being what multiplies the weights the EXPERTS receive (1 when the family scales the summed output
    instead: that factor is ``output_scale``) and ``source = "adapter"``."""
    info = router_info(block, adapter, config)
    gate_on_input = adapter.layout == "llama4"
    on_output = bool(info.pop("scale_on_output"))
    scale = float(info.pop("scale"))
    return {**info, "renormalize": bool(info["renormalize"]) and not gate_on_input,
            "scale": 1.0 if on_output or gate_on_input else scale, "output_scale": scale if on_output else 1.0,
            "gate_on_input": gate_on_input, "source": "adapter"}


def applied_weights(routing: dict[str, Any], logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` float64 weights the recipe gives the experts ``idx [T, k]`` from ``logits [T, E_router]``."""
    z = logits.double()
    p = {"softmax": lambda: z.softmax(-1), "sigmoid": z.sigmoid, "probs": lambda: z}[routing["score"]]()
    g = p.gather(1, idx.long())
    if routing.get("norm_p") not in (None, 1):  # DBRX: divided by the p-norm of the top-k weights
        g = g / g.norm(p=float(routing["norm_p"]), dim=-1, keepdim=True)
    elif routing["renormalize"]:
        g = g / g.sum(-1, keepdim=True)
    return g * float(routing["scale"])


def weight_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance (per unit of scale) between observed ``dtype`` weights and the float64 recipe:
    four ulps at 1 of the weights' dtype (bf16: 0.031, fp16: 0.0039), at least 1e-5 (fp32 softmax)."""
    return max(4 * torch.finfo(dtype).eps, 1e-5)


def routing_mismatch(routing: dict[str, Any], logits: torch.Tensor, idx: torch.Tensor,
                     weights: torch.Tensor) -> str | None:
    """A message when observed ``weights [T, k]`` contradict the adapter's recipe, else None. Families
    whose recipe is approximate (``exact`` False) and gate-on-input blocks are not checked."""
    if not routing.get("exact", True) or routing["gate_on_input"] or weights.numel() == 0:
        return None
    want = applied_weights(routing, logits, idx)
    err = float((want - weights.double()).abs().max())
    tol = weight_tolerance(weights.dtype) * max(1.0, abs(float(routing["scale"])))
    if err <= tol:
        return None
    return (f"observed {weights.dtype} top-k weights differ from the adapter's router recipe (score="
            f"{routing['score']}, renormalize={routing['renormalize']}, scale={routing['scale']}) by {err:.3g} > "
            f"{tol:.3g}; the recorded router meta keeps the adapter's values: check arch/adapters.py")
