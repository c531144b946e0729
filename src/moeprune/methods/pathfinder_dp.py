"""Exact top-m source->sink paths in a layered weighted DAG (MoE Pathfinder's path search).

The DAG has layers ``0..L-1`` of ``n_l`` nodes; a path picks one node per layer. Weights are logs:
``source [n_0]`` (entering layer 0), ``edges[l] [n_l, n_{l+1}]`` (node weights of the target node are
folded into its incoming edges) and ``sink [n_{L-1}]``; ``-inf`` removes a node / an edge. A path
``(j_0, .., j_{L-1})`` weighs, accumulated left to right in float64,
``((0 + source[j_0]) + edges[0][j_0, j_1]) + ... + sink[j_{L-1}]``.
Paths are ranked by weight (descending), ties by the lexicographically smaller node tuple.

Per layer, every node keeps its ``m`` best prefixes (the bounded priority lists of the reference
code), sorted. A merge step builds, for every next node ``j``, the candidates ``H[i, k] + W[i, j]``
from the ``[n_l, m]`` lists and the ``[n_l, n_{l+1}]`` edge block. It never materialises all
``n_l * m * n_{l+1}`` candidates: a few entries per sorted row (positions ``0..c-1``, then doubling)
give a lower bound on node ``j``'s ``m``-th best candidate (``_lower_bound``), ``searchsorted`` on
the rows counts how many entries of each row can still reach it, and only those (about ``2m + n_l``
per node) are gathered. A "hub" layer of one
node (the router node between two expert layers of Pathfinder's factorised graph) makes a step cost
``O(n m)``; a dense ``E x E`` co-routing block costs about ``O(E (m + E))`` per step in practice.
Exact ties are resolved by lexicographic ranks, computed lazily (only when a tie occurs).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

NEG = float("-inf")
_REL = 1e-9  # relaxes the lower bound so float rounding can never drop a candidate
_BIG = torch.iinfo(torch.long).max // 4  # rank of an empty slot


@dataclass
class _Lists:
    """Per-node best prefixes of one DAG layer: rows sorted by (-val, lexicographic path)."""

    val: torch.Tensor  # [n, w] float64, -inf = empty slot
    parent: torch.Tensor  # [n, w] int64: flat index into the previous layer's [n_prev * w_prev]
    # (meaningless where val is -inf)
    rank: torch.Tensor | None = field(default=None)  # [n, w] int64 lexicographic rank, filled lazily


def _lower_bound(H: torch.Tensor, W: torch.Tensor, m: int) -> torch.Tensor:
    """Per node ``j``, a value ``<=`` its ``m``-th best candidate ``H[i, k] + W[i, j]``, tight within ~2x.

    Row ``i`` is sampled at positions ``0..c-1`` then ``2c-1, 4c-1, ..`` (and ``w-1``); a sample at
    position ``q`` proves ``q + 1`` candidates of that row at least as good, so the best value whose
    proven count reaches ``m`` is a valid bound, and at most ~``2m + P`` candidates lie above it."""
    P, w = H.shape
    Q = W.shape[1]
    c = min(w, -(-m // P))
    pos = list(range(c))
    while pos[-1] < w - 1:
        pos.append(min(2 * pos[-1] + 1, w - 1))
    pos_t = torch.tensor(pos)
    inc = torch.diff(pos_t, prepend=torch.tensor([-1]))  # [S] candidates proven by each sample
    S = len(pos)
    samp = (H[:, pos_t, None] + W[:, None, :]).reshape(P * S, Q).T  # [Q, P*S]
    # every sample proves >= 1 candidate, so the crossing lies among the m best samples
    vals, idx = samp.topk(min(m, P * S), dim=1, sorted=True)
    proven = inc.repeat(P)[idx].cumsum(1)  # [Q, P*S]
    first = (proven < m).sum(1).clamp_max(vals.shape[1] - 1)  # first sample whose proven count reaches m
    lb = vals.gather(1, first.unsqueeze(1)).squeeze(1)
    return torch.where(proven[:, -1] >= m, lb, torch.full_like(lb, NEG))


class _DP:
    """One DP sweep; keeps every layer's lists for back-tracking and lazy tie ranks."""

    def __init__(self, m: int):
        self.m = m
        # the virtual source: one node, one empty prefix of weight 0
        self.layers: list[_Lists] = [_Lists(torch.zeros(1, 1, dtype=torch.float64),
                                            torch.full((1, 1), -1, dtype=torch.long),
                                            torch.zeros(1, 1, dtype=torch.long))]

    # ---------------------------------------------------------------- lexicographic ranks
    def _rank(self, li: int) -> torch.Tensor:
        """Rank of every stored prefix of layer ``li`` in lexicographic order of its node tuple."""
        lay = self.layers[li]
        if lay.rank is None:
            prev = self._rank(li - 1).reshape(-1)  # [n_prev * w_prev]
            n, w = lay.val.shape
            ok = torch.isfinite(lay.val)
            node = torch.arange(n).unsqueeze(1).expand(n, w)[ok]
            key = prev[lay.parent[ok]] * n + node  # (prefix rank, node) as one int64
            rank = torch.full((n, w), _BIG, dtype=torch.long)
            r = torch.empty_like(key)
            r[torch.argsort(key)] = torch.arange(key.numel())
            rank[ok] = r
            lay.rank = rank
        return lay.rank

    # ---------------------------------------------------------------- one merge step
    def step(self, W: torch.Tensor) -> None:
        """Extend every stored prefix of the last layer along the edge block ``W [P, Q]``."""
        H = self.layers[-1].val  # [P, w]
        P, w = H.shape
        if P == 1:
            # fan-out of one node: node j's candidates H[0, k] + W[0, j] are already sorted by value
            # (adding a constant keeps the order; only rounding can create ties, fixed in _select)
            V = H[0].unsqueeze(0) + W[0].unsqueeze(1)  # [Q, w]
            val, parent = self._select(V, None, w)
        else:
            V, F = self._gather(H, W, self.m)
            val, parent = self._select(V, F, min(self.m, V.shape[1]))
        self.layers.append(_Lists(val, parent))

    @staticmethod
    def _gather(H: torch.Tensor, W: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of each node ``j`` that may be in its top-m: padded ``[Q, K]`` values, flat parents."""
        P, w = H.shape
        Q = W.shape[1]
        lb = _lower_bound(H, W, m)  # [Q]
        thr = lb.unsqueeze(0) - W  # [P, Q]: row i can help node j only with H[i, k] >= thr
        fin = torch.isfinite(thr)
        thr = torch.where(fin, thr - _REL * (1.0 + thr.abs() + W.abs().masked_fill(~fin, 0.0)), thr)
        neg_h = (-H).contiguous()  # ascending rows, +inf tail for empty slots
        n = torch.searchsorted(neg_h, (-thr).contiguous(), right=True)  # [P, Q]
        n_fin = torch.searchsorted(neg_h, torch.full((P, 1), float("inf"), dtype=H.dtype))  # finite per row
        n = torch.minimum(n, n_fin)
        n = n.masked_fill((W == NEG) | torch.isnan(thr), 0)
        cnt = n.T.reshape(-1)  # [Q*P] in (j, i) order
        tot = int(cnt.sum())
        blk = torch.repeat_interleave(torch.arange(Q * P), cnt)  # [T]
        k = torch.arange(tot) - (torch.cumsum(cnt, 0) - cnt)[blk]
        j, i = blk // P, blk % P
        per_j = n.sum(0)  # [Q]
        col = torch.arange(tot) - (torch.cumsum(per_j, 0) - per_j)[j]
        K = max(int(per_j.max()) if Q else 0, 1)
        V = torch.full((Q, K), NEG, dtype=H.dtype)
        F = torch.full((Q, K), -1, dtype=torch.long)
        V[j, col] = H[i, k] + W[i, j]
        F[j, col] = i * w + k
        return V, F

    def _select(self, V: torch.Tensor, F: torch.Tensor | None,
                mt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the ``mt`` best candidates by (-value, lexicographic path): ``(values, flat parents)``.

        ``F=None`` means the rows are already sorted by value and candidate ``k`` has parent ``k``."""
        Q, K = V.shape
        if F is None:
            tv, ti = V, torch.arange(K).unsqueeze(0).expand(Q, K)
            boundary = torch.zeros(Q, dtype=torch.bool)
        else:
            tv, ti = V.topk(mt, dim=1, sorted=True)
            last = tv[:, -1:]
            boundary = torch.isfinite(last[:, 0]) & ((V == last).sum(1) > (tv == last).sum(1))
        tied = ((tv[:, 1:] == tv[:, :-1]) & (tv[:, 1:] != NEG)).any(1)
        rows = torch.nonzero(tied | boundary).flatten()
        if rows.numel():  # exact ties: order those rows by (-value, rank of the prefix path)
            prev_rank = self._rank(len(self.layers) - 1).reshape(-1)
            Fr = torch.arange(K).expand(rows.numel(), K) if F is None else F[rows]
            R = torch.where(Fr >= 0, prev_rank[Fr.clamp_min(0)], _BIG)
            ro = torch.argsort(R, dim=1, stable=True)
            s = torch.sort(V[rows].gather(1, ro), dim=1, descending=True, stable=True).indices
            ti = ti.clone()
            ti[rows] = ro.gather(1, s)[:, :mt]
            tv = V.gather(1, ti)
        return tv, (ti if F is None else F.gather(1, ti))

    # ---------------------------------------------------------------- result
    def paths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logw [M], nodes [M, L])`` of the sink's list (finite entries only)."""
        last = self.layers[-1]
        keep = torch.isfinite(last.val[0])
        logw = last.val[0][keep]
        flat = last.parent[0][keep]
        L = len(self.layers) - 2  # minus the virtual source and the sink
        nodes = torch.empty(logw.numel(), L, dtype=torch.long)
        for li in range(L, 0, -1):
            lay = self.layers[li]
            w = lay.val.shape[1]
            nodes[:, li - 1] = flat // w
            flat = lay.parent.reshape(-1)[flat]
        return logw, nodes


