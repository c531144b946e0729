"""NAEE expert pruning by enumeration ("Not All Experts are Equal", Lu et al., ACL 2024, arXiv 2402.14800).

For each MoE layer every keep set ``K`` of size ``r`` (drop set of size ``E - r``) is scored on the cached
calibration tokens: route them with only ``K`` available, reconstruct the routed output
``Y'_t = sum_{j in topk'(t)} g'_{j,t} f_j(x_t)`` from ``recon_expert_out [T, E, H]`` and, as the reference
(Lucky-Lance/Expert_Sparsity ``enumerate``), sum over calibration batches ``b`` (``recon_batch``) the
per-batch Frobenius norms ``loss(K) = sum_b ||Y_b - Y'_b||_F`` (float64) against ``recon_target [T, H]``;
the argmin is kept (the first keep set in lexicographic order on ties). ``loss="pooled"`` instead takes one
norm over all cached tokens (moeprune's former loss; same argmin only with one batch). observe caches every
token by default (the reference's choice); a token subsample (``recon_tokens``, or the ``recon_max_gb``
memory bound) is recorded in ``stats.meta["recon"]`` and copied into ``plan.meta["recon_cache"]``.

Online (the default of ``run`` / ``oneshot``, ``calibration.recon_mode``): ``online_spec`` fixes the keep
sets before calibration and observe accumulates each one's loss over every token (feature ``naee_online``,
no cache, ``observe/accumulators_naee.py``); ``plan`` then reads those totals. Both paths use the maths of
``observe/recon_math.py``; ``plan.meta["recon_path"]`` says which one ran.

Routing simulation (``stats.meta["router"][l]`` and ``["n_group"][l]``), equal to pruning the router rows:
``softmax`` routers take the softmax over the kept logits (dropped = -inf), ``sigmoid`` routers keep the
kept experts' sigmoids, ``probs`` routers (already softmax probabilities) are renormalised over the kept
set (= softmax of log p); group-limited routers first keep the ``topk_group`` best groups (group score:
sum of the top-2 scores for sigmoid routers as in DeepSeek-V3, the maximum for softmax routers as in
DeepSeek-V2); then top-k, ``renormalize``, ``scale``; ``gate_on_input`` routers (Llama-4) weigh outputs by 1
(the gate is inside ``f``). Router columns beyond the E real experts (LongCat's zero experts) stay
routable but add nothing to ``Y'``. Selection-only biases (``e_score_correction_bias``, saved by observe as
``selection_bias``) shift the choice of experts and groups but not the weights. Routers whose logic is not
reproduced exactly (PhiMoE's sparsemixer) are approximated; LongCat's identity experts add their gate
times the block input (``recon_input``). Approximations are reported: ``plan.meta["recon_fidelity"]`` holds, per
layer, ``||Y - Y'_all|| / ||Y||`` with every expert kept (0 when the simulation is exact) and a warning is
logged above ``fidelity_tol``. Group-limited layers only enumerate group-balanced keep sets.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm.auto import tqdm

from moeprune.methods.allocation import balanced_splits, build_plan, group_layout
from moeprune.methods.registry import MethodConfig, register_method
from moeprune.methods.target import layer_meta, layer_top_k
from moeprune.observe.accumulators_naee import NaeeLayerSpec
from moeprune.observe.recon_math import TOKEN_SLICE, candidate_sq_errors, extended_outputs, route

__all__ = ["NAEE", "keep_sets", "n_keep_sets", "reconstruction_loss_fn", "route"]

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan

logger = logging.getLogger(__name__)


LOSSES = ("batch_sum", "pooled")


def batch_index(stats: ExpertStats, layer: int) -> tuple[torch.Tensor, int]:
    """``[T]`` dense batch ids (0..B-1) of the cached tokens and B; statistics saved before ``recon_batch``
    existed count as one batch."""
    b = stats.layers[layer].get("recon_batch")
    n = stats.get(layer, "recon_target").shape[0]
    if b is None:
        return torch.zeros(n, dtype=torch.long), 1
    uniq, inv = torch.unique(b.long(), return_inverse=True)
    return inv, int(uniq.numel())


def batch_sq_errors(stats: ExpertStats, layer: int, keeps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full [B], errors [C, B])`` float64 ``||Y_b - Y'_b||_F^2`` per calibration batch with every expert
    kept and with only each of the C keep sets ``keeps`` routable (``recon_math.candidate_sq_errors``, the
    maths ``naee_online`` runs during observe)."""
    logits = stats.get(layer, "recon_logits")  # [T, E_router]
    out = stats.get(layer, "recon_expert_out")  # [T, E, H], float32 (float64 models: float64)
    target = stats.get(layer, "recon_target")  # [T, H]
    bid, nb = batch_index(stats, layer)  # [T]
    top_k, router = layer_top_k(stats, layer), layer_meta(stats, "router", layer, {})
    groups = group_layout(stats, layer)
    x = stats.layers[layer].get("recon_input")  # [T, H], only with identity experts
    bias = stats.layers[layer].get("selection_bias")  # absent in statistics saved before it existed
    if bias is not None:
        bias = torch.where(torch.isfinite(bias), bias, torch.zeros_like(bias)).double()
    E, T, width = out.shape[1], out.shape[0], logits.shape[1]
    masks = torch.zeros(len(keeps), E, dtype=torch.bool)
    for c, keep in enumerate(keeps):
        masks[c, list(keep)] = True
    full, sq = torch.zeros(nb, dtype=torch.float64), torch.zeros(len(keeps), nb, dtype=torch.float64)
    for lo in range(0, T, TOKEN_SLICE):  # float64 per slice: the cache stays float32
        sl = slice(lo, lo + TOKEN_SLICE)
        f = extended_outputs(out[sl], None if x is None else x[sl], width)  # [t, E_router, H]
        f_sq, err = candidate_sq_errors(f, target[sl], logits[sl], masks, top_k, router, groups, bias)
        full.index_add_(0, bid[sl], f_sq)
        sq.index_add_(1, bid[sl], err)
    return full, sq


