"""Recovery after pruning (between plan and apply): ``compensate`` and ``merge``, see docs/RECOVERY.md.

``recover(model, plan, batches, cfg)`` changes the UNPRUNED ``model``'s kept experts (and, for merge,
router rows) in place, layer by layer, each fitted on that layer's inputs captured from the unpruned model
on the calibration batches; ``apply_plan`` / ``save_pruned`` then remove the dropped experts as usual,
so the checkpoint has exactly plain pruning's shapes. Returns the record that goes into
``plan.meta["recovery"]`` (options, per layer the calibration residual before/after and the fit).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from moeprune.observe.experts import build_banks
from moeprune.plan import PruningPlan
from moeprune.recover.capture import capture_inputs
from moeprune.recover.compensate import compensate_layer
from moeprune.recover.config import (
    RECOVERIES,
    CompensateConfig,
    MergeConfig,
    RecoveryConfig,
    get_recovery,
    register_recovery,
)
from moeprune.recover.merge import check_mergeable, merge_layer
from moeprune.recover.routed import check_additive, check_supported, pruned_routed, rel_residual, routed

__all__ = ["RECOVERIES", "CompensateConfig", "MergeConfig", "RecoveryConfig", "as_recovery", "capture_inputs",
           "get_recovery", "recover", "recover_layer", "recover_out_of_core", "register_recovery",
           "with_record"]
log = logging.getLogger("moeprune")


def as_recovery(cfg: RecoveryConfig | str | dict[str, Any]) -> RecoveryConfig:
    """A recovery config from a config, a name, or ``{"name": ..., **options}``."""
    if isinstance(cfg, RecoveryConfig):
        return cfg
    if isinstance(cfg, str):
        return get_recovery(cfg)
    opts = dict(cfg)
    if "name" not in opts:
        raise ValueError(f"recovery {cfg!r} has no 'name'; use one of {sorted(RECOVERIES)}")
    return get_recovery(opts.pop("name"), **opts)


def with_record(plan: PruningPlan, record: dict[str, Any]) -> PruningPlan:
    """The plan with ``meta["recovery"] = record`` (plans are frozen)."""
    return dataclasses.replace(plan, meta={**plan.meta, "recovery": record})


def _pruned_layers(plan: PruningPlan) -> list[int]:
    return [li for li, lp in plan.layers.items() if lp.removed or lp.neurons]


@torch.no_grad()
def recover(model: nn.Module, plan: PruningPlan, batches=None, cfg: RecoveryConfig | str | dict = "compensate", *,
            inputs: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """Recover every pruned layer of ``plan`` in place (see the module docstring). ``inputs``: MoE-block
    inputs already captured with ``capture_inputs`` (shared by several plans), else captured from
    ``batches``."""
    cfg = as_recovery(cfg)
    banks = recoverable_banks(model, plan, cfg)
    if inputs is None and banks:
        if batches is None:
            raise ValueError("recover needs calibration batches (or inputs from capture_inputs)")
        inputs = capture_inputs(model, batches, max_tokens=cfg.max_tokens, seed=cfg.seed, max_gb=cfg.max_gb,
                                layers=list(banks))
    out = {str(li): recover_layer(model, bank, plan, inputs[li], cfg) for li, bank in banks.items()}
    return recovery_record(cfg, out)


def recoverable_banks(model: nn.Module, plan: PruningPlan, cfg: RecoveryConfig) -> dict[int, Any]:
    """``{layer: ExpertBank}`` of the plan's pruned layers; every refusal happens here, before any work
    (structure only: works on a model whose decoder layers are on META)."""
    layers = _pruned_layers(plan)
    banks = build_banks(model, layers) if layers else {}
    for li, bank in banks.items():
        check_supported(bank, cfg.name)
        if isinstance(cfg, MergeConfig):
            check_mergeable(bank, plan.layers[li])
    return banks


def recovery_record(cfg: RecoveryConfig, layers: dict[str, dict]) -> dict[str, Any]:
    """What goes into ``plan.meta["recovery"]`` (the same for the in-memory and out-of-core routes)."""
    return {**cfg.to_dict(), "fit_inputs": "unpruned model's MoE-block inputs", "layers": layers}


def recover_layer(model: nn.Module, bank, plan: PruningPlan, x: torch.Tensor, cfg: RecoveryConfig) -> dict:
    """One layer in place, given its captured MoE-block inputs ``x [N, H]``: target, plain-pruning
    residual, the fit, the residual with the written weights. The per-layer entry of both routes."""
    x = x.to(next(bank.experts.parameters()).device)
    full = routed(bank, x)
    pruned = pruned_routed(model, bank, plan, x)
    check_additive(bank, full, pruned)
    before = rel_residual(full.y, pruned.y)
    if isinstance(cfg, CompensateConfig):
        rec = compensate_layer(bank, plan, full.y, pruned, cfg)
    else:
        rec = merge_layer(bank, plan.layers[bank.layer], full, cfg.align)
    after = rel_residual(full.y, pruned_routed(model, bank, plan, x).y)
    log.info("recovery %s layer %d: calibration residual %.4g -> %.4g", cfg.name, bank.layer, before, after)
    return {"tokens": int(x.shape[0]), "residual_before": round(before, 8), "residual_after": round(after, 8), **rec}


def __getattr__(name: str):
    if name == "recover_out_of_core":  # lazy: recover.layerwise imports the observe pass helpers
        from moeprune.recover.layerwise import recover_out_of_core

        return recover_out_of_core
    raise AttributeError(name)