def topm_paths(source: torch.Tensor, edges: list[torch.Tensor], sink: torch.Tensor,
               m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` best paths of the layered DAG, best first: ``(logw [M], nodes [M, L])``, ``M <= m``.

    ``source [n_0]``, ``edges[l] [n_l, n_{l+1}]``, ``sink [n_{L-1}]`` are log-weights (``-inf`` = absent);
    fewer than ``m`` paths come back when fewer finite ones exist."""
    if int(m) != m or m < 1:
        raise ValueError(f"m={m} must be a positive integer (number of paths to keep)")
    dims = [source.numel()] + [e.shape[1] for e in edges]
    for li, e in enumerate(edges):
        if e.dim() != 2 or e.shape[0] != dims[li]:
            raise ValueError(f"edges[{li}] has shape {tuple(e.shape)}, expected [{dims[li]}, n_{li + 1}]")
    if sink.numel() != dims[-1]:
        raise ValueError(f"sink has {sink.numel()} entries, expected {dims[-1]} (nodes of the last layer)")
    with one_thread():
        named = [("source", source), ("sink", sink)] + [(f"edges[{i}]", e) for i, e in enumerate(edges)]
        for name, t in named:
            if bool((torch.isnan(t) | (t == float("inf"))).any()):
                raise ValueError(f"{name} holds NaN or +inf; log-weights must be finite or -inf (= absent)")
        dp = _DP(int(m))
        dp.step(source.to(torch.float64).reshape(1, -1))
        for e in edges:
            dp.step(e.to(torch.float64))
        dp.step(sink.to(torch.float64).reshape(-1, 1))
        return dp.paths()


@contextmanager
def one_thread():
    """Run on one intra-op thread: the DP's tensors are small (~E*m), and on a busy machine extra
    threads spin in barriers (measured 12x slower with 2 threads on 2 shared cores). Restores the
    caller's setting; a no-op when already single-threaded (nested use)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def unique_paths(source: torch.Tensor, edges: list[torch.Tensor], sink: torch.Tensor, m: int,
                 layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``unique_paths`` mode: ``m`` times {best path; remove its nodes}; node weights stay as
    they are (no re-normalisation). Only nodes of DAG ``layers`` are removed (default all; Pathfinder
    passes its expert layers so the single-node router hubs stay). Stops early when no path is left."""
    source = source.to(torch.float64).clone()
    edges = [e.to(torch.float64).clone() for e in edges]
    layers = list(range(len(edges) + 1)) if layers is None else layers
    ws, ps = [], []
    for _ in range(int(m)):
        w, p = topm_paths(source, edges, sink, 1)
        if not w.numel():
            break
        ws.append(w)
        ps.append(p)
        for li in layers:
            j = int(p[0, li])
            if li == 0:
                source[j] = NEG
            else:
                edges[li - 1][:, j] = NEG
    if not ws:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, len(edges) + 1, dtype=torch.long)
    return torch.cat(ws), torch.cat(ps)
