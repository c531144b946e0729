"""What each feature group keeps as a function of the calibration set, estimated and capped BEFORE the first
forward (``calibration.calibrate`` calls ``check_memory``).

Groups whose state is fixed by the model (``routed`` and ``direction`` totals, ``neurons``, ``transitions``
totals, ``naee_online``: O(candidates)) need no cap. Groups that grow with the data have one cap each, a
``calibration.<cap>`` option in GB (defaults in ``recipe.py``; ``null`` = no bound; CLI ``--<cap with dashes>``):

| group | grows with | cap |
|---|---|---|
| ``paths`` (Pathfinder) | samples N: ``8 N (3 E + 2)`` bytes per MoE layer | ``paths_max_gb`` |
| ``cluster`` (C-Prune) | samples N: ``8 N E H`` bytes per MoE layer (2 with ``cluster_dtype: float16``) | ``cluster_max_gb`` |
| per-batch partials (``routed``, ``direction``) | batches B: ``8 B (#[E] sums x E + #scalars + 1)`` per layer | ``partials_max_gb`` |
| ``transitions``, layer-wise pass only | tokens T: one layer's routed ids ``4 T k`` held until the next layer | ``transitions_max_gb`` |
| ``reconstruction`` (NAEE cache) | tokens: see ``recon_cache.py`` (a subsample above ``recon_max_gb``) | ``recon_max_gb`` |

``docs/MEMORY.md`` has the table with a Qwen3-30B-A3B example.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moeprune.observe.recon_cache import token_counts

GB = 1e9
# group -> (calibration option, what reduces the estimate)
CAPS: dict[str, tuple[str, str]] = {
    "paths": ("paths_max_gb", "fewer calibration samples (calibration.num_samples / --num-samples)"),
    "cluster": ("cluster_max_gb", ("fewer calibration samples (calibration.num_samples / --num-samples), or "
                                  "float16 rows for C-Prune's default precision (calibration.cluster_dtype: "
                                  "float16 / --cluster-dtype float16)")),
    "partials": ("partials_max_gb", "fewer, larger batches (calibration.batch_size / --batch-size)"),
    "transitions": ("transitions_max_gb", ("fewer tokens (num_samples, seq_len) or the full-model pass "
                                           "(calibration.layerwise: false)")),
}


def batch_shape(batches: Sequence[Mapping[str, Any]]) -> tuple[int, int, int]:
    """``(batches B, samples N, valid tokens T)`` of ``as_batch`` mappings (a sample: a row with a valid token;
    tokens counted as the NAEE cache estimate counts them, ``recon_cache.token_counts``)."""
    n = 0
    for b in batches:
        mask = b.get("attention_mask")
        if mask is None:
            ref = b.get("input_ids", b.get("inputs_embeds"))
            n += int(ref.shape[0]) if ref.dim() >= 2 else 1
        else:
            m = torch.as_tensor(mask)
            n += int((m.reshape(-1, m.shape[-1]).sum(-1) > 0).sum())
    return len(batches), n, sum(token_counts(batches))


def _numel(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def estimate_bytes(banks: Mapping[int, Any], batches: Sequence[Mapping[str, Any]], features: Sequence[str], *,
                   layerwise: bool = False, partials: bool = True, cluster_dtype: str = "float64") -> dict[str, int]:
    """Bytes of the growing state of each requested capped group, over every MoE layer (the accumulators'
    own shapes: one definition)."""
    from moeprune.observe.accumulators import DirectionAccumulator, RoutedAccumulator
    from moeprune.observe.accumulators_dense import PathsAccumulator

    nb, ns, nt = batch_shape(batches)
    out: dict[str, int] = {}
    if partials:
        per = 0
        for b in banks.values():
            per += _numel(RoutedAccumulator(b.num_experts).shapes) + 1  # + batch_index@batch
            if "direction" in features:
                per += _numel(DirectionAccumulator(b.num_experts).shapes)
        out["partials"] = 8 * nb * per
    if "paths" in features:
        out["paths"] = 8 * ns * sum(_numel(PathsAccumulator(b.num_experts).shapes) for b in banks.values())
    if "cluster" in features:
        nb_el = 2 if cluster_dtype == "float16" else 8
        out["cluster"] = nb_el * ns * sum(b.num_experts * b.hidden_size for b in banks.values())
    if "transitions" in features and layerwise:
        out["transitions"] = 4 * nt * max((b.top_k or 1) for b in banks.values())
    return out


def check_memory(estimates: Mapping[str, int], caps: Mapping[str, float | None]) -> None:
    """``ValueError`` naming the group, its estimate, the cap, the option that raises it and what reduces it,
    for the first group whose estimate exceeds its cap (``caps``: group -> GB, None = no bound)."""
    for group, nbytes in estimates.items():
        cap = caps.get(group)
        if cap is None or nbytes <= cap * GB:
            continue
        opt, reduce = CAPS[group]
        raise ValueError(
            f"calibration: feature group {group!r} would keep about {nbytes / GB:.3g} GB of statistics, above "
            f"calibration.{opt}={cap:g} GB (checked before calibration starts). Raise the cap "
            f"(calibration.{opt} / --{opt.replace('_', '-')}; null or 'none' = no bound) or use {reduce}")


def check_cap_value(name: str, v: Any) -> None:
    """A cap is a number > 0 or None."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
        raise ValueError(f"calibration.{name}={v!r} must be a number > 0 (GB) or null (no bound)")
