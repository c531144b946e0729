"""moeprune: one-shot expert and expert-neuron pruning for Mixture-of-Experts LLMs.

Pipeline: ``observe`` (calibration statistics) -> ``plan`` (a method turns statistics into a
``PruningPlan``) -> ``apply_plan`` / ``rewrite_checkpoint`` -> ``evaluate`` -> ``report``;
``oneshot`` runs all of it.

The public names below are imported lazily (``import moeprune`` does not import torch). ``moeprune.observe``
is the calibration subpackage, and it is callable: ``observe(model, batches, ...)`` after
``from moeprune import observe`` runs ``moeprune.observe.runner.observe`` (a function and a subpackage of one
name cannot both be bound to the package, so the subpackage is made callable instead of hiding it; plain
``import moeprune.observe.stats`` keeps working).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the same names load lazily
    from moeprune.api import OneshotResult, oneshot
    from moeprune.apply.checkpoint import load_pruned, save_pruned
    from moeprune.apply.inplace import apply_plan
    from moeprune.apply.masking import mask_experts
    from moeprune.apply.streaming import rewrite_checkpoint
    from moeprune.methods.registry import METHODS, get_method, register_method
    from moeprune.methods.target import Target
    from moeprune.models import load_model
    from moeprune.observe.runner import observe
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import LayerPlan, PruningPlan
    from moeprune.recipe import Recipe

_EXPORTS = {
    "oneshot": "moeprune.api", "OneshotResult": "moeprune.api",
    "Recipe": "moeprune.recipe",
    "PruningPlan": "moeprune.plan", "LayerPlan": "moeprune.plan",
    "ExpertStats": "moeprune.observe.stats",
    "observe": "moeprune",  # the callable subpackage (see the module docstring)
    "get_method": "moeprune.methods.registry", "register_method": "moeprune.methods.registry",
    "METHODS": "moeprune.methods.registry",
    "Target": "moeprune.methods.target",
    "apply_plan": "moeprune.apply.inplace", "mask_experts": "moeprune.apply.masking",
    "save_pruned": "moeprune.apply.checkpoint", "load_pruned": "moeprune.apply.checkpoint",
    "rewrite_checkpoint": "moeprune.apply.streaming",
    "load_model": "moeprune.models",
}
__all__ = [
    "METHODS", "ExpertStats", "LayerPlan", "OneshotResult", "PruningPlan", "Recipe", "Target", "__version__",
    "apply_plan", "get_method", "load_model", "load_pruned", "mask_experts", "observe", "oneshot",
    "register_method", "rewrite_checkpoint", "save_pruned",
]


def __getattr__(name: str) -> Any:  # lazy: `import moeprune` stays cheap (no torch/transformers import)
    if name == "observe":
        return importlib.import_module("moeprune.observe")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moeprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
