"""Per-expert maths of one MoE block, for every expert layout transformers 5.x uses.

``ExpertBank.expert_forward(e, x)`` computes expert ``e``'s un-gated output ``f_e(x)`` (and optionally its
intermediate activation ``act(gate) * up``) directly from the fused weights: ``@use_experts_implementation``
classes via their layout flags (``is_transposed``, ``has_gate``, ``has_bias``, ``_apply_gate``,
``has_post_expert_norm``), plus the fixed layouts of DBRX (2-D ``[E*I, H]``), LongCat (identity zero
experts after the real ones), Llama4 (transposed, gate on the input) and JetMoE (``input_linear`` /
``output_linear``). Router maths (full probabilities, renormalisation, scale) lives here too; which layout
and which router recipe a block has is architecture data (``arch/adapters.py``, ``arch/routing.py``).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeprune.arch.adapters import Adapter, get_adapter
from moeprune.arch.routing import expert_layout, routing_mismatch, routing_of
from moeprune.arch.structure import (
    current_top_k,
    get_experts,
    get_router,
    group_info,
    intermediate_size_of,
    iter_moe_blocks,
    num_experts_of,
    router_weight,
)

log = logging.getLogger(__name__)


class ExpertBank:
    """The per-expert maths of one MoE block: ``f_j(x)``, intermediates, down matrices, probabilities."""

    def __init__(self, layer: int, name: str, block: nn.Module, adapter: Adapter, config: Any = None):
        self.layer, self.name, self.block = layer, name, block
        self.experts, self.router = get_experts(block), get_router(block)
        self.kind = expert_layout(block, adapter)
        self.num_experts = num_experts_of(block)
        w = router_weight(self.router)
        self.router_width, self.hidden_size = int(w.shape[0]), int(w.shape[1])
        self.top_k = current_top_k(block)
        self.n_group = [int(v) for v in group_info(block)]
        try:
            self.intermediate_size: int | None = intermediate_size_of(block)
        except NotImplementedError:
            self.intermediate_size = None
        # renormalisation / scale / score: the adapter's recipe (observed weights only check it)
        self.routing: dict[str, Any] = routing_of(block, adapter, config)
        self.score: str = self.routing["score"]
        self.gate_on_input: bool = self.routing["gate_on_input"]
        self.routing_checked = False
        ex = self.experts
        self.decorated = self.kind == "fused" and hasattr(ex, "has_gate") and hasattr(type(ex).forward, "__wrapped__")
        self.has_gate = getattr(ex, "has_gate", True)
        self.has_bias = getattr(ex, "has_bias", False)
        self.transposed = getattr(ex, "is_transposed", False)
        self.post_norm = getattr(ex, "has_post_expert_norm", False)
        self._col_norm: torch.Tensor | None = None

    # ---- one expert on rows x [n, H]
    def expert_forward(self, e: int, x: torch.Tensor, want_inter: bool = False, out: torch.Tensor | None = None):
        """``(f_e(x) [n, H], act [n, I] or None)``: the un-gated output of expert ``e``. ``out``: an ``[n, H]``
        buffer the output is written into (the fused down projection writes there directly)."""
        ex, k = self.experts, self.kind
        if k == "longcat" and e >= self.num_experts:  # zero-compute (identity) experts
            y = x if out is None else out.copy_(x)
            return y, (x.new_zeros(x.shape[0], self.intermediate_size or 0) if want_inter else None)
        if k in ("fused", "longcat"):
            w = ex.gate_up_proj[e] if self.has_gate else ex.up_proj[e]
            proj = x @ w if self.transposed else F.linear(x, w)
            if self.has_bias:
                proj = proj + (ex.gate_up_proj_bias if self.has_gate else ex.up_proj_bias)[e]
            if not self.has_gate:
                h = ex.act_fn(proj)
            elif hasattr(ex, "_apply_gate"):
                h = ex._apply_gate(proj)
            else:
                g, u = proj.chunk(2, dim=-1)
                h = ex.act_fn(g) * u
            d = ex.down_proj[e]
            if out is not None and not self.post_norm and out.dtype == h.dtype == d.dtype:
                y = torch.mm(h, d if self.transposed else d.T, out=out)
                if self.has_bias:
                    y += ex.down_proj_bias[e]
                return y, (h if want_inter else None)
            y = h @ d if self.transposed else F.linear(h, d)
            if self.has_bias:
                y = y + ex.down_proj_bias[e]
            if self.post_norm:
                y = ex.post_expert_norm(y)
        elif k == "dbrx":
            inter, mlp = ex.ffn_hidden_size, ex.mlp
            w1, v1, w2 = (t.view(-1, inter, self.hidden_size)[e] for t in (mlp.w1, mlp.v1, mlp.w2))
            h = mlp.activation_fn(x.matmul(w1.T)) * x.matmul(v1.T)
            y = h.matmul(w2)
        elif k == "llama4":
            g, u = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            h = u * ex.act_fn(g)
            y = h @ ex.down_proj[e]
        else:  # jetmoe
            g, u = F.linear(x, self.block.input_linear.weight[e]).chunk(2, dim=-1)
            h = self.block.activation(g) * u
            y = F.linear(h, self.block.output_linear.weight[e])
        if out is not None:
            y = out.copy_(y)
        return y, (h if want_inter else None)

    def sorted_slots(self, x: torch.Tensor, idx: torch.Tensor, want_inter: bool = False,
                     scale: torch.Tensor | None = None):
        """``(order, out [S, H], inter [S, I] or None, inputs [S, H])`` for ``x [T, H]``, ``idx [T, k]``:
        slot ``s`` is flat position ``order[s]`` of ``idx``; slots are sorted by expert and each expert runs
        once on its rows, writing into one buffer. ``scale [T, k]`` multiplies each slot's input
        (gate-on-input blocks)."""
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.router_width).tolist()
        src = x.index_select(0, order // k)
        if scale is not None:
            src = src * scale.reshape(-1)[order].unsqueeze(-1).to(src.dtype)
        buf, inters, start = None, [], 0
        for e, c in enumerate(counts):
            if not c:
                continue
            rows = src[start:start + c]
            if buf is None:
                y, h = self.expert_forward(e, rows, want_inter)
                buf = y.new_empty(src.shape[0], y.shape[1])
                buf[:c] = y
            else:
                _, h = self.expert_forward(e, rows, want_inter, out=buf[start:start + c])
            inters.append(h)
            start += c
        if buf is None:
            buf = src.new_zeros(0, self.hidden_size)
        inter = torch.cat(inters) if want_inter and inters else None
        return order, buf, inter, src

    def slots(self, x: torch.Tensor, idx: torch.Tensor, want_inter: bool = False,
              scale: torch.Tensor | None = None):
        """``sorted_slots`` put back in ``[T, k, H]`` (and ``[T, k, I]``) order."""
        t, k = idx.shape
        order, out, inter, _ = self.sorted_slots(x, idx, want_inter, scale)
        back = torch.empty_like(out).index_copy_(0, order, out).view(t, k, -1)
        if inter is not None:
            inter = torch.empty_like(inter).index_copy_(0, order, inter).view(t, k, -1)
        return back, inter

    def all_outputs(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, E, H]``: every real expert on every row (gate-on-input blocks scale the input by
        ``sigmoid(logit_j)``, i.e. what expert ``j`` would add if selected)."""
        outs = []
        for e in range(self.num_experts):
            xe = x
            if self.gate_on_input:
                if logits is None:
                    logits = F.linear(x, router_weight(self.router), getattr(self.router, "bias", None))
                xe = x * torch.sigmoid(logits[:, e:e + 1].float()).to(x.dtype)
            outs.append(self.expert_forward(e, xe)[0])
        return torch.stack(outs, 1)

    def down_weight(self, e: int) -> torch.Tensor:
        """Expert ``e``'s down projection as ``[H, I]`` (column ``i`` = what neuron ``i`` writes)."""
        if self.post_norm:
            raise NotImplementedError(f"{type(self.experts).__name__}: a norm over the expert output makes "
                                      "neuron contributions non-additive; the neurons feature is unavailable")
        ex = self.experts
        if self.kind == "dbrx":
            return ex.mlp.w2.view(-1, ex.ffn_hidden_size, self.hidden_size)[e].T
        if self.kind == "jetmoe":
            return self.block.output_linear.weight[e]
        d = ex.down_proj[e]
        return d.T if (self.transposed or self.kind == "llama4") else d

    def down_col_norms(self) -> torch.Tensor:
        """``[E, I]`` float64 column norms ``||W_down[:, i]||`` (cached; read inside the forward)."""
        if self._col_norm is None:
            self._col_norm = torch.stack([self.down_weight(e).double().norm(dim=0)
                                          for e in range(self.num_experts)]).cpu()
        return self._col_norm

    # ---- router maths
    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` full router probability p (softmax, or sigmoid for sigmoid routers)."""
        z = logits if logits.dtype == torch.float64 else logits.float()
        p = z if self.score == "probs" else torch.sigmoid(z) if self.score == "sigmoid" else torch.softmax(z, -1)
        return p[:, : self.num_experts]

    def solo_gate(self, logits: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` gate expert j would get if it were the only expert left (Pathfinder's L)."""
        n = self.num_experts
        ones = logits.new_ones(logits.shape[0], n, dtype=torch.float32)
        if self.gate_on_input:
            return ones
        r = self.routing
        if r["renormalize"] or self.score != "sigmoid":  # a softmax over one surviving logit is 1
            return ones * float(r["scale"])
        return torch.sigmoid(logits[:, :n].float()) * float(r["scale"])

    def check_routing(self, logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> None:
        """Once per bank: warn (never change ``routing``) when the observed weights contradict the adapter."""
        if self.routing_checked:
            return
        self.routing_checked = True
        msg = routing_mismatch(self.routing, logits.reshape(-1, logits.shape[-1]), idx, weights)
        if msg is not None:
            log.warning("MoE layer %d (%s): %s", self.layer, self.name, msg)


def model_adapter(model: nn.Module) -> Adapter:
    """The ``arch.adapters`` record of ``model``; ``UnsupportedModelError`` (naming the supported families)
    for a model without one: observe never works from guesses."""
    return get_adapter(model)


def build_banks(model: nn.Module, layers=None) -> dict[int, ExpertBank]:
    """``{layer: ExpertBank}`` for every MoE block (or only ``layers``); layouts and router recipes come
    from the model's adapter (``UnsupportedModelError`` without one)."""
    adapter = model_adapter(model)
    found = [(li, name, blk) for li, name, blk in iter_moe_blocks(model) if layers is None or li in layers]
    ids = [li for li, _, _ in found]
    if len(set(ids)) != len(ids):
        raise NotImplementedError(f"MoE blocks of {type(model).__name__} share layer ids {ids} (several MoE stacks, "
                                  "e.g. a vision and a text tower); observe the text model alone")
    banks = {li: ExpertBank(li, name, blk, adapter, getattr(model, "config", None)) for li, name, blk in found}
    if not banks:
        raise ValueError(f"{type(model).__name__} has no MoE block (a module with `experts` and `gate`/"
                         "`router` children); nothing to observe")
    return banks
