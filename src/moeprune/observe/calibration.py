"""The one calibration entry point: a calibration config -> token batches -> one observation pass.

``calibration_batches`` resolves the source (``builtin:`` corpora, local files, HF datasets) and the sample
selection (random packing, or MoE Pathfinder's k-means representatives); ``calibrate`` chooses the pass:
full model, layer by layer (``cfg.layerwise``; ``cfg.sequential`` implies it and prunes each layer before
the next is observed, ``observe/sequential.py``), or data-parallel under an initialised ``torch.distributed``
group. ``moeprune observe``, ``moeprune run`` and ``oneshot`` all calibrate through here.
"""
from __future__ import annotations

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
from moeprune.observe.layerwise import observe_layerwise
from moeprune.observe.runner import observe
from moeprune.observe.stats import ExpertStats

if TYPE_CHECKING:
    from moeprune.methods.registry import MethodConfig
    from moeprune.methods.target import Target
    from moeprune.recipe import CalibrationConfig


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


def calibrate(model, tokenizer, cfg: CalibrationConfig, features: tuple[str, ...], *,
              stats_dir: str | None = None, progress: bool = True, method: MethodConfig | None = None,
              target: Target | None = None) -> ExpertStats:
    """Tokenise the calibration data and run one observation pass collecting ``features``. Under an
    initialised ``torch.distributed`` group (e.g. ``torchrun``) every rank observes its shard of the batches
    and rank 0 gets (and saves) the merged statistics; the other ranks get None. ``cfg.sequential`` (needs
    ``method`` and ``target``) runs the layer-wise pass sequentially; its plan is ``sequential_plan(stats)``."""
    batches, data_info = calibration_batches(tokenizer, cfg)
    recon = {"recon_tokens": cfg.recon_tokens, "recon_max_gb": cfg.recon_max_gb}  # NAEE cache (reconstruction)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if cfg.layerwise or cfg.sequential:
            raise ValueError("layer-wise / sequential and data-parallel calibration cannot be combined; drop one")
        stats = observe_distributed(model, batches, features=features, progress=progress, data=data_info,
                                    **recon)
        if stats is not None and stats_dir:  # rank 0 holds the merged statistics
            stats.save(stats_dir)
        return stats
    if cfg.layerwise or cfg.sequential:  # sequential implies the layer-wise pass (not the disk offload)
        work = os.path.join(stats_dir, "layerwise-work") if stats_dir else None
        seq = {"sequential": True, "method": method, "target": target} if cfg.sequential else {}
        stats = observe_layerwise(model, batches, features=features, checkpoint_dir=work, progress=progress,
                                  data=data_info, **recon, **seq)
        if work:  # the resumable activations checkpoint is only needed until the pass completes
            shutil.rmtree(work, ignore_errors=True)
    else:
        stats = observe(model, batches, features=features, progress=progress, data=data_info, **recon)
    if stats_dir:
        stats.save(stats_dir)
    return stats
