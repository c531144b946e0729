"""NAEE's routing-restricted reconstruction maths, the ONE definition both paths use: the cache path
(``methods/naee.py`` on ``reconstruction`` statistics) and the online path (``accumulators_naee.py``, every
candidate keep set scored during observe).

``route_topk`` routes tokens with only a keep set of experts available (any leading batch of keep sets);
``candidate_sq_errors`` turns them into per-token squared errors ``||Y_t - Y'_t||^2`` (float64) of many keep
sets at once;
``expert_output_chunks`` runs every expert on the tokens in the token chunks both paths share, so that the
online losses and the cache's losses come from bitwise the same expert outputs.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from moeprune.observe.accumulators import CHUNK_ELEMENTS, fp

PAIR_ELEMENTS = 1 << 22  # float64 [candidates, tokens, 2k, 2k] Gram entries per step (32 MiB)
TOKEN_SLICE = 512  # tokens scored together (their Gram matrices: [512, E_router, E_router] float64)


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
    kind = router.get("score", "softmax")
    lg = logits.double()
    if kind == "probs":
        lg, kind = lg.clamp_min(1e-300).log(), "softmax"
    fast = None
    if kind == "softmax" and groups is None and (bias is None or not bool(bias.any())):
        fast = _softmax_route(lg, keep, top_k, bool(router.get("renormalize", True)))
    if fast is not None:
        idx, w = fast
        return idx, _gate_tail(w, router, kind)
    keep = keep.unsqueeze(-2)  # [..., 1, E_r]
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
    if router.get("renormalize", True) and not router.get("gate_on_input"):
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if kind == "sigmoid" else 0.0))
    return idx, _gate_tail(w, router, kind)


def _gate_tail(w: torch.Tensor, router: dict[str, Any], kind: str) -> torch.Tensor:
    """Gate-on-input routers weigh outputs by 1 (the gate is inside ``f``); others by ``scale`` x weight."""
    return torch.ones_like(w) if router.get("gate_on_input") else w * float(router.get("scale", 1.0))


def _softmax_route(lg: torch.Tensor, keep: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Softmax routers without groups or selection bias, the same choice and weights as the general path at
    a fraction of its cost for many keep sets: the softmax is monotone, so the top-k of the kept experts are
    the first ``k`` kept ones in the token's logit order (sorted once per token, ties: lower id first), and
    their weights are ``e_j / sum_chosen e`` (renormalised) or ``e_j / sum_kept e`` with
    ``e = exp(logit - max logit)`` ``[T, E_r]`` computed once. None (use the general path) when a keep set
    has fewer than ``k`` experts or the weights under/overflow."""
    if int(keep.sum(-1).min()) < top_k:
        return None
    order = torch.argsort(lg, dim=-1, descending=True, stable=True)  # [T, E_r]
    kept = keep[..., order]  # [..., T, E_r]: kept flags in the token's logit order
    first = kept & (kept.cumsum(-1) <= top_k)  # exactly k per row
    pos = first.nonzero()[:, -1].reshape(*first.shape[:-1], top_k)  # [..., T, k], ascending = best first
    idx = order.expand(first.shape).gather(-1, pos)
    e = torch.exp(lg - lg.amax(-1, keepdim=True))  # [T, E_r]
    ei = e.expand(first.shape).gather(-1, idx)  # [..., T, k]
    den = ei.sum(-1, keepdim=True) if renormalize else (keep.double() @ e.T).unsqueeze(-1)  # [..., T, 1]
    w = ei / den
    return (idx, w) if bool(torch.isfinite(w).all()) and bool((den > 0).all()) else None


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


def candidate_sq_errors(f: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor,
                        top_k: int, router: dict[str, Any], groups: tuple[int, int] | None = None,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full [T], errors [C, T])`` float64 per-token ``||Y_t - Y'_t||^2`` with every expert kept and with
    only keep set ``masks[c]`` (bool ``[C, E]``) routable, for ``f [T, E_router, H]`` (float64, every expert's
    output, ``extended_outputs``), ``target [T, H]``, ``logits [T, E_router]``.

    Exact rewriting, not an approximation: with ``a_t`` the every-expert reconstruction (summed directly),
    ``r_t = Y_t - a_t`` and ``d = w_all - w_c`` the dense gate difference (0 exactly where the keep set
    routes the token as the full router does),
    ``||Y_t - Y'_t||^2 = ||r_t||^2 + 2 sum_e d_e <r_t, f_e> + sum_{e,l} d_e d_l <f_e, f_l>`` over the at most
    2k experts where ``d`` is nonzero. The token's Gram matrix is computed once for all C keep sets, so a keep
    set costs ``(2k)^2`` per token instead of ``k H``; tokens it routes like the full router get exactly
    ``||r_t||^2``, and every other term is of the size of the change, so no cancellation against
    ``||Y_t||^2`` occurs."""
    T, width, _ = f.shape
    full = masks.new_ones(1, masks.shape[-1])
    idx0, w0 = route_topk(logits, full, top_k, router, groups, bias)  # [1, T, k]
    idx0, w0 = idx0[0], w0[0]
    rows = torch.arange(T, device=f.device)
    r0 = target.double() - (w0[..., None] * f[rows[:, None], idx0]).sum(1)  # [T, H]
    r0sq = r0.pow(2).sum(-1)  # [T]
    rf = torch.bmm(f, r0[:, :, None])[..., 0]  # [T, E_r] <f_e, r_t>
    gram = torch.bmm(f, f.transpose(1, 2)).reshape(T, width * width)  # [T, E_r^2] <f_e, f_l>
    out = torch.empty(masks.shape[0], T, dtype=torch.float64, device=f.device)
    step = max(1, PAIR_ELEMENTS // max(1, T * 4 * top_k * top_k))
    for c0 in range(0, masks.shape[0], step):
        idx, w = route_topk(logits, masks[c0:c0 + step], top_k, router, groups, bias)  # [c, T, k]
        # d = w_all - w_c on the union of both supports; an expert chosen by both gets w0 - w exactly (0 when
        # equal), so a token routed as by the full router contributes exactly ||r_t||^2
        same = idx[..., :, None] == idx0[:, None, :]  # [c, T, k (chosen), k (full)]
        d = torch.cat([w0 - (same * w[..., :, None]).sum(-2), -w * ~same.any(-1)], -1)  # [c, T, 2k]
        j = torch.cat([idx0.expand(idx.shape), idx], -1)  # [c, T, 2k] expert of each coefficient
        lin = (d * rf.expand(*j.shape[:-1], width).gather(-1, j)).sum(-1)  # [c, T]
        pair = (j[..., :, None] * width + j[..., None, :]).flatten(-2)  # [c, T, 4k^2]
        g = gram.expand(*j.shape[:-1], width * width).gather(-1, pair).view(*j.shape, j.shape[-1])
        quad = (d[..., :, None] * g * d[..., None, :]).sum((-1, -2))  # [c, T]
        out[c0:c0 + step] = (r0sq + 2 * lin + quad).clamp_min(0)
    return r0sq, out


def expert_output_chunks(bank, x: torch.Tensor, logits: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(token slice, [n, E, H])``: every expert on the rows ``x [T, H]`` in chunks of at most
    ``CHUNK_ELEMENTS`` outputs, in working precision (float32; float64 for float64 models)."""
    T = x.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, bank.num_experts * x.shape[1]))
    for lo in range(0, T, step):
        s = slice(lo, min(T, lo + step))
        yield s, fp(bank.all_outputs(x[s], logits[s]))
