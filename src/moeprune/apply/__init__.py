"""Apply a ``PruningPlan`` to a model in memory, simulate it, save and reload the result.

``apply_plan(model, plan)`` prunes experts then neurons in place (plan ids are ORIGINAL ids;
``apply/inplace.py``); ``mask_experts(model, plan)`` simulates a plan without slicing;
``save_pruned``/``load_pruned`` write and read HF folders (per-layer shapes via ``config.moe_pruning``);
``rewrite_checkpoint(src, plan, out)`` applies a plan to safetensors shards without loading the model.
"""
from __future__ import annotations

from moeprune.apply.checkpoint import load_pruned, save_pruned
from moeprune.apply.config import finalize_config
from moeprune.apply.experts import prune_experts_
from moeprune.apply.inplace import apply_plan, check_plan
from moeprune.apply.masking import mask_experts
from moeprune.apply.neurons import prune_neurons_
from moeprune.apply.streaming import rewrite_checkpoint

__all__ = ["apply_plan", "check_plan", "finalize_config", "load_pruned", "mask_experts", "prune_experts_",
           "prune_neurons_", "rewrite_checkpoint", "save_pruned"]
