"""NAEE's routing-restricted reconstruction maths, the ONE definition both paths use: the cache path
(``methods/naee.py`` on ``reconstruction`` statistics) and the online path (``accumulators_naee.py``, every
candidate keep set scored during observe).

``route_topk`` routes tokens with only a keep set of experts available (any leading batch of keep sets);
``sq_errors`` turns the chosen experts' outputs into per-token squared errors ``||Y_t - Y'_t||^2`` (float64);
``expert_output_chunks`` runs every expert on the tokens in the token chunks both paths share, so that the
online losses and the cache's losses come from bitwise the same expert outputs.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from moeprune.observe.accumulators import CHUNK_ELEMENTS, fp

PAIR_ELEMENTS = 1 << 22  # float64 [candidates, tokens, k, H] working set of ``sq_errors`` (32 MiB)


def route_topk(logits: torch.Tensor, keep: torch.Tensor, top_k: int, router: dict[str, Any],
               groups: tuple[int, int] | None = None,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [..., T, k], w [..., T, k] float64)``: the experts chosen for ``logits [T, E_router]`` with only
    ``keep`` (bool ``[..., E]``, e.g. ``[C, E]`` for C keep sets) available, and their gate weights.

    Columns past ``E`` are LongCat's identity experts (never pruned). ``bias [E_router]``: selection-only
    bias (DeepSeek-V3 ``e_score_correction_bias`` and kin), added to the scores to choose the top-k and the
    groups; the weights are the unbiased scores of the chosen experts."""
    E = keep.shape[-1]
    if logits.shape[-1] > E:  # extra router columns (zero experts) are never pruned
        keep = torch.cat([keep, keep.new_ones(*keep.shape[:-1], logits.shape[-1] - E)], -1)
    keep = keep.unsqueeze(-2)  # [..., 1, E_r]
    kind = router.get("score", "softmax")
    lg = logits.double()
    if kind == "probs":
        lg, kind = lg.clamp_min(1e-300).log(), "softmax"
    if kind == "softmax":
        p = torch.softmax(lg.masked_fill(~keep, float("-inf")), dim=-1)  # [..., T, E_r], 0 on dropped experts
    elif kind == "sigmoid":
        p = torch.sigmoid(lg)  # [T, E_r]
    else:
        raise ValueError(f"unknown router score {kind!r}; expected softmax, sigmoid or probs")
    sel = p if bias is None else p + bias.to(p)  # selection scores
    sel = sel.masked_fill(~keep, float("-inf"))  # [..., T, E_r]
    if groups is not None:
        ng, tg = groups
        g = sel[..., :E].reshape(*sel.shape[:-1], ng, E // ng)  # [..., T, G, E/G]
        gscore = g.topk(2, dim=-1).values.sum(-1) if kind == "sigmoid" and E // ng >= 2 else g.amax(-1)
        chosen = torch.zeros_like(gscore, dtype=torch.bool).scatter(-1, gscore.topk(min(tg, ng), -1).indices, True)
        real = sel[..., :E].masked_fill(~chosen.repeat_interleave(E // ng, dim=-1), float("-inf"))
        sel = torch.cat([real, sel[..., E:]], -1)
    idx = sel.topk(top_k, dim=-1).indices  # [..., T, k]
    w = p.expand(sel.shape).gather(-1, idx)
    if router.get("gate_on_input"):
        w = torch.ones_like(w)
    else:
        if router.get("renormalize", True):
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if kind == "sigmoid" else 0.0))
        w = w * float(router.get("scale", 1.0))
    return idx, w


def route(logits: torch.Tensor, keep: torch.Tensor, top_k: int, router: dict[str, Any],
          groups: tuple[int, int] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense gate weights ``[..., T, E_router]`` (float64) of :func:`route_topk`; 0 on unchosen experts."""
    idx, w = route_topk(logits, keep, top_k, router, groups, bias)
    shape = (*idx.shape[:-1], logits.shape[-1])
    return torch.zeros(shape, dtype=torch.float64, device=logits.device).scatter(-1, idx, w)


def extended_outputs(out: torch.Tensor, x: torch.Tensor | None, router_width: int) -> torch.Tensor:
    """``[T, E_router, H]`` float64: every expert's output ``out [T, E, H]``, then LongCat's identity experts
    (their output is the block input ``x [T, H]``)."""
    f = out.double()
    extra = router_width - f.shape[1]
    if extra > 0:
        if x is None:
            raise ValueError(f"{extra} identity experts need the block input (recon_input)")
        f = torch.cat([f, x.double()[:, None, :].expand(-1, extra, -1)], 1)
    return f


def sq_errors(f: torch.Tensor, target: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[C, T]`` float64 ``||Y_t - sum_j w_{c,t,j} f_{t, idx_{c,t,j}}||^2`` for ``f [T, E_router, H]``
    (float64), ``target [T, H]``, ``idx`` / ``w [C, T, k]`` (C keep sets routed at once)."""
    C, T, k = idx.shape
    H = f.shape[-1]
    y = target.double()
    out = torch.empty(C, T, dtype=torch.float64, device=f.device)
    step = max(1, PAIR_ELEMENTS // max(1, C * k * H))  # tokens per slice of the [C, t, k, H] gather
    rows = torch.arange(T, device=f.device)
    for lo in range(0, T, step):
        s = slice(lo, lo + step)
        picked = f[rows[s, None], idx[:, s]]  # [C, t, k, H]
        approx = torch.einsum("ctk,ctkh->cth", w[:, s], picked)  # [C, t, H]
        out[:, s] = (y[s] - approx).pow(2).sum(-1)
    return out


def expert_output_chunks(bank, x: torch.Tensor, logits: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(token slice, [n, E, H])``: every expert on the rows ``x [T, H]`` in chunks of at most
    ``CHUNK_ELEMENTS`` outputs, in working precision (float32; float64 for float64 models)."""
    T = x.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, bank.num_experts * x.shape[1]))
    for lo in range(0, T, step):
        s = slice(lo, min(T, lo + step))
        yield s, fp(bank.all_outputs(x[s], logits[s]))
