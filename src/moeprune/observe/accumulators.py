"""Float64 streaming accumulators, one class per feature group of ``observe/stats.py::SCHEMA``.

Each accumulator reduces :class:`~moeprune.observe.capture.MoERecord` s of ONE MoE layer into exactly the
SCHEMA statistic names of its group, and supports ``merge`` (data shards / ranks), ``state_dict`` /
``load_state_dict`` (layer-wise checkpoints). Only valid (non-padding) tokens count; LongCat's identity
"zero experts" (ids >= E) are routed slots but not experts, so they are excluded from per-expert sums.
Per-token maths runs in float32 on the record's device; every sum is float64.
"""
from __future__ import annotations

import torch

from moeprune.observe.partials import INDEX, is_partial, stack_partials, unstack_partials
from moeprune.observe.record import MoERecord
from moeprune.observe.stats import SCHEMA

EPS = 1e-12
CHUNK_ELEMENTS = 1 << 24  # [n, E, H] float32 chunk budget for every-expert-on-every-token maths (64 MiB)


def fp(t: torch.Tensor) -> torch.Tensor:
    """Working precision: float32, or float64 for float64 models."""
    return t if t.dtype == torch.float64 else t.float()


def _sel(t: torch.Tensor, vi: torch.Tensor | None) -> torch.Tensor:
    return t if vi is None else t.index_select(0, vi)


