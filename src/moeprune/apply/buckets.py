"""Choose and build width buckets for neuron plans whose padded fused layout wastes memory.

``prune_neurons_`` stores one width per layer (the widest expert, narrower ones padded with zeroed
channels: "pad"). ``bucketize_(model)`` then regroups each such layer's experts into at most
``max_buckets`` buckets of widths that minimise the padding (``plan_buckets``: an exact dynamic
programme over the distinct per-expert widths, each rounded up to ``ALIGN`` channels), when the
pad layout would waste more than ``min_waste`` of the layer's routed-expert parameters.

``ragged``: ``"auto"`` (default: buckets for the families in ``BUCKET_FAMILIES``, pad elsewhere),
``"buckets"`` (an error for other families, naming the ``"pad"`` fallback) or ``"pad"``.
"""
from __future__ import annotations

from torch import nn

from moeprune.apply.config import get_record
from moeprune.apply.experts import moe_blocks
from moeprune.apply.neurons import ALIGN
from moeprune.arch.adapters import get_adapter
from moeprune.arch.buckets import BucketedExperts, bucket_block_
from moeprune.arch.structure import intermediate_size_of

RAGGED = ("auto", "buckets", "pad")
MAX_BUCKETS = 4
MIN_WASTE = 0.05
# families whose experts class runs unchanged per bucket (tested: bucketed == pad+zero, reload)
BUCKET_FAMILIES = frozenset({"qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3"})


def plan_buckets(live: list[int], inter: int, *, max_buckets: int = MAX_BUCKETS,
                 align: int = ALIGN) -> tuple[list[int], list[list[int]]]:
    """``(widths, members)``: at most ``max_buckets`` buckets (ascending widths) holding experts
    ``members[b]`` (ids into ``live``), minimising the stored channels ``sum_e width(bucket(e))``.
    Each expert needs ``live[e]`` rounded up to ``align`` (at most ``inter``); a contiguous split of
    the sorted distinct needs is optimal, found exactly by dynamic programming (O(m^2 B))."""
    if max_buckets < 1:
        raise ValueError(f"max_buckets={max_buckets}; expected at least 1 bucket per layer")
    need = [min(inter, -(-int(v) // align) * align) for v in live]
    vals = sorted(set(need))
    cnt = [need.count(v) for v in vals]
    m, inf = len(vals), float("inf")

    def cost(i: int, j: int) -> int:  # distinct values i..j-1 padded to vals[j-1]
        return sum(c * (vals[j - 1] - v) for v, c in zip(vals[i:j], cnt[i:j]))

    best = [[inf] * (m + 1) for _ in range(max_buckets + 1)]  # best[b][j]: first j values in b buckets
    cut = [[0] * (m + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for b in range(1, max_buckets + 1):
        for j in range(1, m + 1):
            for i in range(j):
                c = best[b - 1][i] + cost(i, j)
                if c < best[b][j]:
                    best[b][j], cut[b][j] = c, i
    b = min(range(1, max_buckets + 1), key=lambda bb: (best[bb][m], bb))
    tops, j = [], m
    while j > 0:
        tops.append(vals[j - 1])
        j, b = cut[b][j], b - 1
    widths = sorted(tops)
    members = [[e for e, v in enumerate(need) if v <= w and (k == 0 or v > widths[k - 1])]
               for k, w in enumerate(widths)]
    return widths, members


def waste(live: list[int], width: int) -> float:
    """Fraction of a fused ``[E, width]`` layout that is padding (dead channels)."""
    return 1.0 - sum(live) / (len(live) * width)


def check_ragged(model: nn.Module, ragged: str) -> bool:
    """True when ``ragged`` asks for buckets on this model; refuses ``"buckets"`` for families
    whose experts are not known to run unchanged per bucket."""
    if ragged not in RAGGED:
        raise ValueError(f"ragged={ragged!r}; expected one of {RAGGED}")
    family = get_adapter(model).model_type
    if ragged == "buckets" and family not in BUCKET_FAMILIES:
        raise NotImplementedError(f"ragged='buckets' is not supported for model_type {family!r} (supported: "
                                  f"{sorted(BUCKET_FAMILIES)}); use ragged='pad' (pad + zero: exact, saves no "
                                  "memory for the padded channels)")
    return ragged != "pad" and family in BUCKET_FAMILIES


def padding_waste(model: nn.Module) -> dict[int, float]:
    """``{layer: padded fraction}`` of the pad-layout layers of a neuron-pruned model (config records
    only: works on meta models)."""
    neurons = get_record(model).get("neurons", {})
    out = {}
    for li, block in moe_blocks(model).items():
        live = (neurons.get(str(li)) or {}).get("live")
        if live and not isinstance(getattr(block, "experts", None), BucketedExperts):
            out[li] = waste(live, intermediate_size_of(block))
    return out


def refuse_bucketed(model: nn.Module) -> None:
    """Bucketed layers cannot be pruned again (the slicing helpers see one fused tensor per layer)."""
    done = [li for li, b in moe_blocks(model).items() if isinstance(getattr(b, "experts", None), BucketedExperts)]
    if done:
        raise ValueError(f"layers {done} store their experts in width buckets (ragged='buckets'); prune the "
                         "original model again with the combined plan, or apply with ragged='pad'")


def bucketize_(model: nn.Module, *, ragged: str = "auto", max_buckets: int = MAX_BUCKETS,
               min_waste: float = MIN_WASTE) -> dict[int, dict]:
    """Turn the padded layers of a neuron-pruned model into width buckets, in place (the caller
    finalises the config, which records the layouts). Returns ``{layer: layout}`` of bucketed layers."""
    if not check_ragged(model, ragged):
        return {}
    done = {}
    neurons = get_record(model).get("neurons", {})
    for li, block in moe_blocks(model).items():
        live = (neurons.get(str(li)) or {}).get("live")
        if not live or isinstance(getattr(block, "experts", None), BucketedExperts):
            continue
        inter = intermediate_size_of(block)
        if waste(live, inter) <= min_waste:
            continue
        widths, members = plan_buckets(live, inter, max_buckets=max_buckets)
        if len(widths) > 1:
            bucket_block_(block, members, widths)
            done[li] = block.experts.layout()
    return done
