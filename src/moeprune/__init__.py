"""moeprune: one-shot expert and expert-neuron pruning for Mixture-of-Experts LLMs.

Pipeline: ``observe`` (calibration statistics) -> ``plan`` (a method turns statistics into a
``PruningPlan``) -> ``apply_plan`` / ``rewrite_checkpoint`` -> ``evaluate`` -> ``report``;
``oneshot`` runs all of it.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "oneshot": "moeprune.api", "OneshotResult": "moeprune.api",
    "Recipe": "moeprune.recipe",
    "PruningPlan": "moeprune.plan", "LayerPlan": "moeprune.plan",
    "ExpertStats": "moeprune.observe.stats",
    "observe": "moeprune.observe",
    "get_method": "moeprune.methods.registry", "register_method": "moeprune.methods.registry",
    "METHODS": "moeprune.methods.registry",
    "Target": "moeprune.methods.target",
    "apply_plan": "moeprune.apply", "mask_experts": "moeprune.apply", "save_pruned": "moeprune.apply",
    "load_pruned": "moeprune.apply",
    "rewrite_checkpoint": "moeprune.apply.streaming",
    "load_model": "moeprune.models",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import moeprune` stays cheap (no torch/transformers import)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moeprune' has no attribute {name!r}")