class Accumulator:
    """Base: sum / max state in ``_state``, per-sample rows in ``_parts`` (reductions read from SCHEMA)."""

    group = ""

    def __init__(self, shapes: dict[str, tuple[int, ...]], partials: bool = False):
        bad = [n for n in shapes if SCHEMA.get(n, ("",))[0] != self.group]
        if bad:
            raise ValueError(f"{type(self).__name__}: {bad} are not statistics of group {self.group!r}")
        self.shapes = shapes
        self._state: dict[str, torch.Tensor] = {}
        self._parts: dict[str, list[torch.Tensor]] = {}
        # per-batch partial sums / maxima (``observe/partials.py``): batch index -> {name: tensor}
        self._partials: dict[int, dict[str, torch.Tensor]] | None = {} if partials else None
        self._cur: dict[str, torch.Tensor] | None = None
        for name, shape in shapes.items():
            if SCHEMA[name][1] == "cat":
                self._parts[name] = []
            else:
                self._state[name] = torch.zeros(shape, dtype=torch.float64)

    def update(self, rec: MoERecord) -> None:
        raise NotImplementedError

    # ---- helpers for subclasses
    def _to(self, device) -> None:
        for n, t in self._state.items():
            if t.device != device:
                self._state[n] = t.to(device)

    def _begin(self, rec: MoERecord) -> None:
        """Select the partial state of ``rec``'s batch (when partials are kept)."""
        if self._partials is None:
            return
        cur = self._partials.get(rec.batch_index)
        if cur is None:
            cur = self._partials[rec.batch_index] = {n: torch.zeros_like(t) for n, t in self._state.items()}
        self._cur = {n: (t if t.device == rec.idx.device else t.to(rec.idx.device)) for n, t in cur.items()}
        self._partials[rec.batch_index] = self._cur

    def _targets(self, name: str) -> list[torch.Tensor]:
        return [self._state[name]] if self._cur is None else [self._state[name], self._cur[name]]

    def _index_add(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        v = values.double()
        for t in self._targets(name):
            t.index_add_(0, ids, v)

    def _amax_at(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        v = values.double()
        for t in self._targets(name):
            t.scatter_reduce_(0, ids, v, "amax")

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        for t in self._targets(name):
            t += value

    def _cat(self, name: str, value: torch.Tensor) -> None:
        self._parts[name].append(value.detach().double().cpu())

    # ---- results and persistence
    def result(self) -> dict[str, torch.Tensor]:
        out = {n: t.detach().cpu().clone() for n, t in self._state.items()}
        for n, parts in self._parts.items():
            out[n] = torch.cat(parts) if parts else torch.zeros((0, *self.shapes[n]), dtype=torch.float64)
            self._parts[n] = [out[n]] if parts else []
        if self._partials is not None:
            out.update(stack_partials(self._partials, {n: t.shape for n, t in self._state.items()}))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.result()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> Accumulator:
        if self._partials is not None and INDEX in sd:
            self._partials, self._cur = unstack_partials(sd), None
        sd = {n: t for n, t in sd.items() if not is_partial(n)}
        if set(sd) != set(self.shapes):
            raise ValueError(f"{type(self).__name__}: state has {sorted(sd)}, expected {sorted(self.shapes)}")
        for n, t in sd.items():
            if n in self._parts:
                self._parts[n] = [t.double().cpu()] if t.shape[0] else []
            else:
                self._state[n] = t.double().clone()
        return self

    def merge(self, other: Accumulator) -> Accumulator:
        """In place: add ``other`` (sums add, maxima max, rows concatenate after ours)."""
        if type(other) is not type(self) or other.shapes != self.shapes:
            raise ValueError(f"cannot merge {type(other).__name__}{other.shapes} into {type(self).__name__}{self.shapes}")
        theirs = other.result()
        for n in self._state:
            o = theirs[n].to(self._state[n].device)
            red = SCHEMA[n][1]
            self._state[n] = self._state[n] + o if red == "sum" else torch.maximum(self._state[n], o)
        for n in self._parts:
            if theirs[n].shape[0]:
                self._parts[n].append(theirs[n])
        if (self._partials is None) != (other._partials is None):
            raise ValueError(f"cannot merge {type(self).__name__}s with and without per-batch partials")
        if self._partials is not None:
            dup = sorted(set(self._partials) & set(other._partials))
            if dup:
                raise ValueError(f"{type(self).__name__}: batches {dup} observed twice; merge shards of "
                                 "distinct batches (observe(..., batch_offset=...))")
            self._partials.update(unstack_partials(theirs))
            self._cur = None
        return self


SLOT_CHUNK_BYTES = 1 << 19  # working-precision rows of f per pass of slot_norm_max: stays in cache for 3 reductions


def slot_norm_max(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f [S, H]`` -> ``||f||``, ``max f`` and ``min f`` ``[S]`` in working precision (exact for the max and
    min), from row chunks of ~512 KiB upcast once: the three reductions read each chunk from cache and no
    working-precision copy of the whole ``f`` is made (half the time of reducing bf16 ``f`` three times)."""
    s, h = f.shape
    wt = fp(f[:0]).dtype
    rows = max(1, SLOT_CHUNK_BYTES // max(1, h * torch.finfo(wt).bits // 8))
    nrm, top, bottom = (torch.empty(s, dtype=wt, device=f.device) for _ in range(3))
    for i in range(0, s, rows):
        c, o = fp(f[i:i + rows]), slice(i, i + rows)
        torch.linalg.vector_norm(c, dim=-1, out=nrm[o])
        torch.amax(c, -1, out=top[o])
        torch.amin(c, -1, out=bottom[o])
    return nrm, top, bottom


def _routed_slots(rec: MoERecord, num_experts: int) -> torch.Tensor | None:
    """Mask of slots that count (valid token, real expert), or None when all do (no gather needed)."""
    m = rec.slot_valid if rec.valid_index is not None else None
    if rec.bank.router_width > num_experts:  # LongCat zero experts are routed slots, not experts
        real = rec.slot_expert < num_experts
        m = real if m is None else m & real
    return m


def _pick(t: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    return t if m is None else t[m]


# REAP (reference) gate conventions: p = softmax over every router output of the raw logits; "renorm" divides
# by the sum of p over the token's routed slots and clamps at float32 eps (REAP pruning_metrics.py).
REF_GATES = {"softmax": "softmax_gate", "renorm": "renorm_gate"}
RENORM_EPS = float(torch.finfo(torch.float32).eps)


def reference_gates(rec: MoERecord) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S]`` per-slot REAP gates: plain softmax over all router outputs, and that renormalised over the
    token's routed experts. REAP applies softmax to the raw logits even for sigmoid routers; routers that
    output probabilities (Gemma4, score ``probs``) are taken as they are (REAP has no such model)."""
    bank = rec.bank
    if bank.score == "softmax" and bank.router_width == bank.num_experts:
        p = rec.probs  # the same softmax, already computed (and cached) for prob_sum
    else:
        z = fp(rec.logits)
        p = z if bank.score == "probs" else torch.softmax(z, dim=-1)  # [T, W] W = router width (E + zero)
    den = p.gather(1, rec.idx.long()).sum(-1)  # [T] sum of p over the token's routed experts
    tok = rec.slot_token
    ps = p[tok, rec.slot_expert.long()]  # [S]
    return ps, (ps / den[tok]).clamp_min(RENORM_EPS)


class RoutedAccumulator(Accumulator):
    """Counts, gate and output-norm moments over routed tokens (with the applied gate and with REAP's
    reference gates), max activations; full router probability over all tokens."""

    group = "routed"

    def __init__(self, num_experts: int, partials: bool = False):
        e = (num_experts,)
        names = ["tokens", "count", "gate_sum", "norm_sum", "norm_sq_sum", "gate_norm_sum", "gate_norm_sq_sum",
                 "max_act", "max_act_signed", "prob_sum"]
        names += [f"{g}{suffix}" for g in REF_GATES.values() for suffix in ("_sum", "_norm_sum", "_norm_sq_sum")]
        super().__init__({n: (() if n == "tokens" else e) for n in names}, partials)
        self.num_experts = num_experts

    def _gate_moments(self, prefix: str, ids: torch.Tensor, g: torch.Tensor, n: torch.Tensor) -> None:
        self._index_add(f"{prefix}_sum", ids, g)
        self._index_add(f"{prefix}_norm_sum", ids, g * n)
        self._index_add(f"{prefix}_norm_sq_sum", ids, (g * n) ** 2)

    def update(self, rec: MoERecord) -> None:
        self._to(rec.idx.device)
        self._begin(rec)
        nrm, top, bottom = slot_norm_max(rec.slot_out)  # [S] ||f||, signed max and min element of each f
        amax = torch.maximum(top, -bottom)  # [S] max_i |f_i| (2 reductions beat aminmax)
        m = _routed_slots(rec, self.num_experts)
        g_soft, g_renorm = reference_gates(rec)
        ids, g, n, a, s, gs, gr = (_pick(t, m) for t in (rec.slot_expert, rec.slot_weight, nrm, amax, top,
                                                          g_soft, g_renorm))
        g, n = g.double(), n.double()
        self._index_add("count", ids, torch.ones_like(g))
        self._index_add("norm_sum", ids, n)
        self._index_add("norm_sq_sum", ids, n * n)
        self._gate_moments("gate", ids, g, n)
        self._gate_moments(REF_GATES["softmax"], ids, gs.double(), n)
        self._gate_moments(REF_GATES["renorm"], ids, gr.double(), n)
        self._amax_at("max_act", ids, a)
        self._amax_at("max_act_signed", ids, s)  # state starts at 0: floor 0
        vi = rec.valid_index
        self._add("prob_sum", _sel(rec.probs, vi).double().sum(0))
        self._add("tokens", float(rec.x.shape[0] if vi is None else vi.numel()))


class DirectionAccumulator(Accumulator):
    """TENP ``g||f||(1 - cos(x, f))`` and EASY-EP ``g||f|| max(1 - cos(h, h + r), 0)`` over routed tokens."""

    group = "direction"

    def __init__(self, num_experts: int, partials: bool = False):
        super().__init__({"gate_norm_dir_sum": (num_experts,), "easyep_sum": (num_experts,)}, partials)
        self.num_experts = num_experts

    def update(self, rec: MoERecord) -> None:
        if rec.residual is None:
            raise ValueError("the direction feature needs the residual stream (MoECapture(residual=True))")
        self._to(rec.idx.device)
        self._begin(rec)
        m = _routed_slots(rec, self.num_experts)
        f, x = fp(_pick(rec.slot_out, m)), fp(_pick(rec.slot_x, m))  # [S, H]
        ids, g, tok = _pick(rec.slot_expert, m), fp(_pick(rec.slot_weight, m)), _pick(rec.slot_token, m)
        nf = f.norm(dim=-1)
        cos_xf = (f * x).sum(-1) / (nf * x.norm(dim=-1)).clamp_min(EPS)
        h = fp(rec.residual)
        hr = h + rec.routed.to(h.dtype)
        cos_h = (h * hr).sum(-1) / (h.norm(dim=-1) * hr.norm(dim=-1)).clamp_min(EPS)  # [T]
        gn = (g * nf).double()
        self._index_add("gate_norm_dir_sum", ids, gn * (1 - cos_xf.double()))
        self._index_add("easyep_sum", ids, gn * (1 - cos_h.double()[tok]).clamp_min(0))


class NeuronAccumulator(Accumulator):
    """TENP neuron importance: signed projection ``a_i <W_down[:, i], f>/||f||`` and ``|a_i| ||W_down[:, i]||``."""

    group = "neurons"

    def __init__(self, num_experts: int, intermediate_size: int):
        shape = (num_experts, intermediate_size)
        super().__init__({"neuron_proj_sum": shape, "neuron_l2_sum": shape})
        self.num_experts = num_experts

    def update(self, rec: MoERecord) -> None:
        if rec.slot_inter is None:
            raise ValueError("the neurons feature needs intermediate activations (MoECapture(intermediates=True))")
        self._to(rec.idx.device)
        m = _routed_slots(rec, self.num_experts)
        idx, f = _pick(rec.slot_expert, m), fp(_pick(rec.slot_out, m))
        a = _pick(rec.slot_inter, m).to(f.dtype)
        u = f / f.norm(dim=-1, keepdim=True).clamp_min(EPS)  # [S, H] unit output direction
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=self.num_experts).tolist()
        col = rec.bank.down_col_norms().to(idx.device)
        proj, l2 = self._state["neuron_proj_sum"], self._state["neuron_l2_sum"]
        for e, (ue, ae) in enumerate(zip(torch.split(u[order], counts), torch.split(a[order], counts))):
            if ue.shape[0]:
                w = rec.bank.down_weight(e).to(ue.dtype)  # [H, I]
                proj[e] += (ae * (ue @ w)).sum(0).double()
                l2[e] += ae.abs().sum(0).double() * col[e]


class TransitionAccumulator(Accumulator):
    """Co-routing counts between this MoE layer and the next one, over all slot pairs of a token."""

    group = "transitions"

    def __init__(self, num_experts: int, num_experts_next: int):
        super().__init__({"transition": (num_experts, num_experts_next)})

    @staticmethod
    def _hot(idx: torch.Tensor, n: int) -> torch.Tensor:
        hot = torch.zeros(idx.shape[0], n + 1, dtype=torch.float64, device=idx.device)
        hot.scatter_add_(1, idx.clamp(max=n), torch.ones_like(idx, dtype=torch.float64))
        return hot[:, :n]  # column n collects zero-expert slots

    def update_pair(self, idx_here: torch.Tensor, idx_next: torch.Tensor) -> None:
        """``idx_here [T, k]``, ``idx_next [T, k']``: the same valid tokens in both layers."""
        self._to(idx_here.device)
        t = self._state["transition"]
        t += self._hot(idx_here, t.shape[0]).T @ self._hot(idx_next.to(idx_here.device), t.shape[1])

    def update(self, rec: MoERecord) -> None:
        raise TypeError("transitions pair two layers: the runner calls update_pair")
