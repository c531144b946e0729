"""The one calibration entry point: a calibration config -> token batches -> one observation pass.

``calibration_batches`` resolves the source (``builtin:`` corpora, local files, HF datasets) and the sample
selection (random packing, or MoE Pathfinder's k-means representatives); ``calibrate`` chooses the pass:
full model, layer by layer (``cfg.layerwise``; ``cfg.sequential`` implies it and prunes each layer before
the next is observed, ``observe/sequential.py``), or data-parallel under an initialised ``torch.distributed``
group. ``moeprune observe``, ``moeprune run`` and ``oneshot`` all calibrate through here.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from moeprune.observe.data import (
    batches_hash,
    build_batches,
    load_calibration,
    load_texts,
    select_representatives,
)
from moeprune.observe.distributed import observe_distributed
from moeprune.observe.experts import build_banks
from moeprune.observe.layerwise import observe_layerwise
from moeprune.observe.memory import check_memory, estimate_bytes
from moeprune.observe.runner import Observer, as_batch, build_meta, normalize_features, observe
from moeprune.observe.stats import ExpertStats

if TYPE_CHECKING:
    from moeprune.methods.registry import MethodConfig
    from moeprune.methods.target import Target
    from moeprune.recipe import CalibrationConfig

logger = logging.getLogger(__name__)


def calibration_batches(tokenizer, cfg: CalibrationConfig) -> tuple[list[dict], dict[str, Any]]:
    """Token batches and their description from a calibration config (built-in corpora, files, HF
    datasets; ``select: kmeans`` picks MoE Pathfinder's k-means representatives, one text per sample)."""
    from moeprune.builtin_text import BUILTINS, builtin_texts

    source = builtin_texts(cfg.dataset) if cfg.dataset in BUILTINS else cfg.dataset
    if cfg.select == "kmeans":
        texts, kind = load_texts(source, split=cfg.split, text_column=cfg.text_column, tokenizer=tokenizer)
        picks = select_representatives(texts, cfg.num_samples, seed=cfg.seed, tokenizer=tokenizer)
        chosen = [texts[i[0]] for i in picks]
        batches = build_batches(chosen, tokenizer, num_samples=len(chosen), seq_len=cfg.seq_len,
                                batch_size=cfg.batch_size, packing=False, seed=cfg.seed)
        meta = {"source": cfg.dataset, "format": kind, "select": "kmeans", "num_samples": len(chosen),
                "seq_len": cfg.seq_len, "seed": cfg.seed, "hash": batches_hash(batches)}
        return batches, meta
    cal = load_calibration(source, tokenizer, num_samples=cfg.num_samples, seq_len=cfg.seq_len,
                           batch_size=cfg.batch_size, split=cfg.split, text_column=cfg.text_column,
                           packing=cfg.packing, seed=cfg.seed)
    cal.meta["source"] = cfg.dataset
    return cal.batches, cal.meta


def skeleton_stats(model, banks) -> ExpertStats:
    """Statistics holding only the model's metadata (no tensors): what a method can read before calibration
    (the target's per-layer budget, routers)."""
    obs = Observer(banks, ("routed",))
    return ExpertStats(layers={li: {} for li in banks}, meta=build_meta(model, obs))


def naee_path(model, banks, cfg: CalibrationConfig, features: tuple[str, ...], method: Any,
              target: Any) -> tuple[tuple[str, ...], dict | None, dict[str, Any] | None]:
    """``(features, candidates, meta)``: with ``reconstruction`` requested, swap it for ``naee_online`` when
    ``cfg.recon_mode`` allows, the method scores candidates online (``online_spec``: NAEE) and its
    enumeration is feasible for ``target``; otherwise keep the token cache. ``meta`` says which and why."""
    if "reconstruction" not in features:
        return features, None, None
    mode, spec, why = cfg.recon_mode, None, None
    if mode == "cache":
        why = "calibration.recon_mode=cache"
    elif method is None or target is None or not hasattr(method, "online_spec"):
        why = "the method and target are not known before calibration (moeprune observe), or the method " \
              "does not score candidates online"
    else:
        try:
            spec = method.online_spec(skeleton_stats(model, banks), target)
        except ValueError as e:
            why = f"enumeration not possible before calibration: {e}"
    if spec is None:
        if mode == "online":
            raise ValueError(f"calibration.recon_mode=online cannot be used: {why}; use recon_mode auto or cache")
        if mode == "auto" and method is not None and hasattr(method, "online_spec"):
            logger.warning("NAEE scores keep sets on a token cache instead of online: %s", why)
        return features, None, {"path": "cache", "mode": mode, "reason": why}
    feats = tuple(f for f in features if f != "reconstruction") + ("naee_online",)
    return feats, spec, {"path": "online", "mode": mode, "reason": None,
                         "candidates": sum(int(sp.candidates.shape[0]) for sp in spec.values())}


def calibrate(model, tokenizer, cfg: CalibrationConfig, features: tuple[str, ...], *,
              method: MethodConfig | None = None, target: Target | None = None, stats_dir: str | None = None,
              progress: bool = True) -> ExpertStats:
    """Tokenise the calibration data and run one observation pass collecting ``features``. Under an
    initialised ``torch.distributed`` group (e.g. ``torchrun``) every rank observes its shard of the batches
    and rank 0 gets (and saves) the merged statistics; the other ranks get None.

    ``method`` / ``target`` (``run`` / ``oneshot`` know them before calibration): NAEE then scores its
    candidate keep sets online (``naee_path``). Before the first forward every growing feature group's
    memory is estimated and checked against its ``calibration.*_max_gb`` cap (``observe/memory.py``).
    ``cfg.sequential`` (needs ``method`` and ``target``) runs the layer-wise pass sequentially; its plan is
    ``sequential_plan(stats)``."""
    batches, data_info = calibration_batches(tokenizer, cfg)
    banks = build_banks(model)
    features, naee, path = naee_path(model, banks, cfg, tuple(features), method, target)
    estimates = estimate_bytes(banks, [as_batch(b) for b in batches], normalize_features(features),
                               layerwise=cfg.layerwise or cfg.sequential, cluster_dtype=cfg.cluster_dtype)
    check_memory(estimates, cfg.memory_caps())
    recon = {"recon_tokens": cfg.recon_tokens, "recon_max_gb": cfg.recon_max_gb, "naee": naee,
             "cluster_dtype": cfg.cluster_dtype}
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if cfg.layerwise or cfg.sequential:
            raise ValueError("layer-wise / sequential and data-parallel calibration cannot be combined; drop one")
        stats = observe_distributed(model, batches, features=features, progress=progress, data=data_info,
                                    **recon)
    elif cfg.layerwise or cfg.sequential:  # sequential implies the layer-wise pass
        work = os.path.join(stats_dir, "layerwise-work") if stats_dir else None
        seq = {"sequential": True, "method": method, "target": target} if cfg.sequential else {}
        stats = observe_layerwise(model, batches, features=features, checkpoint_dir=work, progress=progress,
                                  data=data_info, **recon, **seq)
        if work:  # the resumable activations checkpoint is only needed until the pass completes
            shutil.rmtree(work, ignore_errors=True)
    else:
        stats = observe(model, batches, features=features, progress=progress, data=data_info, **recon)
    if stats is not None:  # None on the ranks other than 0
        stats.meta["memory_estimate"] = estimates
        if path is not None:
            stats.meta["recon_path"] = path
        if stats_dir:
            stats.save(stats_dir)
    return stats
