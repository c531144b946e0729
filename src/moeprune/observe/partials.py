"""Per-batch partial statistics: what lets a plan be recomputed on resampled calibration data.

For the cheap feature groups (``PARTIAL_GROUPS``: ``routed`` and ``direction``, whose state is a few ``[E]``
vectors) observe also keeps each calibration batch's own sums / maxima, saved next to the totals as
``<name>@batch`` ``[B, *shape]`` (float64, batch order) with ``batch_index@batch`` ``[B]`` (int64, the global
batch index). A resampled ``ExpertStats`` is then the sum (max) of the chosen batches' partials
(``moeprune/stability.py``), without running the model again.

Cost: per MoE layer ``8 * B * (16 E + 1)`` bytes for ``routed`` and ``8 * B * 2 E`` for ``direction``
(B batches, E experts): 128 batches x 128 experts x 48 layers (Qwen3-30B-A3B) is 101 MB of routed partials,
against 0.8 MB of totals. ``observe(..., partials=False)`` turns them off.
"""
from __future__ import annotations

import torch

PARTIAL_GROUPS = ("routed", "direction")
SUFFIX = "@batch"
INDEX = "batch_index" + SUFFIX  # [B] int64: global calibration batch index of each partial row


def partial_name(name: str) -> str:
    return name + SUFFIX


def is_partial(name: str) -> bool:
    return name.endswith(SUFFIX)


def base_name(name: str) -> str:
    """``count@batch`` -> ``count``."""
    return name[: -len(SUFFIX)] if is_partial(name) else name


def stack_partials(parts: dict[int, dict[str, torch.Tensor]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """``{batch: {name: t}}`` -> ``{name@batch: [B, *shape]}`` in batch order, plus ``INDEX``."""
    order = sorted(parts)
    out = {INDEX: torch.tensor(order, dtype=torch.int64)}
    for n, shape in shapes.items():
        rows = [parts[b][n].detach().cpu() for b in order]
        out[partial_name(n)] = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=torch.float64)
    return out


def unstack_partials(sd: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Inverse of :func:`stack_partials` (a state dict holding ``INDEX`` and ``name@batch`` tensors)."""
    index = sd[INDEX].tolist()
    names = [n for n in sd if is_partial(n) and n != INDEX]
    return {int(b): {base_name(n): sd[n][i].double().clone() for n in names} for i, b in enumerate(index)}


def merge_partial_layer(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """In place: concatenate ``theirs``' partial rows after ``mine`` and put every row in batch order.

    Shards of one calibration set carry disjoint global batch indices, so the merged rows are in the
    single-process order whatever the merge order. Stats of separate observe runs may reuse indices; then
    ``theirs`` are renumbered after ``mine`` (their relative order kept)."""
    if INDEX not in mine and INDEX not in theirs:
        return
    if (INDEX in mine) != (INDEX in theirs):
        raise ValueError("cannot merge statistics with per-batch partials into statistics without them; "
                         "observe both with partials on (the default) or drop them with `strip_partials`")
    a, b = mine[INDEX], theirs[INDEX]
    if set(a.tolist()) & set(b.tolist()):
        b = b - int(b.min()) + int(a.max()) + 1
    index = torch.cat([a, b])
    order = torch.argsort(index, stable=True)
    for n in [n for n in mine if is_partial(n) and n != INDEX]:
        mine[n] = torch.cat([mine[n], theirs[n]])[order]
    mine[INDEX] = index[order]


def strip_partials(layers: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    """The same layers without their partial tensors."""
    return {li: {n: t for n, t in d.items() if not is_partial(n)} for li, d in layers.items()}
