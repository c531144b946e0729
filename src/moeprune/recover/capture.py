"""The inputs of every MoE block on calibration tokens: what recovery fits on.

One forward pass of the UNPRUNED model over the calibration batches; a forward pre-hook on each MoE block
keeps a seeded subsample of the non-padding token rows (the same token positions in every layer). The
size is estimated and checked before the pass, so a too-large request fails in seconds, not hours.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moeprune.arch.structure import iter_moe_blocks


def _valid(batch: dict | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], valid [B, L] bool)`` of one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return batch, torch.ones_like(batch, dtype=torch.bool)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return ids, (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())


def pick_tokens(batches: list, max_tokens: int, seed: int) -> tuple[int, torch.Tensor]:
    """``(total valid tokens, sorted chosen positions [n])`` in the flat stream of valid tokens."""
    total = sum(int(_valid(b)[1].sum()) for b in batches)
    if total <= max_tokens:
        return total, torch.arange(total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens]
    return total, perm.sort().values


def estimate_bytes(model: nn.Module, num_tokens: int, num_layers: int | None = None) -> int:
    """Bytes the captured inputs take: layers (all MoE blocks by default) x tokens x hidden x the model dtype."""
    n = len(list(iter_moe_blocks(model))) if num_layers is None else num_layers
    hidden = int(model.config.get_text_config().hidden_size)
    p = next(model.parameters())
    return n * num_tokens * hidden * p.element_size()


def check_size(model: nn.Module, num_tokens: int, max_gb: float, num_layers: int | None = None) -> None:
    """``num_layers``: how many layers' inputs are held at once (the out-of-core route holds one)."""
    need = estimate_bytes(model, num_tokens, num_layers)
    if need > max_gb * 2**30:
        raise ValueError(f"recovery would capture {need / 2**30:.2f} GB of MoE-block inputs ({num_tokens} tokens "
                         f"per layer), above recovery.max_gb={max_gb}; lower recovery.max_tokens or raise "
                         "recovery.max_gb")


def batch_rows(batches: list, chosen: torch.Tensor) -> list[torch.Tensor | None]:
    """Per batch, the flat positions in ``[B*L]`` of its chosen tokens (None: none chosen in it)."""
    out: list[torch.Tensor | None] = []
    start = 0
    for b in batches:
        flat = torch.nonzero(_valid(b)[1].reshape(-1)).reshape(-1)  # positions of valid tokens in [B*L]
        n = flat.numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + n])).tolist()
        out.append(None if lo == hi else flat[chosen[lo:hi] - start])
        start += n
    return out


def block_rows(args: tuple, kwargs: dict, rows: torch.Tensor) -> torch.Tensor:
    """From a MoE block's call (pre-hook arguments): its input at the flat token positions ``rows``, a CPU
    copy ``[n, H]`` in the model dtype."""
    x = args[0] if args else kwargs["hidden_states"]
    return x.reshape(-1, x.shape[-1])[rows.to(x.device)].detach().to("cpu", copy=True)


def model_inputs(batch: dict | torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward inputs the capture pass gives the model for one calibration batch."""
    ids, valid = _valid(batch)
    return {"input_ids": ids, "attention_mask": valid.long()}


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: Iterable, *, max_tokens: int = 4096, seed: int = 0,
                   max_gb: float = 4.0, layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
    """``{layer: X [n, H]}`` (model dtype, on the CPU): MoE-block inputs at ``n <= max_tokens`` seeded
    token positions, in stream order."""
    from moeprune.models import input_device
    from moeprune.observe.runner import forward_kwargs

    batches = list(batches)
    total, chosen = pick_tokens(batches, max_tokens, seed)
    if total == 0:
        raise ValueError("recovery: the calibration batches hold no (non-padding) token; check calibration.dataset")
    check_size(model, len(chosen), max_gb)
    want = None if layers is None else set(layers)
    found = [(li, blk) for li, _, blk in iter_moe_blocks(model) if want is None or li in want]
    parts: dict[int, list[torch.Tensor]] = {li: [] for li, _ in found}
    state: dict[str, torch.Tensor] = {}

    def hook(li):
        def pre(mod, args, kwargs):
            parts[li].append(block_rows(args, kwargs, state["rows"]))
        return pre

    handles = [blk.register_forward_pre_hook(hook(li), with_kwargs=True) for li, blk in found]
    dev, extra = input_device(model), forward_kwargs(model)  # no cache, last position's logits only
    try:
        for b, rows in zip(batches, batch_rows(batches, chosen)):
            if rows is None:
                continue
            state["rows"] = rows
            model(**{k: v.to(dev) for k, v in model_inputs(b).items()}, **extra)
    finally:
        for h in handles:
            h.remove()
    return {li: torch.cat(p) for li, p in parts.items() if p}
