"""Data-parallel calibration with ``torch.distributed``: each rank observes a contiguous shard of the
batches (so per-sample rows concatenated in rank order are in the single-process order, and the
reconstruction subsample, seeded by the GLOBAL batch index, is the same), then every rank's statistics are
gathered to ``dst`` and merged there in rank order (``ExpertStats.merge``: float64 sums, maxima, rows
concatenated), so the result does not depend on the backend's reduction algorithm.
Works with gloo (CPU tensors) and NCCL (tensors are moved to the current CUDA device for the reduction).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeprune.observe.experts import build_banks
from moeprune.observe.recon_cache import DEFAULT_MAX_GB, check_recon_options, plan_recon_cache
from moeprune.observe.runner import as_batch, normalize_features, observe
from moeprune.observe.stats import ExpertStats, reduction


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank's contiguous shard of ``n`` batches (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_layers(stats: ExpertStats, names: dict[int, list[str]], dst: int, group) -> list[dict] | None:
    """Every rank's ``{layer: {name: tensor}}`` on ``dst`` (None elsewhere), in rank order: fixed-shape
    statistics as float64 tensors (``dist.gather``), per-sample rows as objects (ragged lengths)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _comm_device(group)
    per_rank: list[dict] = [{li: {} for li in names} for _ in range(world)]
    for li in sorted(names):
        for name in names[li]:
            t = stats.layers[li][name]
            if reduction(name) in ("sum", "max"):
                buf = t.to(dev, torch.float64).contiguous()
                parts = [torch.empty_like(buf) for _ in range(world)] if rank == dst else None
                dist.gather(buf, parts, dst=dst, group=group)
            else:
                parts = [None] * world if rank == dst else None
                dist.gather_object(t.cpu(), parts, dst=dst, group=group)
            if rank == dst:
                for r in range(world):
                    per_rank[r][li][name] = parts[r].cpu()
    return per_rank if rank == dst else None


def reduce_stats(stats: ExpertStats, *, dst: int = 0, group=None) -> ExpertStats | None:
    """Reduce every rank's ``stats`` to rank ``dst`` (returns the merged stats there, None elsewhere).

    Deterministic: the ranks' statistics are gathered and folded in rank order with ``ExpertStats.merge``
    (float64 sums, maxima, rows concatenated), never with a collective whose summation order depends on
    the backend's algorithm. So the result is bit for bit ``s_0.merge(s_1)...merge(s_{W-1})``; against a
    single process it differs only by the float64 re-association of the per-shard sums."""
    rank = dist.get_rank(group)
    names = {li: sorted(d) for li, d in stats.layers.items()}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, names, group=group)
    if any(e != names for e in everyone):
        raise ValueError("ranks observed different layers/statistics; run the same model and features everywhere")
    per_rank = _gather_layers(stats, names, dst, group)
    metas: list[Any] = [None] * dist.get_world_size(group) if rank == dst else None
    dist.gather_object(stats.meta, metas, dst=dst, group=group)
    if rank != dst:
        return None
    merged = ExpertStats(layers=per_rank[0], meta=dict(metas[0]))
    for layers, meta in zip(per_rank[1:], metas[1:]):
        merged.merge(ExpertStats(layers=layers, meta=meta))
    meta = merged.meta
    meta["num_samples"] = sum(m.get("num_samples", 0) for m in metas)
    meta["num_tokens"] = sum(m.get("num_tokens", 0) for m in metas)
    meta["world_size"] = len(metas)
    return merged


def observe_distributed(model: nn.Module, batches: Iterable[Any], *, features: Iterable[str] | str = ("routed",),
                        dst: int = 0, group=None, progress: bool | None = None, seed: int = 0,
                        recon_tokens: int | None = None, recon_max_gb: float | None = DEFAULT_MAX_GB,
                        implementation: str = "auto",
                        data: Mapping[str, Any] | None = None,
                        naee: Mapping[int, Any] | None = None, cluster_dtype: str = "float64") -> ExpertStats | None:
    """Every rank calls this with the SAME ``batches`` (e.g. the same seeded ``load_calibration``) and an
    identical model; each observes its shard (whole batches: ``naee_online``'s per-batch norms need it).
    Returns the merged ``ExpertStats`` on rank ``dst``, None on
    the others. Requires ``torch.distributed.init_process_group`` first."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("observe_distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group(...) (e.g. under torchrun) first, or use observe()")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    batches = [as_batch(b) for b in batches]
    recon = None  # the NAEE cache is decided on ALL batches, so every rank subsamples alike
    if "reconstruction" in normalize_features(features):
        check_recon_options(recon_tokens, recon_max_gb)
        recon = plan_recon_cache(build_banks(model), batches, tokens_per_batch=recon_tokens, max_gb=recon_max_gb)
    lo, hi = shard_bounds(len(batches), rank, world)
    local = observe(model, batches[lo:hi], features=features, progress=(rank == dst) if progress is None else progress,
                    seed=seed, implementation=implementation, data=data, batch_offset=lo, recon=recon,
                    naee=naee, cluster_dtype=cluster_dtype)
    return reduce_stats(local, dst=dst, group=group)
