"""Apply a whole ``PruningPlan`` in memory: validate it against the model, then prune experts and the
neurons of kept experts (plan ids are ORIGINAL ids) and finalise the config.

Its own module so that ``apply/streaming.py`` (which applies the plan to a meta model) imports it
at module level, without a cycle through ``moeprune.apply``.
"""
from __future__ import annotations

from torch import nn

from moeprune.apply.buckets import MAX_BUCKETS, MIN_WASTE, bucketize_, check_ragged, refuse_bucketed
from moeprune.apply.config import finalize_config
from moeprune.apply.experts import check_expert_ids, moe_blocks, prune_experts_
from moeprune.apply.neurons import check_neuron_ids, prune_neurons_
from moeprune.arch.adapters import get_adapter
from moeprune.arch.structure import num_experts_of
from moeprune.plan import PruningPlan

__all__ = ["apply_plan", "check_plan"]


def check_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Refuse a plan that does not fit the model (layers, expert counts, top_k, channels) before
    anything is modified."""
    adapter = get_adapter(model)
    if plan.model_type and plan.model_type not in (adapter.model_type, getattr(model.config, "model_type", None)):
        raise ValueError(f"the plan was made for model_type {plan.model_type!r}, the model is "
                         f"{adapter.model_type!r}")
    blocks = moe_blocks(model)
    for li, lp in plan.layers.items():
        if li not in blocks:
            raise ValueError(f"plan layer {li} is not an MoE layer of this model; MoE layers: {sorted(blocks)}")
        n = num_experts_of(blocks[li])
        if lp.num_experts != n:
            raise ValueError(f"plan layer {li} was made for {lp.num_experts} experts, the model layer has {n} "
                             f"(already pruned, or a different model?)")
    keep = check_expert_ids(model, plan.keep())
    neurons = {li: dict(lp.neurons) for li, lp in plan.layers.items() if lp.neurons}
    check_neuron_ids(model, neurons, expert_ids=keep)


def apply_plan(model: nn.Module, plan: PruningPlan, *, regroup: str = "auto", ragged: str = "auto",
               max_buckets: int = MAX_BUCKETS, min_waste: float = MIN_WASTE) -> nn.Module:
    """Prune ``model`` in place by ``plan``: experts first, then the neurons of kept experts
    (neuron keeps are keyed by original expert ids and renumbered here). Ragged neuron plans whose
    padded layout wastes more than ``min_waste`` are stored in up to ``max_buckets`` width buckets
    (``ragged``: "auto" = buckets where supported, "buckets", "pad"; see ``apply.buckets``)."""
    check_ragged(model, ragged)
    refuse_bucketed(model)
    check_plan(model, plan)
    prune_experts_(model, plan.keep(), regroup=regroup, finalize=False)
    neurons = {}
    for li, lp in plan.layers.items():
        if lp.neurons:
            pos = {e: i for i, e in enumerate(lp.keep)}
            neurons[li] = {pos[e]: list(ch) for e, ch in lp.neurons.items()}
    if neurons:
        prune_neurons_(model, neurons, finalize=False)
        bucketize_(model, ragged=ragged, max_buckets=max_buckets, min_waste=min_waste)
    finalize_config(model)
    return model
