"""How many tokens the ``reconstruction`` feature (NAEE) caches, decided BEFORE calibration starts.

The reference (Expert_Sparsity) caches every calibration token of every MoE layer. moeprune caches, per
token and MoE layer, the router logits ``[E_router]``, every expert's output ``[E, H]``, the routed output
``[H]`` (+ the block input ``[H]`` with identity experts) and the batch id, in float32 (float64 for float64
models). ``plan_recon_cache`` estimates that size from the batches and the model; above ``max_gb`` it warns
and keeps a seeded subsample of ``k`` tokens per batch, the largest ``k`` that fits. The decision (and why)
is recorded in ``ExpertStats.meta["recon"]`` and copied by NAEE into ``plan.meta["recon_cache"]``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_GB = 4.0
GB = 1e9


def check_recon_options(tokens_per_batch: int | None, max_gb: float | None) -> None:
    """Clear errors for bad values, before any work."""
    if tokens_per_batch is not None and (isinstance(tokens_per_batch, bool) or int(tokens_per_batch) != tokens_per_batch
                                         or tokens_per_batch < 1):
        raise ValueError(f"recon_tokens={tokens_per_batch!r} must be a positive integer (tokens cached per batch) "
                         "or None (every token, as the NAEE reference)")
    if max_gb is not None and not (isinstance(max_gb, (int, float)) and max_gb > 0):
        raise ValueError(f"recon_max_gb={max_gb!r} must be a number > 0 (GB of the NAEE cache) or None (no bound)")


@dataclass(frozen=True)
class ReconCachePlan:
    """The cache decision: ``tokens_per_batch`` None = every token."""

    tokens_per_batch: int | None
    max_gb: float | None
    estimate_gb: float  # every token cached
    cached_gb: float  # what will be cached
    tokens_total: int
    tokens_cached: int
    subsampled: str | None  # None, "explicit" (recon_tokens given) or "memory bound"

    def meta(self) -> dict[str, Any]:
        return asdict(self)


def token_counts(batches: Sequence[Mapping[str, Any]]) -> list[int]:
    """Valid (non-padding) tokens per batch (``as_batch`` mappings)."""
    out = []
    for b in batches:
        mask = b.get("attention_mask")
        if mask is not None:
            out.append(int(torch.as_tensor(mask).sum()))
        else:
            ref = b.get("input_ids", b.get("inputs_embeds"))
            out.append(int(ref.shape[0] * ref.shape[1]) if ref.dim() >= 2 else int(ref.numel()))
    return out


def bytes_per_token(banks: Mapping[int, Any]) -> int:
    """Cache bytes of one token over all MoE layers (logits, every expert's output, target, input, batch id)."""
    total = 0
    for b in banks.values():
        p = next(iter(b.experts.parameters()), None)
        nb = 8 if p is not None and p.dtype == torch.float64 else 4
        h, e = b.hidden_size, b.num_experts
        total += nb * (b.router_width + e * h + h + (h if b.router_width > e else 0)) + 8
    return total


def _cached(counts: list[int], k: int | None) -> int:
    return sum(counts) if k is None else sum(min(n, k) for n in counts)


def plan_recon_cache(banks: Mapping[int, Any], batches: Sequence[Mapping[str, Any]], *,
                     tokens_per_batch: int | None = None, max_gb: float | None = DEFAULT_MAX_GB) -> ReconCachePlan:
    """Tokens per batch to cache: ``tokens_per_batch`` (None = all), reduced to fit ``max_gb`` with a warning."""
    check_recon_options(tokens_per_batch, max_gb)
    counts, bpt = token_counts(batches), bytes_per_token(banks)
    k = tokens_per_batch
    if k is not None and k >= max(counts, default=0):
        k = None  # the cap keeps every token
    how = "explicit" if k is not None else None
    est = sum(counts) * bpt / GB
    if max_gb is not None and _cached(counts, k) * bpt / GB > max_gb:
        lo, hi = 0, max(counts) if k is None else k  # largest k' in [1, hi) with cache(k') <= max_gb
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _cached(counts, mid) * bpt / GB <= max_gb else (lo, mid - 1)
        if lo < 1:
            raise ValueError(f"recon_max_gb={max_gb} GB cannot hold even one token per batch for the NAEE "
                             f"cache ({len(counts)} batches x {bpt / GB:.3g} GB per token); raise "
                             "calibration.recon_max_gb (--recon-max-gb) or use fewer batches")
        logger.warning("NAEE reconstruction cache: every token would take %.3g GB, above recon_max_gb=%.3g GB; "
                       "caching a seeded subsample of %d tokens per batch (%.3g GB) instead of the reference's "
                       "every token. Raise calibration.recon_max_gb (--recon-max-gb) to cache more.",
                       est, max_gb, lo, _cached(counts, lo) * bpt / GB)
        k, how = lo, "memory bound"
    return ReconCachePlan(tokens_per_batch=k, max_gb=max_gb, estimate_gb=est, cached_gb=_cached(counts, k) * bpt / GB,
                          tokens_total=sum(counts), tokens_cached=_cached(counts, k), subsampled=how)
