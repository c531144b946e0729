"""Capture what every MoE block actually does in a forward pass, one record per layer and call.

A record (:class:`MoERecord`) holds the raw router logits ``[T, E_router]``, the top-k indices and gate
weights the experts really received ``[T, k]`` (so selection biases, group limiting, renormalisation and
routed scaling are already applied), the expert input ``x [T, H]``, the per-slot un-gated expert outputs
``f [T, k, H]`` and optionally the intermediate activations ``[T, k, I]`` and the residual stream ``h``
before the block. ``T = batch * seq``; padding tokens are flagged by ``record.valid``.

How per-slot outputs are obtained without doubling the expert FLOPs:

* classes decorated with ``@use_experts_implementation`` are switched to the registered experts
  implementation ``"moeprune_capture"`` for the duration of the context. It runs the model's OWN
  implementation (the one the config selected: ``grouped_mm`` by default in transformers 5.x, also on
  CPU; ``eager``; ``batched_mm``): ``grouped_mm`` / ``batched_mm`` are called once on the real inputs and
  tapped for the per-slot rows they weight (``native.tap``: the model's own output, no extra expert work);
  ``eager`` runs once on (token, slot) rows with weight 1, which gives bitwise the per-slot outputs the real
  call computes, and its weighting and summation are replayed in the model dtype (``native.expand`` /
  ``combine``). Model outputs are BITWISE those of a plain forward, in every dtype. The tap (its rows
  recombined) or the replay is checked bitwise against the real call once per process and key
  (``native.replay_key``: implementation, experts class, dtypes, device type, width, top-k; one extra
  experts call per process, not per layer or per calibration); where both differ the blocks of that key
  fall back to the hooks path (logged, in ``fallbacks``). The implementation is restored on exit.
* other classes (DBRX, LongCat, or ``implementation="hooks"``) use a pre-hook on ``experts`` that binds the
  forward signature and a post-hook that recomputes the per-slot outputs on the side (bit-identical model
  outputs, twice the expert FLOPs); decorated classes recompute them with their own implementation
  (exact values), DBRX and LongCat with ``ExpertBank`` maths (equal to fp32 round-off).
* Llama4 (dense experts, the sigmoid gate multiplies the expert INPUT) reads the dense expert output with a
  hook: ``f = expert(s * x)`` is what the block adds, so records carry that ``f`` and a gate of exactly 1.
* JetMoE (no experts module) reads the sorted un-gated outputs from a hook on ``output_linear``.

All hooks are removed and implementations restored on exit, also when the forward raises.
"""
from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprune.observe import native
from moeprune.observe.experts import ExpertBank, build_banks, model_adapter
from moeprune.observe.record import MoERecord

log = logging.getLogger(__name__)
IMPL_NAME = "moeprune_capture"
_ACTIVE: dict[int, tuple[MoECapture, ExpertBank]] = {}  # id(experts module) -> owner while capturing


def _capture_experts_forward(self, hidden_states, top_k_index=None, top_k_weights=None, *args, **kwargs):
    """Registered as ``"moeprune_capture"``: per-slot outputs once, then the gate-weighted sum."""
    idx = top_k_index if top_k_index is not None else kwargs.pop("router_indices", None)
    w = top_k_weights if top_k_weights is not None else kwargs.pop("routing_weights", None)
    entry = _ACTIVE.get(id(self))
    if entry is None:  # a model left switched (should not happen): behave like eager
        return type(self).forward.__wrapped__(self, hidden_states, idx, w)
    cap, bank = entry
    return cap._run_experts(bank, self, hidden_states, idx, w)


def _register_impl() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPL_NAME, _capture_experts_forward)


def _first_logits(out, sizes: tuple[int, ...]) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for t in outs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[-1] in sizes:
            return t
    raise RuntimeError(f"router returned no [*, E] logits among {[type(t).__name__ for t in outs]}")


def _bind(fn: Callable, mod: nn.Module, args, kwargs) -> list:
    f = getattr(fn, "__wrapped__", fn)
    return list(inspect.signature(f).bind(mod, *args, **kwargs).arguments.values())[1:]


@dataclass
class _Batch:
    valid: torch.Tensor  # [T] bool
    rows: torch.Tensor  # [T] long
    num_rows: int
    index: int


