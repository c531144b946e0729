"""NAEE online: every candidate keep set's reconstruction loss accumulated DURING observe (feature group
``naee_online``), so no token cache is kept and every calibration token counts.

The candidates of a layer (``NaeeLayerSpec``) are fixed before calibration from the method and the target
(``methods/naee.py::NAEE.online_spec``: the keep size NAEE's plan would use and its ``keep_sets`` order).
Per batch ``b`` the accumulator adds every token's ``||Y_t - Y'_t(K)||^2`` into an open ``[C]`` float64
vector; when the batch ends (a record of another batch arrives, or the result is read) it adds
``sqrt(batch sum)`` to ``naee_loss`` (the reference's sum of per-batch Frobenius norms) and the batch sum to
``naee_sq`` (``loss="pooled"``). Memory: O(C) per layer, independent of the number of tokens and batches.

Merge-safe (sums) as long as one batch is never split across shards or ranks: ``observe_distributed`` shards
by whole batches, the layer-wise pass feeds a layer every batch in order; ``merge`` refuses two shards that
hold the same open batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moeprune.observe.accumulators import Accumulator, fp
from moeprune.observe.accumulators_dense import selection_bias
from moeprune.observe.recon_math import (
    TOKEN_SLICE,
    candidate_sq_errors,
    expert_output_chunks,
    extended_outputs,
)
from moeprune.observe.record import MoERecord


@dataclass(frozen=True)
class NaeeLayerSpec:
    """One layer's candidates: ``candidates [C, keep]`` int64 keep sets (NAEE's enumeration order) and the
    routing recipe of ``stats.meta`` (``top_k``, ``router``, ``groups`` = (n_group, topk_group) or None)."""

    keep: int
    candidates: torch.Tensor
    top_k: int
    router: dict[str, Any] = field(default_factory=dict)
    groups: tuple[int, int] | None = None

    def meta(self) -> dict[str, Any]:
        return {"keep": self.keep, "candidates": int(self.candidates.shape[0])}


class NaeeOnlineAccumulator(Accumulator):
    """Per candidate keep set: ``naee_loss`` = sum_b ||Y_b - Y'_b||_F and ``naee_sq`` = sum_b ||Y_b - Y'_b||_F^2;
    with every expert kept ``naee_full_sq`` (the routing simulation's fidelity) and ``naee_target_sq``."""

    group = "naee_online"

    def __init__(self, num_experts: int, spec: NaeeLayerSpec):
        c = int(spec.candidates.shape[0])
        super().__init__({"naee_loss": (c,), "naee_sq": (c,), "naee_full_sq": (), "naee_target_sq": (),
                          "naee_batches": ()})
        self.spec, self.num_experts = spec, num_experts
        self._masks = torch.zeros(c, num_experts, dtype=torch.bool)  # [C, E]
        self._masks.scatter_(1, spec.candidates.long(), True)
        self._bias: torch.Tensor | None = None
        self._open: int | None = None  # batch index of the open per-batch sums
        self._open_sq = torch.zeros(c, dtype=torch.float64)

    def _close(self) -> None:
        """The open batch is complete: its norm joins the totals."""
        if self._open is None:
            return
        sq = self._open_sq.to(self._state["naee_loss"].device)
        self._state["naee_loss"] += sq.sqrt()
        self._state["naee_sq"] += sq
        self._state["naee_batches"] += 1
        self._open, self._open_sq = None, torch.zeros_like(self._open_sq)

    def update(self, rec: MoERecord) -> None:
        self._to(rec.idx.device)
        if self._bias is None:  # fixed; read once while the layer is live (layer-wise runs onload it now)
            self._bias = selection_bias(rec.bank.block)
        if rec.batch_index != self._open:
            self._close()
            self._open = rec.batch_index
        vi = rec.valid_index
        if vi is None:
            vi = torch.arange(rec.x.shape[0], device=rec.x.device)
        # float32 holds bf16 / fp16 / fp32 values exactly: the values the cache path would store
        lg, x = fp(rec.logits.index_select(0, vi)), rec.x.index_select(0, vi)
        y = fp(rec.routed.index_select(0, vi)).double()  # [T, H]
        width = lg.shape[1]
        sp, dev = self.spec, lg.device
        bias, masks = self._bias.to(dev), self._masks.to(dev)
        sq = torch.zeros(masks.shape[0], dtype=torch.float64, device=dev)
        for s, out in expert_output_chunks(rec.bank, x, lg):
            f = extended_outputs(out, fp(x[s]) if width > self.num_experts else None, width)  # [t, E_r, H]
            for lo in range(0, f.shape[0], TOKEN_SLICE):
                ts = slice(lo, lo + TOKEN_SLICE)
                yl = y[s][ts]
                full, err = candidate_sq_errors(f[ts], yl, lg[s][ts], masks, sp.top_k, sp.router, sp.groups, bias)
                self._add("naee_target_sq", yl.pow(2).sum())
                self._add("naee_full_sq", full.sum())
                sq += err.sum(-1)
        self._open_sq += sq.cpu()

    def result(self) -> dict[str, torch.Tensor]:
        self._close()
        return super().result()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> Accumulator:
        self._open, self._open_sq = None, torch.zeros_like(self._open_sq)
        return super().load_state_dict(sd)

    def merge(self, other: Accumulator) -> Accumulator:
        if isinstance(other, NaeeOnlineAccumulator):
            if other._open is not None and other._open == self._open:
                raise ValueError(f"naee_online: batch {self._open} is split across two shards; its per-batch norm "
                                 "needs the whole batch (shard by whole batches)")
            if not torch.equal(other.spec.candidates, self.spec.candidates):
                raise ValueError("naee_online: cannot merge shards scored on different candidate keep sets")
        self._close()
        return super().merge(other)