def batch_sq_error_fn(stats: ExpertStats, layer: int):
    """``keep -> [B]`` float64 ``||Y_b - Y'_b||_F^2`` per calibration batch when only ``keep`` is routable."""
    return lambda keep: batch_sq_errors(stats, layer, [keep])[1][0]


def reduce_loss(sq: torch.Tensor, loss: str = "batch_sum") -> torch.Tensor:
    """``[..., B]`` per-batch squared errors -> ``[...]`` loss: ``batch_sum`` = ``sum_b ||Y_b - Y'_b||_F``
    (the reference), ``pooled`` = ``||Y - Y'||_F`` over all tokens."""
    if loss not in LOSSES:
        raise ValueError(f"naee loss={loss!r}; choose one of {list(LOSSES)}")
    return sq.sum(-1).sqrt() if loss == "pooled" else sq.sqrt().sum(-1)


def reconstruction_loss_fn(stats: ExpertStats, layer: int, loss: str = "batch_sum"):
    """``keep -> loss`` on the cached tokens of ``layer`` when only ``keep`` is routable (``reduce_loss``)."""
    reduce_loss(torch.zeros(1), loss)  # a bad name fails now
    return lambda keep: float(reduce_loss(batch_sq_error_fn(stats, layer)(keep), loss))


def keep_sets(E: int, r: int, groups: tuple[int, int] | None, top_k: int):
    """All keep sets of size r (lexicographic); group-balanced ones only for group-limited routers."""
    if groups is None:
        yield from itertools.combinations(range(E), r)
        return
    ng, tg = groups
    gsz = E // ng
    for m, c in balanced_splits(E, ng, tg, top_k, r):
        for gs in itertools.combinations(range(ng), m):
            per_group = (itertools.combinations(range(g * gsz, (g + 1) * gsz), c) for g in gs)
            for parts in itertools.product(*per_group):
                yield tuple(e for p in parts for e in p)


