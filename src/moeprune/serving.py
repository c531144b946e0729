"""Where a pruned checkpoint can run, decided at plan time.

llama.cpp (GGUF), vLLM and SGLang build every MoE layer from ONE expert count and ONE expert width
in the config. A plan that keeps the same number of experts in every layer (and, with neuron
pruning, gives every layer the same fused width) saves as a plain checkpoint that those engines
load; any other plan saves per-layer shapes in ``config.moe_pruning`` that only transformers reads
(``moeprune.load_pruned`` or ``trust_remote_code=True``). A few families tie another module's size to
the expert fields (``WIDTH_TIED``, ``COUNT_TIED``): their verdict needs ``plan.model_type``; the saved
``config.json`` (``apply.config.is_per_layer``) is always the final word. ``warn_if_transformers_only(plan)`` is the
one plan-stage warning (for ``moeprune plan`` / ``run`` / ``oneshot`` to call after planning);
``card_lines(plan)`` the model-card section. See docs/SERVING.md for what was verified.
"""
from __future__ import annotations

import logging

from moeprune.plan import LayerPlan, PruningPlan

logger = logging.getLogger("moeprune")

ENGINES = "llama.cpp (GGUF), vLLM, SGLang"
# Families whose config derives another module's size from the routed-expert field, so a uniform
# change of it cannot be written globally (apply then keeps per-layer shapes; checked against
# ``finalize_config`` on the tiny models in tests/test_gguf.py):
# the shared expert / dense MLP width follows the expert width (neuron pruning) ...
WIDTH_TIED = frozenset({"deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe", "hunyuan_v1_moe",
                        "llama4_text", "afmoe", "hy_v3"})
# ... or the expert count also sizes the attention experts (JetMoE's mixture of attention heads).
COUNT_TIED = frozenset({"jetmoe"})


def layer_width(lp: LayerPlan) -> int | None:
    """Fused intermediate width the layer will have after apply; ``None`` = unchanged (no neuron
    pruning, or an expert keeps every channel). Same rule as ``apply.neurons.neuron_index``."""
    from moeprune.apply.neurons import fused_width

    if not lp.neurons or any(e not in lp.neurons for e in lp.keep):
        return None
    width = fused_width([len(lp.neurons[e]) for e in lp.keep], lp.intermediate_size)
    return None if width == lp.intermediate_size else width


def bucketed_layers(plan: PruningPlan) -> list[int]:
    """Layers that ``apply`` (default ``ragged="auto"``) stores in width buckets: a bucket family whose
    padded layout would waste more than ``MIN_WASTE`` (the same rule as ``apply.buckets.bucketize_``)."""
    from moeprune.apply.buckets import BUCKET_FAMILIES, MIN_WASTE, waste
    from moeprune.apply.neurons import fused_width

    if plan.model_type not in BUCKET_FAMILIES:
        return []
    out = []
    for li, lp in plan.layers.items():
        full = lp.intermediate_size  # width of an expert without a neuron entry (None: unknown)
        if lp.neurons and (full or all(e in lp.neurons for e in lp.keep)):
            live = [len(lp.neurons[e]) if e in lp.neurons else full for e in lp.keep]
            if waste(live, fused_width(live, lp.intermediate_size)) > MIN_WASTE:
                out.append(li)
    return out


def transformers_only_reasons(plan: PruningPlan) -> list[str]:
    """Why the plan's checkpoint will need per-layer shapes (empty: it loads in every engine)."""
    reasons = []
    bucketed = bucketed_layers(plan)
    if bucketed:
        reasons.append(f"experts of layers {bucketed} have different widths, stored in width buckets "
                       "(apply's default; ragged='pad' stores one zero-padded width per layer instead)")
    counts = plan.kept_counts()
    if len(set(counts.values())) > 1:
        reasons.append(f"kept experts differ across layers ({min(counts.values())} to {max(counts.values())} "
                       "per layer)")
    widths = {li: layer_width(lp) for li, lp in plan.layers.items()}
    if len(set(widths.values())) > 1:
        shown = sorted({w if w is not None else "full" for w in widths.values()}, key=str)
        reasons.append(f"expert widths differ across layers ({', '.join(map(str, shown))} channels)")
    if not reasons and plan.model_type in WIDTH_TIED and any(w is not None for w in widths.values()):
        reasons.append(f"{plan.model_type} derives its shared-expert/dense width from the expert width, "
                       "so pruned expert widths are stored per layer")
    if not reasons and plan.model_type in COUNT_TIED and any(lp.removed for lp in plan.layers.values()):
        reasons.append(f"{plan.model_type} sizes its attention experts with the same expert-count field, "
                       "so pruned expert counts are stored per layer")
    return reasons


def warn_if_transformers_only(plan: PruningPlan, log: logging.Logger = logger) -> list[str]:
    """Log a warning when the plan's result will load only in transformers; returns the reasons."""
    reasons = transformers_only_reasons(plan)
    if reasons:
        log.warning(
            "plan %r: %s. The pruned checkpoint will load only in transformers (moeprune.load_pruned or "
            "from_pretrained(..., trust_remote_code=True)), not in %s, which need one expert count and width "
            "for all layers. For a checkpoint those engines load, plan with allocation: uniform "
            "(`--allocation uniform`, recipe `target: {allocation: uniform}`) and without per-layer neuron "
            "widths.", plan.method, "; ".join(reasons), ENGINES)
    return reasons


def card_lines(plan: PruningPlan) -> list[str]:
    """Model-card section: which engines can load the checkpoint."""
    reasons = transformers_only_reasons(plan)
    if reasons:
        return ["## Where it runs", "",
                (f"transformers only (`moeprune.load_pruned` or `trust_remote_code=True`): {'; '.join(reasons)}. "
                 f"{ENGINES} need one expert count and width for all layers and cannot load it."), ""]
    return ["## Where it runs", "",
            ("Uniform pruning: a plain checkpoint of the original architecture with fewer experts. "
             "transformers loads it without remote code; llama.cpp's `convert_hf_to_gguf.py` converts it "
             "(checked by moeprune for qwen3_moe, olmoe, mixtral, qwen2_moe and more, see docs/SERVING.md); "
             "vLLM and SGLang read the same config fields (not verified by moeprune)."), ""]
