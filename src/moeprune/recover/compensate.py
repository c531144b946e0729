"""``compensate``: closed-form ridge least squares so the pruned layer matches the unpruned routed output.

Target ``T [N, H]``: the unpruned routed output on the captured tokens (shared experts are the same in
both models and cancel). The pruned layer computes ``Y(x) = sum_{e in sel'(x)} w'_e(x) f_e(x)`` with the
pruned routing ``sel', w'`` (router restricted to the kept rows). All maths in float64.

* ``scale``: ``min_s ||T - sum_e s_e F_e||^2 + lam ||s - 1||^2`` with ``F_e = w'_e f_e`` (zero where
  ``e`` is not selected), jointly over the kept experts; ``lam = ridge * trace(G) / K``.
  ``s_e`` multiplies expert ``e``'s down projection (and down bias), which is exactly ``s_e f_e``.
* ``down``: one block-coordinate sweep over the kept experts in id order. For expert ``e`` on its ``n``
  routed tokens, ``A = w'_e h_e [n, c]`` (``h_e`` its intermediate activation on its kept channels ``c``),
  ``R = T - (Y - w'_e f_e) - w'_e b_e [n, H]``; ``W^T = (A^T A + lam I)^{-1} (A^T R + lam W_0^T)``,
  ``lam = ridge * trace(A^T A) / c`` (shrinks toward the current weights; ``ridge -> inf`` is plain
  pruning). ``Y`` is updated with the new contribution before the next expert. Neuron plans (TENP) fit
  the kept channels only (the others are removed by apply).
"""
from __future__ import annotations

import torch

from moeprune.observe.experts import ExpertBank
from moeprune.plan import PruningPlan
from moeprune.recover.config import CompensateConfig
from moeprune.recover.routed import Routed


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """``(gram + lam I)^{-1} rhs`` in float64; least squares (minimum norm) when that is singular."""
    a = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    try:
        return torch.linalg.solve(a, rhs)
    except RuntimeError:  # singular (lam = 0 and too few tokens): the minimum-norm solution
        return torch.linalg.lstsq(a, rhs, driver="gelsd").solution


def fit_scales(pruned: Routed, target: torch.Tensor, keep: list[int], ridge: float) -> torch.Tensor:
    """``s [K]`` (float64) for the kept experts ``keep`` (sorted ids), see the module docstring."""
    k_ = len(keep)
    pos = torch.full((int(max(keep)) + 1,), -1, dtype=torch.long)
    pos[torch.as_tensor(keep)] = torch.arange(k_)
    p = pos[pruned.idx]  # [N, k] compact positions
    c = pruned.w.unsqueeze(-1) * pruned.f.double()  # [N, k, H] gated slot outputs
    gram = torch.zeros(k_, k_, dtype=torch.float64)
    gram.index_put_((p.unsqueeze(2).expand(-1, -1, p.shape[1]), p.unsqueeze(1).expand(-1, p.shape[1], -1)),
                    torch.einsum("nkh,njh->nkj", c, c), accumulate=True)
    rhs = torch.zeros(k_, dtype=torch.float64).index_add_(0, p.reshape(-1),
                                                          torch.einsum("nkh,nh->nk", c, target).reshape(-1))
    empty = gram.diagonal() == 0  # an expert no captured token reaches keeps scale 1
    gram[empty, empty] = 1.0
    rhs[empty] = 1.0
    lam = ridge * float(gram.trace()) / k_
    return ridge_solve(gram, (rhs + lam).unsqueeze(1), lam).squeeze(1)


@torch.no_grad()
def write_scales(bank: ExpertBank, keep: list[int], s: torch.Tensor) -> None:
    """Multiply each kept expert's down projection (and down bias) by its scale, in the model dtype."""
    for e, v in zip(keep, s.tolist()):
        d = bank.down_weight(e)
        d.copy_((d.double() * v).to(d.dtype))
        if bank.has_bias:
            b = bank.experts.down_proj_bias[e]
            b.copy_((b.double() * v).to(b.dtype))


def _expert_down(bank: ExpertBank, e: int, pruned: Routed, y: torch.Tensor,
                 target: torch.Tensor, ch: torch.Tensor, ridge: float) -> tuple[torch.Tensor, int]:
    """New ``W [H, c]`` of expert ``e`` on its kept channels ``ch``; updates ``y [N, H]`` in place."""
    tok, slot = torch.nonzero(pruned.idx == e, as_tuple=True)
    w0 = bank.down_weight(e).double()[:, ch]  # [H, c]
    if tok.numel() == 0:
        return w0, 0
    g = pruned.w[tok, slot].unsqueeze(1)  # [n, 1]
    _, h = bank.expert_forward(e, pruned.xin[tok], want_inter=True)
    a = g * h.double()[:, ch]  # [n, c]
    bias = g * bank.experts.down_proj_bias[e].double() if bank.has_bias else 0.0
    own = g * pruned.f[tok, slot].double()  # [n, H] current contribution of e
    r = target[tok] - (y[tok] - own) - bias  # [n, H]
    gram = a.T @ a  # [c, c]
    lam = ridge * float(gram.trace()) / max(len(ch), 1)
    wt = ridge_solve(gram, a.T @ r + lam * w0.T, lam)  # [c, H]
    y[tok] += a @ (wt - w0.T)
    return wt.T, int(tok.numel())


@torch.no_grad()
def fit_down(bank: ExpertBank, plan: PruningPlan, pruned: Routed, target: torch.Tensor,
             ridge: float) -> dict[int, int]:
    """Refit each kept expert's down projection (kept channels); returns tokens per expert."""
    lp = plan.layers[bank.layer]
    inter = int(bank.down_weight(lp.keep[0]).shape[1])
    y = pruned.y.clone()
    counts = {}
    for e in lp.keep:  # h_e does not depend on any down projection, so each write can follow its fit
        ch = torch.as_tensor((lp.neurons or {}).get(e, range(inter)), dtype=torch.long)
        w, counts[e] = _expert_down(bank, e, pruned, y, target, ch, ridge)
        d = bank.down_weight(e)
        d[:, ch] = w.to(d.dtype)
    return counts


def compensate_layer(bank: ExpertBank, plan: PruningPlan, target: torch.Tensor, pruned: Routed,
                     cfg: CompensateConfig) -> dict:
    """Fit one layer in place; the record holds the fitted values."""
    keep = list(plan.layers[bank.layer].keep)
    if cfg.target == "scale":
        s = fit_scales(pruned, target, keep, cfg.ridge)
        write_scales(bank, keep, s)
        return {"scales": {str(e): round(float(v), 6) for e, v in zip(keep, s.tolist())}}
    counts = fit_down(bank, plan, pruned, target, cfg.ridge)
    return {"tokens_per_expert": {str(e): n for e, n in counts.items()}}
