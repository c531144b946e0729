"""Per-slot expert outputs computed by the model's OWN experts implementation, and its combine step.

Why: under observation a bf16 model must run exactly the forward it runs without observation, and the
statistics must be of the values it really computed. Every transformers 5.x experts implementation
(``eager``, ``grouped_mm``, ``batched_mm``) computes each (token, slot) row independently of the
weight, then combines ``sum_k w * f``. Calling the implementation on rows expanded to one slot each
with weight 1 (``expand``) feeds its kernels the SAME rows in the SAME order and grouping as the real
call, so the returned per-slot outputs are bitwise the ones the real call computes; ``combine`` then
replays the implementation's own weighting and summation in the model dtype:

* ``eager``: per hit expert in increasing order, rows from ``torch.where`` (slot-major), ``f * w``,
  ``index_add_`` into zeros of the model dtype. The expansion is slot-major (row ``j * T + t``) so each
  expert sees its rows in eager's ``(top-k position, token)`` order.
* ``grouped_mm`` / ``batched_mm`` (and any other registered function): token-major rows
  (``repeat_interleave``), ``f * w`` then ``view(T, k, H).sum(1)`` cast to the model dtype.

``capture.py`` checks the replay bitwise against the real call once per block and falls back to the
hooks path (model output from the real call, per-slot outputs from ``expand``) where it differs.
"""
from __future__ import annotations

import torch
from torch import nn

EAGER = ("eager", None)


def own_function(mod: nn.Module, impl: str | None):
    """The model's experts function for implementation name ``impl`` (None / "eager": the class's own forward)."""
    if impl in EAGER:
        return type(mod).forward.__wrapped__
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    return ALL_EXPERTS_FUNCTIONS[impl]


def expand(mod: nn.Module, impl: str | None, x: torch.Tensor, idx: torch.Tensor, w_dtype: torch.dtype):
    """``(f [S, H], pos [S] or None, rows [S, H])``: un-gated per-slot outputs of ``x [T, H]`` routed to
    ``idx [T, k]``, computed by ``impl`` on one-slot rows with weight 1 (``f * 1`` and the single-term
    sum are exact, so ``f`` is bitwise the implementation's per-slot output). ``pos[s] = t * k + j`` for
    the slot-major eager layout; None: token-major (slot ``s = t * k + j``)."""
    t, k = idx.shape
    if impl in EAGER:
        rows, ids = x.repeat(k, 1), idx.T.reshape(-1, 1)  # [k*T, H]: row j*T + t is token t, slot j
        pos = (torch.arange(t, device=idx.device) * k)[None, :] + torch.arange(k, device=idx.device)[:, None]
        pos = pos.reshape(-1)
    else:
        rows, ids, pos = x.repeat_interleave(k, 0), idx.reshape(-1, 1), None
    ones = torch.ones(t * k, 1, dtype=w_dtype, device=x.device)
    with torch.no_grad():
        f = own_function(mod, impl)(mod, rows, ids, ones)
    return f, pos, rows


def combine(impl: str | None, f: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]`` routed output ``sum_k w * f`` in the operation order of ``impl`` (see the module doc);
    ``f`` is laid out as :func:`expand` returns it."""
    t, k = idx.shape
    if impl in EAGER:
        out = torch.zeros(t, f.shape[-1], dtype=dtype, device=f.device)
        for e in torch.unique(idx).tolist():  # ascending, as eager's expert_hit
            top_k_pos, token_idx = torch.where(idx.T == e)  # [k, T] mask: (slot, token) row-major
            cur = f[top_k_pos * t + token_idx] * w[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, cur.to(dtype))
        return out
    return (f.view(t, k, -1) * w.reshape(t, k, 1)).sum(dim=1).to(dtype)