class MoECapture:
    """Context manager instrumenting every MoE block of ``model``; see the module docstring.

    ``on_record(record)`` is called once per block call, inside the forward (records reference live
    tensors: reduce them, do not keep them). Without ``on_record`` records are appended to
    ``self.records[layer]``. ``intermediates`` adds ``act(gate) * up`` per slot; ``residual`` adds the
    residual stream before the block (the input of the norm whose output feeds the block).
    ``implementation="hooks"`` forces the bit-identical recompute path for every block."""

    def __init__(self, model: nn.Module, on_record: Callable[[MoERecord], None] | None = None, *,
                 banks: dict[int, ExpertBank] | None = None, layers=None, intermediates: bool = False,
                 residual: bool = False, implementation: str = "auto"):
        if implementation not in ("auto", "hooks"):
            raise ValueError(f"implementation={implementation!r}: use 'auto' (registered experts implementation "
                             "where possible) or 'hooks' (recompute on the side, bit-identical outputs)")
        self.model, self.on_record = model, on_record
        self.banks = banks if banks is not None else build_banks(model, layers)
        self.intermediates, self.residual, self.implementation = intermediates, residual, implementation
        self.records: dict[int, list[MoERecord]] = defaultdict(list)
        self.next_index = 0
        self._batch: _Batch | None = None
        self._handles: list = []
        self._restore: list[tuple[Any, Any]] = []
        self._orig_impl: dict[int, str | None] = {}
        self._active_ids: list[int] = []
        self._logits: dict[int, torch.Tensor] = {}
        self._pending: dict[int, Any] = {}
        self._x: dict[int, torch.Tensor] = {}
        self._resid: dict[int, torch.Tensor | str] = {}
        self.fallbacks: dict[str, str] = {}  # block name -> why it runs the hooks path (logged once)

    # ---------------------------------------------------------------- batch bookkeeping
    def set_batch(self, attention_mask: torch.Tensor | None = None, shape: tuple[int, int] | None = None,
                  index: int | None = None) -> None:
        """Declare the next forward's tokens: ``attention_mask [B, S]`` (0 = padding) and/or ``shape``."""
        if shape is None:
            if attention_mask is None:
                raise ValueError("set_batch needs an attention_mask or a (batch, seq) shape")
            shape = tuple(attention_mask.shape)
        b, s = int(shape[0]), int(shape[1])
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -s:].bool().reshape(-1)
        else:
            valid = torch.ones(b * s, dtype=torch.bool)
        rows = torch.arange(b).repeat_interleave(s)
        index = self.next_index if index is None else index
        self.next_index = index + 1
        self._batch = _Batch(valid, rows, b, index)

    def _model_pre(self, mod, args, kwargs):
        try:
            bound = inspect.signature(mod.forward).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            bound = dict(kwargs)
        ids, emb, mask = bound.get("input_ids"), bound.get("inputs_embeds"), bound.get("attention_mask")
        ref = ids if ids is not None else emb
        if not isinstance(ref, torch.Tensor):
            return
        shape = (1, ref.shape[0]) if (ids is not None and ref.dim() == 1) else tuple(ref.shape[:2])
        self.set_batch(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None, shape)

    def _batch_for(self, bank: ExpertBank, t: int, device) -> _Batch:
        b = self._batch
        if b is None:
            b = self._batch = _Batch(torch.ones(t, dtype=torch.bool), torch.zeros(t, dtype=torch.long), 1,
                                     self.next_index)
        if b.valid.numel() != t:
            raise RuntimeError(f"MoE layer {bank.layer} ({bank.name}) saw {t} tokens but the batch has "
                               f"{b.valid.numel()} (batch x seq); observe expects one full-sequence forward per "
                               "batch (no generation with a KV cache)")
        if b.valid.device != device:
            b.valid, b.rows = b.valid.to(device), b.rows.to(device)
        return b

    # ---------------------------------------------------------------- install / remove
    def __enter__(self) -> MoECapture:  # noqa: PYI034
        try:
            for bank in self.banks.values():
                self._install(bank)
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cfg, old in reversed(self._restore):
            cfg._experts_implementation_internal = old
        self._restore.clear()
        for i in self._active_ids:
            _ACTIVE.pop(i, None)
        self._active_ids.clear()
        for d in (self._logits, self._pending, self._x, self._resid):
            d.clear()
        return False

    def _install(self, bank: ExpertBank) -> None:
        li, ex = bank.layer, bank.experts
        self._handles.append(bank.router.register_forward_hook(self._router_hook(bank)))
        if self.residual:
            self._install_residual(bank)
        if bank.kind in ("llama4", "jetmoe"):
            self._handles.append(bank.block.register_forward_pre_hook(self._store_x(li), with_kwargs=True))
            target = ex if bank.kind == "llama4" else bank.block.output_linear
            self._handles.append(target.register_forward_hook(
                self._llama4_hook(bank) if bank.kind == "llama4" else self._jetmoe_hook(bank)))
        elif bank.decorated and self.implementation == "auto":
            if id(ex) in _ACTIVE:
                raise RuntimeError(f"{bank.name} is already being captured (nested MoECapture on one model)")
            _register_impl()
            cfg = ex.config
            saved = [old for c, old in self._restore if c is cfg]
            if not saved:
                saved = [cfg._experts_implementation_internal]
                self._restore.append((cfg, saved[0]))
            self._orig_impl[li] = saved[0]
            _ACTIVE[id(ex)] = (self, bank)
            self._active_ids.append(id(ex))
            cfg._experts_implementation_internal = IMPL_NAME
        else:
            self._handles.append(ex.register_forward_pre_hook(self._experts_pre(bank), with_kwargs=True))
            self._handles.append(ex.register_forward_hook(self._experts_post(bank)))

    def _install_residual(self, bank: ExpertBank) -> None:
        """h_t = the input of the norm that feeds the block: the adapter's ``norm`` (None: post-norm layer,
        the block reads the residual itself)."""
        li = bank.layer
        parent = self.model.get_submodule(bank.name.rpartition(".")[0])
        adapter = model_adapter(self.model)
        layer = bank.block if adapter.block == "" else parent
        if adapter.norm is None:
            self._handles.append(bank.block.register_forward_pre_hook(self._store_resid_from_input(li),
                                                                      with_kwargs=True))
            return
        try:
            norm = layer.get_submodule(adapter.norm)
        except AttributeError:
            raise ValueError(f"adapter of {adapter.model_type!r} names norm {adapter.norm!r}, absent from "
                             f"{type(layer).__name__} ({bank.name}); fix arch/adapters.py") from None
        self._handles.append(norm.register_forward_pre_hook(
            lambda mod, args: self._resid.__setitem__(li, args[0].reshape(-1, args[0].shape[-1]))))

    def _store_resid_from_input(self, li: int):
        def pre(mod, args, kwargs):
            h = args[0] if args else next(iter(kwargs.values()))
            self._resid[li] = h.reshape(-1, h.shape[-1])
        return pre

    # ---------------------------------------------------------------- hooks
    def _router_hook(self, bank: ExpertBank):
        sizes = (bank.router_width, bank.num_experts)

        def hook(mod, args, out):
            if bank.kind == "llama4":
                lg = out[1]
            elif bank.kind == "jetmoe":
                self._pending[bank.layer] = out
                lg = out[4]
            else:
                lg = _first_logits(out, sizes)
            self._logits[bank.layer] = lg.detach().reshape(-1, lg.shape[-1])
        return hook

    def _store_x(self, li: int):
        def pre(mod, args, kwargs):
            h = args[0] if args else next(iter(kwargs.values()))
            self._x[li] = h.reshape(-1, h.shape[-1])
        return pre

    def _experts_pre(self, bank: ExpertBank):
        def pre(mod, args, kwargs):
            self._pending[bank.layer] = _bind(type(mod).forward, mod, args, kwargs)[:3]
        return pre

    def _experts_post(self, bank: ExpertBank):
        def post(mod, args, out):
            h, idx, w = self._pending.pop(bank.layer)
            x = h.reshape(-1, h.shape[-1])
            if bank.decorated:  # the model's own implementation gives the exact per-slot values
                self._emit_native(bank, mod, mod.config._experts_implementation, x, idx, w, out)
                return
            with torch.no_grad():
                order, f, inter, src = bank.sorted_slots(x, idx, self.intermediates)
            self._emit(bank, x, idx, w, f, inter, slot_pos=order, slot_x=src)
        return post

    def _llama4_hook(self, bank: ExpertBank):
        def hook(mod, args, out):
            x = self._x.pop(bank.layer)
            t, hdim = x.shape
            with torch.no_grad():
                val, idx = torch.topk(self._logits[bank.layer], bank.top_k or 1, dim=1)
                dense = out.view(-1, t, hdim).transpose(0, 1)  # [T, E, H]: expert_j(s_j * x)
                f = dense.gather(1, idx.unsqueeze(-1).expand(-1, -1, hdim)).reshape(-1, hdim)
                inter = None
                if self.intermediates:
                    inter = bank.slots(x, idx, True, scale=torch.sigmoid(val.float()))[1].reshape(f.shape[0], -1)
            self._emit(bank, x, idx, torch.ones(idx.shape, dtype=f.dtype, device=f.device), f, inter)
        return hook

    def _jetmoe_hook(self, bank: ExpertBank):
        def hook(mod, args, out):  # output_linear: slots arrive sorted by expert (router's index_sorted_experts)
            x = self._x.pop(bank.layer)
            order, _batch_index, gates, sizes, _lg = self._pending.pop(bank.layer)
            t = x.shape[0]
            with torch.no_grad():
                ids = torch.repeat_interleave(torch.arange(len(sizes), device=x.device),
                                              torch.tensor(sizes, device=x.device))
                idx, w = torch.empty_like(ids), torch.empty_like(gates)
                idx[order], w[order] = ids, gates
            self._emit(bank, x, idx.view(t, -1), w.view(t, -1), out, args[0] if self.intermediates else None,
                       slot_pos=order)
        return hook

    def _run_experts(self, bank: ExpertBank, mod: nn.Module, hidden: torch.Tensor, idx: torch.Tensor,
                     w: torch.Tensor) -> torch.Tensor:
        """The registered implementation: the model's own call tapped for its per-slot outputs, or per-slot
        outputs once and the model's own combine replayed (bitwise the plain forward: checked on the first call
        of its ``native.replay_key`` in the process, else the hooks path)."""
        x = hidden.reshape(-1, hidden.shape[-1])
        impl = self._orig_impl.get(bank.layer)
        if bank.name in self.fallbacks:
            out = native.own_function(mod, impl)(mod, hidden, idx, w)
            self._emit_native(bank, mod, impl, x, idx, w, out)
            return out
        key = native.replay_key(mod, impl, hidden, idx, w)
        mode = native.MODES.get(key)
        got = native.decide(key, mod, impl, hidden, idx, w) if mode is None else None
        mode = native.MODES[key]
        if mode not in (native.TAP, native.REPLAY):
            self._fall_back(bank, mode)
            return self._run_experts(bank, mod, hidden, idx, w)
        if got is None:
            run = native.tapped if mode == native.TAP else native.replayed
            got = run(mod, impl, hidden, idx, w)
        if got is None:
            raise RuntimeError(f"{bank.name}: experts implementation {impl!r} recorded no per-slot outputs this "
                               "call (it did on its first); observe with implementation='hooks'")
        out, f, pos, rows = got
        self._emit(bank, x, idx, w, f, self._inter(bank, x, idx, pos), slot_pos=pos, slot_x=rows,
                   routed=out.reshape(x.shape[0], -1))
        return out.view(hidden.shape)

    def _fall_back(self, bank: ExpertBank, why: str) -> None:
        self.fallbacks[bank.name] = why
        log.warning("observe: MoE block %s: %s; this block uses the hooks path (model output from the model's "
                    "own call, per-slot outputs recomputed: twice the expert FLOPs)", bank.name, why)

    def _emit_native(self, bank: ExpertBank, mod: nn.Module, impl: str | None, x, idx, w, out) -> None:
        """Hooks path of a decorated class: ``out`` is the model's own output; per-slot values from ``impl``,
        in the slot order of its tap where it has one (the order the fast path sums in)."""
        f, pos, rows = native.expand(mod, impl, x, idx, w.dtype)
        known, tap_pos = native.tap_layout(mod, impl, idx)
        if known and tap_pos is not None:  # expand gave token-major rows (pos None)
            f, rows, pos = f.index_select(0, tap_pos), rows.index_select(0, tap_pos), tap_pos
        self._emit(bank, x, idx, w, f, self._inter(bank, x, idx, pos), slot_pos=pos, slot_x=rows,
                   routed=out.reshape(x.shape[0], -1))

    def _inter(self, bank: ExpertBank, x, idx, pos) -> torch.Tensor | None:
        """``[S, I]`` intermediates in the slot layout ``pos`` (None: token-major), recomputed by ``ExpertBank``
        (the implementations do not expose them; equal to the model's to fp32 round-off)."""
        if not self.intermediates:
            return None
        with torch.no_grad():
            inter = bank.slots(x, idx, True)[1].reshape(idx.numel(), -1)  # token-major
        return inter if pos is None else inter[pos]

    def _emit(self, bank: ExpertBank, x, idx, w, f, inter, *, slot_pos=None, slot_x=None, routed=None) -> None:
        """``f [S, H]`` / ``inter [S, I]``: per-slot outputs in the order ``slot_pos`` (None: token-major)."""
        li = bank.layer
        logits = self._logits.pop(li, None)
        if logits is None:
            raise RuntimeError(f"MoE layer {li} ({bank.name}): the experts ran but no router output was seen")
        resid = None
        if self.residual:
            resid = self._resid.pop(li, None)
            if not isinstance(resid, torch.Tensor):
                raise ValueError(resid or f"residual stream of MoE layer {li} was not captured")
        b = self._batch_for(bank, x.shape[0], x.device)
        bank.check_routing(logits, idx, w)
        rec = MoERecord(li, bank, logits, idx, w, x, b.valid, b.rows, b.num_rows, b.index, slot_out=f,
                        slot_pos=slot_pos, slot_inter=inter, slot_x=slot_x, routed=routed, residual=resid)
        with torch.no_grad():
            if self.on_record is not None:
                self.on_record(rec)
            else:
                self.records[li].append(rec)
