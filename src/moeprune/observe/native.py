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

Faster, where the implementation allows it (``tap``): the registered ``grouped_mm`` / ``batched_mm``
functions pass the per-slot down-projection output through ``self.post_expert_norm`` (when
``self.has_post_expert_norm``) right before weighting it. Calling the function ONCE on the real inputs with
a stand-in ``self`` (:class:`_Tap`: every attribute read goes to the module, the post-norm slot applies the
module's own norm if it has one and records its result) returns the real output, computed by the real code,
and the per-slot outputs it weighted: no second expert pass, no replay, no copy. The rows stay in the
function's slot order (``tap_layout``: sorted by expert for grouped_mm, token-major for batched_mm); the
hooks path puts its rows in that same order, so accumulators sum in the same order on both paths and the
statistics agree bitwise.

``decide`` checks once per process and key (``replay_key``) that the tapped rows recombine
bitwise to the real output (else the expand path), and that the expand path's replay does (else the hooks
path: model output from the real call, per-slot outputs from ``expand``).
"""
from __future__ import annotations

import functools

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
        # eager adds, expert by expert in increasing id, each token's gated row into zeros of the model dtype
        # (index_add_: one rounded add per row and call). The same adds in the same order per token, vectorised
        # over tokens: k steps instead of a loop over the experts.
        fk, order = f.view(k, t, -1), idx.argsort(dim=1)  # [k, T, H] slot-major rows; [T, k] by expert id
        tok = torch.arange(t, device=f.device)
        out = torch.zeros(t, f.shape[-1], dtype=dtype, device=f.device)
        for j in range(k):
            slot = order[:, j]
            out += (fk[slot, tok] * w[tok, slot, None]).to(dtype)
        return out
    return (f.view(t, k, -1) * w.reshape(t, k, 1)).sum(dim=1).to(dtype)


class _Tap:
    """Stand-in ``self`` for a registered experts function: attribute reads go to ``mod``; the post-expert
    norm slot is always taken, applies ``mod``'s own norm where it has one and records the result."""

    has_post_expert_norm = True

    def __init__(self, mod: nn.Module):
        object.__setattr__(self, "_mod", mod)
        object.__setattr__(self, "rows", [])

    def __getattr__(self, name: str):
        return getattr(self._mod, name)

    def post_expert_norm(self, y: torch.Tensor) -> torch.Tensor:
        if self._mod.has_post_expert_norm:
            y = self._mod.post_expert_norm(y)
        self.rows.append(y)
        return y


def _sorted_pos(idx: torch.Tensor) -> torch.Tensor:
    """grouped_mm's slot order: ``torch.sort`` of the flat expert ids, the same call on the same tensor (sorting
    is deterministic for a given input, ties included; ``decide`` checks the order once per key)."""
    return torch.sort(idx.reshape(-1))[1]


def _token_major(idx: torch.Tensor) -> None:
    return None


@functools.cache
def tap_layouts() -> dict:
    """Registered function -> its slot order (``pos [S]`` with ``pos[s] = t * k + j``, or None: token-major)."""
    from transformers.integrations import moe
    layouts = {}
    for name, layout in (("grouped_mm_experts_forward", _sorted_pos), ("batched_mm_experts_forward", _token_major)):
        fn = getattr(moe, name, None)
        if fn is not None:
            layouts[fn] = layout
    return layouts


def tap_layout(mod: nn.Module, impl: str | None, idx: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """``(known, pos)``: whether ``impl``'s registered function has a known slot order, and that order
    (``pos[s] = t * k + j`` of its row ``s``; None: token-major)."""
    layout = None if impl in EAGER else tap_layouts().get(own_function(mod, impl))
    return (False, None) if layout is None else (True, layout(idx))


def tap(mod: nn.Module, impl: str | None, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """``(out, f [S, H], pos)`` from ONE call of ``impl``'s registered function: its return value and the
    per-slot rows it weighted, in its own slot order ``pos`` (see :func:`tap_layout`); None where ``impl``
    has no known slot order (eager: the class's own forward) or the call recorded no single ``[S, H]``."""
    known, pos = tap_layout(mod, impl, idx)
    if not known:
        return None
    stand_in = _Tap(mod)
    with torch.no_grad():
        out = own_function(mod, impl)(stand_in, hidden, idx, w)
    rows = stand_in.rows
    if len(rows) != 1 or rows[0].shape != (idx.numel(), hidden.shape[-1]):
        return None
    return out, rows[0], pos


def token_major(f: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Rows ``f [S, ...]`` in slot order ``pos`` put in token-major order (a gather by the inverse
    permutation: ``index_copy_`` is several times slower on CPU)."""
    if pos is None:
        return f
    inv = torch.empty_like(pos)
    inv[pos] = torch.arange(pos.numel(), device=pos.device)
    return f.index_select(0, inv)


TAP, REPLAY = "tap", "replay"  # how a registered implementation's per-slot outputs are obtained
# Decided on the first call of each replay_key in the process: TAP, REPLAY, or why both differ (hooks path).
MODES: dict[tuple, str] = {}


def replay_key(mod: nn.Module, impl: str | None, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple:
    """What the exactness of a tap or a replay can depend on: the implementation's code (function and experts
    class), dtypes, device type, hidden width and top-k (not the token count: each (token, slot) row is
    computed and combined independently of the others)."""
    return (own_function(mod, impl), type(mod), hidden.dtype, w.dtype, hidden.device.type,
            int(hidden.shape[-1]), int(idx.shape[-1]))


def tapped(mod: nn.Module, impl: str | None, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """``(out, f, pos, None)`` from one tapped call of the model's own implementation, or None."""
    got = tap(mod, impl, hidden, idx, w)
    return None if got is None else (*got, None)


def replayed(mod: nn.Module, impl: str | None, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """``(out, f, pos, rows)``: per-slot outputs from ``expand`` and the replayed combine."""
    f, pos, rows = expand(mod, impl, hidden.reshape(-1, hidden.shape[-1]), idx, w.dtype)
    return combine(impl, f, idx, w, hidden.dtype), f, pos, rows


def decide(key: tuple, mod: nn.Module, impl: str | None, hidden: torch.Tensor, idx: torch.Tensor,
            w: torch.Tensor) -> tuple | None:
    """First call of ``key`` in the process: compare the tap (its output, and its rows recombined), else the
    replay, bitwise with the model's own call; record the mode in ``MODES``. Returns the checked
    ``(out, f, pos, rows)`` for this call, or None (hooks path)."""
    with torch.no_grad():
        real = own_function(mod, impl)(mod, hidden, idx, w).reshape(hidden.shape[0], -1)
        got = tapped(mod, impl, hidden, idx, w)
        if got is not None:
            out, f, pos, _ = got
            if torch.equal(out.reshape(real.shape), real) and torch.equal(  # token-major sum_k w * f
                    combine("grouped_mm", token_major(f, pos), idx, w, hidden.dtype), real):
                MODES[key] = TAP
                return got
        got = replayed(mod, impl, hidden, idx, w)
    if torch.equal(got[0], real):
        MODES[key] = REPLAY
        return got
    MODES[key] = (f"replaying experts implementation {impl or 'eager'!r} in {hidden.dtype} differs from the "
                   "model's own call")
    return None
