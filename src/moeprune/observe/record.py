"""One MoE block call as seen by the capture: token-level tensors plus a flat list of routed slots.

Slots (one per (token, top-k position)) are stored flat in whatever order the expert computation produced
them (sorted by expert for grouped_mm and DBRX / LongCat, token-major for batched_mm, slot-major for eager),
in the model's dtype (the values it really computed; accumulators upcast): ``slot_pos[s] = t * k + j`` says which
``[T, k]`` position slot ``s`` is. Accumulators reduce the flat slots directly, so no un-sorting copy is
paid unless someone asks for the ``[T, k, ...]`` views (``out``, ``inter``).
"""
from __future__ import annotations

from typing import Any

import torch


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision maths is accumulated in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class MoERecord:
    """``weights`` are the gates applied to the outputs (1 for gate-on-input blocks such as Llama4)."""

    def __init__(self, layer: int, bank: Any, logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                 x: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, num_rows: int, batch_index: int, *,
                 slot_out: torch.Tensor, slot_pos: torch.Tensor | None = None, slot_inter: torch.Tensor | None = None,
                 slot_x: torch.Tensor | None = None, routed: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None):
        self.layer, self.bank = layer, bank
        self.logits = logits  # [T, E_router] raw router output
        self.idx, self.weights = idx, weights  # [T, k] experts actually used and their applied gates
        self.x = x  # [T, H] expert input
        self.valid, self.rows = valid, rows  # [T] bool (False on padding), [T] batch row of each token
        self.num_rows, self.batch_index = num_rows, batch_index
        self.slot_out, self.slot_inter = slot_out, slot_inter  # [S, H] un-gated f, [S, I] act(gate) * up
        self.residual = residual  # [T, H] residual stream before the block (direction feature)
        self._pos, self._slot_x, self._routed = slot_pos, slot_x, routed
        self._cache: dict[str, Any] = {}

    @property
    def top_k(self) -> int:
        return int(self.idx.shape[1])

    @property
    def slot_pos(self) -> torch.Tensor:
        """``[S]`` flat ``[T, k]`` position of each slot."""
        if self._pos is None:
            self._pos = torch.arange(self.idx.numel(), device=self.idx.device)
        return self._pos

    def _slot(self, name: str, fn) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    @property
    def slot_token(self) -> torch.Tensor:
        return self._slot("token", lambda: self.slot_pos // self.top_k)

    @property
    def slot_expert(self) -> torch.Tensor:
        return self._slot("expert", lambda: self.idx.reshape(-1)[self.slot_pos])

    @property
    def slot_weight(self) -> torch.Tensor:
        return self._slot("weight", lambda: self.weights.reshape(-1)[self.slot_pos])

    @property
    def slot_valid(self) -> torch.Tensor:
        return self._slot("svalid", lambda: self.valid[self.slot_token])

    @property
    def slot_x(self) -> torch.Tensor:
        """``[S, H]`` expert input of each slot (the gathered rows when the capture has them)."""
        if self._slot_x is None:
            self._slot_x = self.x.index_select(0, self.slot_token)
        return self._slot_x

    def _tk(self, flat: torch.Tensor | None) -> torch.Tensor | None:
        if flat is None:
            return None
        t, k = self.idx.shape
        if self._pos is not None:
            flat = torch.empty_like(flat).index_copy_(0, self._pos, flat)
        return flat.view(t, k, -1)

    @property
    def out(self) -> torch.Tensor:
        """``[T, k, H]`` un-gated per-slot expert outputs."""
        return self._slot("out", lambda: self._tk(self.slot_out))

    @property
    def inter(self) -> torch.Tensor | None:
        """``[T, k, I]`` per-slot intermediate activations (None unless requested)."""
        return self._slot("inter", lambda: self._tk(self.slot_inter))

    @property
    def routed(self) -> torch.Tensor:
        """``[T, H]`` routed output ``sum_k g * f`` (shared experts excluded), float32 or float64: the experts
        module's own output (kept in the model dtype until asked for) upcast where the capture has it, else
        summed here from the slots."""
        if self._routed is None:
            dt = work_dtype(self.slot_out.dtype, self.weights.dtype)
            r = torch.zeros(self.x.shape[0], self.slot_out.shape[1], dtype=dt, device=self.slot_out.device)
            self._routed = r.index_add_(0, self.slot_token, self.slot_out.to(dt) * self.slot_weight.to(dt)[:, None])
        elif self._routed.dtype not in (torch.float32, torch.float64):
            self._routed = self._routed.to(work_dtype(self._routed.dtype, self.weights.dtype))
        return self._routed

    @property
    def probs(self) -> torch.Tensor:
        return self._slot("probs", lambda: self.bank.probs(self.logits))

    @property
    def valid_index(self) -> torch.Tensor | None:
        """Indices of valid tokens, or None when every token is valid (fast paths skip the gather)."""
        if "vi" not in self._cache:
            self._cache["vi"] = None if bool(self.valid.all()) else torch.nonzero(self.valid).reshape(-1)
        return self._cache["vi"]