def n_keep_sets(E: int, r: int, groups: tuple[int, int] | None, top_k: int) -> int:
    """How many keep sets ``keep_sets`` yields."""
    if groups is None:
        return math.comb(E, r)
    ng, tg = groups
    return sum(math.comb(ng, m) * math.comb(E // ng, c) ** m for m, c in balanced_splits(E, ng, tg, top_k, r))


@register_method("naee")
@dataclass(frozen=True)
class NAEE(MethodConfig):
    """Layer-wise exhaustive search of the keep set minimising the block-output reconstruction error.

    ``loss``: ``batch_sum`` (default, the reference: sum of per-batch Frobenius norms) or ``pooled`` (one
    norm over every cached token)."""

    max_combinations: int = 5000
    fidelity_tol: float = 1e-3
    progress: bool = True
    loss: str = "batch_sum"

    needs: ClassVar[tuple[str, ...]] = ("routed", "reconstruction")

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"naee loss={self.loss!r}; choose one of {list(LOSSES)} (batch_sum = the reference)")
        if int(self.max_combinations) != self.max_combinations or self.max_combinations < 1:
            raise ValueError(f"max_combinations={self.max_combinations} must be a positive integer")

    def _layer_sizes(self, stats: ExpertStats, target: Target) -> dict[int, tuple[int, int, int, Any, int]]:
        """``{layer: (E, r, top_k, groups, n keep sets)}`` of the target, every limit checked (no statistic read)."""
        if target.allocation == "global":
            raise ValueError(
                "naee enumerates keep sets layer by layer with a fixed count; use allocation='uniform' "
                "(or 'method'), or a scoring method (e.g. reap) for global allocation"
            )
        budget = target.resolve(stats)
        out = {}
        for li in stats.moe_layers:
            E, r, k = budget.num_experts[li], budget.uniform_keep[li], budget.top_k[li]
            groups = group_layout(stats, li)
            n = n_keep_sets(E, r, groups, k)
            if n == 0:
                raise ValueError(f"layer {li}: no group-balanced keep set of {r} experts exists; change the target")
            if n > self.max_combinations:
                raise ValueError(
                    f"naee: layer {li} needs C({E}, {r}) = {n} reconstructions, above "
                    f"max_combinations={self.max_combinations}; raise max_combinations or use a "
                    "scoring method (reap, man, easyep) for models with many experts"
                )
            out[li] = (E, r, k, groups, n)
        return out

    def online_spec(self, stats: ExpertStats, target: Target) -> dict[int, NaeeLayerSpec]:
        """The candidates ``naee_online`` scores during observe, from ``stats`` holding only the model's
        metadata (before calibration): the keep sets ``plan`` would enumerate, in its order. Raises
        ``ValueError`` (with the reason) where enumeration is not possible."""
        specs = {}
        for li, (E, r, k, groups, n) in self._layer_sizes(stats, target).items():
            cand = torch.tensor(list(keep_sets(E, r, groups, k)), dtype=torch.int64).reshape(n, r)
            specs[li] = NaeeLayerSpec(keep=r, candidates=cand, top_k=layer_top_k(stats, li),
                                      router=dict(layer_meta(stats, "router", li, {})), groups=groups)
        return specs

    def _online_losses(self, stats: ExpertStats, li: int, r: int, n: int) -> tuple[torch.Tensor, float]:
        """``([n] losses, fidelity)`` of layer ``li`` from ``naee_online`` statistics (scored during observe)."""
        have = layer_meta(stats, "naee_online", li, {})
        if have.get("keep") != r or have.get("candidates") != n:
            raise ValueError(
                f"naee: layer {li}: the statistics scored online the keep sets of {have.get('keep')} experts "
                f"({have.get('candidates')} candidates) but this target keeps {r} ({n} candidates); calibrate "
                "again with this target, or with calibration.recon_mode=cache (a token cache, any target)"
            )
        d = stats.layers[li]
        fid = float(d["naee_full_sq"].sqrt()) / max(float(d["naee_target_sq"].sqrt()), 1e-300)
        if self.loss == "pooled":  # one norm over every token: sqrt of the summed per-batch squares
            return stats.get(li, "naee_sq").double().sqrt(), fid
        return stats.get(li, "naee_loss").double(), fid

    def _cached_losses(self, stats: ExpertStats, li: int, ks: list) -> tuple[torch.Tensor, float]:
        """``([n] losses, fidelity)`` of the keep sets ``ks`` on the cached tokens of layer ``li``."""
        full, sq = batch_sq_errors(stats, li, ks)  # [B], [n, B]
        ynorm = float(torch.linalg.norm(stats.get(li, "recon_target").double()))
        return reduce_loss(sq, self.loss), float(full.sum().sqrt()) / max(ynorm, 1e-300)

    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        keep, scores, losses, fidelity = {}, {}, {}, {}
        sizes = self._layer_sizes(stats, target)
        for li in tqdm(sizes, desc="naee layers", disable=not self.progress):
            E, r, k, groups, n = sizes[li]
            ks = list(keep_sets(E, r, groups, k))
            online = "naee_loss" in stats.layers[li]
            loss, fidelity[str(li)] = (self._online_losses(stats, li, r, n) if online
                                       else self._cached_losses(stats, li, ks))
            if fidelity[str(li)] > self.fidelity_tol:
                logger.warning(
                    "naee layer %d: the routing simulation misses the observed routed output by %.3g (relative) "
                    "with every expert kept (selection bias or an unsupported router); losses are approximate",
                    li, fidelity[str(li)])
            best = int(torch.argmin(loss))  # the first minimum: lexicographic order on ties
            keep[li], losses[str(li)] = list(ks[best]), float(loss[best])
            # score = -(smallest loss of any keep set containing the expert): kept experts score highest
            seen = torch.full((E,), math.inf, dtype=torch.float64).scatter_reduce(
                0, torch.tensor(ks, dtype=torch.int64).reshape(-1), loss.repeat_interleave(r), "amin")
            fin = seen[torch.isfinite(seen)]
            scores[li] = -torch.where(torch.isfinite(seen), seen, fin.max() if fin.numel() else 0.0)
        meta = {"allocation": "uniform", "recon_loss": losses, "recon_fidelity": fidelity,
                "recon_cache": stats.meta.get("recon"),  # tokens cached, memory bound, estimate (None: unknown)
                "recon_path": "online" if "naee_online" in stats.meta else "cache",
                "recon_mode": stats.meta.get("recon_path")}  # calibrate's choice and why (None: observed directly)
        if (stats.meta.get("recon") or {}).get("subsampled"):
            logger.warning("naee: statistics cache a token subsample (%s), not every token as the reference",
                           stats.meta["recon"])
        return build_plan(
            stats, keep, target, method=self.name, method_config=self.to_dict(), scores=scores, meta=meta
        )
