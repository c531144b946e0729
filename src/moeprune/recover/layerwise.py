"""Recovery out of core: one decoder layer at a time, for the streaming rewrite of a checkpoint folder.

Same fit as the in-memory ``recover`` (same captured token positions, same inputs: the UNPRUNED model's
MoE-block inputs, same ``recover_layer``), so the weights are the same; only where they go differs.
1. a stub pass records every decoder layer's call inputs (``observe.layerwise.record_inputs``) on the
   calibration batches that hold a chosen token, fed exactly as ``capture_inputs`` feeds them;
2. for each decoder layer up to the last pruned one: materialise it (``materialised``: read from the
   checkpoint for a ``load_layerwise_model`` model), run it UNPRUNED over the batches (its outputs feed the
   next layer) while a pre-hook keeps its MoE block's inputs at the chosen rows, fit that block, write its
   changed tensors under the on-disk keys (``recover/export.py``), release the layer. A model that is in
   memory gets its block's original tensors back after the export: the caller's model stays unpruned.
Peak memory: one decoder layer, the decoder-layer activations of the batches, one layer's captured inputs.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeprune.apply.shards import read_headers, source_files
from moeprune.arch.structure import decoder_layers
from moeprune.models import input_device
from moeprune.observe.layerwise import execution_device, materialised, record_inputs, run_layer
from moeprune.observe.lazy import lazy_layers
from moeprune.observe.runner import eval_mode
from moeprune.observe.sequential import decoder_index
from moeprune.plan import PruningPlan
from moeprune.recover import as_recovery, recover_layer, recoverable_banks, recovery_record
from moeprune.recover.capture import batch_rows, block_rows, check_size, model_inputs, pick_tokens
from moeprune.recover.config import RecoveryConfig
from moeprune.recover.export import write_overrides


class _Rows:
    """Stands in for ``run_layer``'s capture: told the batch index before each forward, the MoE block's
    pre-hook keeps that batch's chosen rows."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows, self.index, self.parts = rows, 0, []

    def set_batch(self, mask, shape=None, index: int = 0) -> None:
        self.index = index

    def hook(self, mod, args, kwargs):
        self.parts.append(block_rows(args, kwargs, self.rows[self.index]))


@contextlib.contextmanager
def _restored(block: nn.Module, lazy: bool):
    """An in-memory block gets its tensors back after the fit (a lazy one is released anyway)."""
    saved = None if lazy else {k: v.detach().clone() for k, v in block.state_dict().items()}
    try:
        yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for k, v in block.state_dict().items():
                    v.copy_(saved[k])


def _feed(batches: list, cfg: RecoveryConfig) -> tuple[list[dict], list[torch.Tensor]]:
    """The batches holding a chosen token, as the capture pass feeds them, and their chosen rows."""
    batches = list(batches)
    total, chosen = pick_tokens(batches, cfg.max_tokens, cfg.seed)
    if total == 0:
        raise ValueError("recovery: the calibration batches hold no (non-padding) token; check calibration.dataset")
    used = [(model_inputs(b), r) for b, r in zip(batches, batch_rows(batches, chosen)) if r is not None]
    return [b for b, _ in used], [r for _, r in used]


@torch.no_grad()
def recover_out_of_core(model: nn.Module, plan: PruningPlan, batches, cfg: RecoveryConfig | str | dict,
                        source: str | os.PathLike, work_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Recover ``plan``'s pruned layers of ``model`` (loaded from the checkpoint folder ``source``) layer
    by layer; ``(record for plan.meta["recovery"], {on-disk key: file in work_dir})`` for
    ``rewrite_checkpoint(..., overrides=...)``. ``model`` is left unpruned and unrecovered."""
    cfg = as_recovery(cfg)
    banks = recoverable_banks(model, plan, cfg)
    if not banks:
        return recovery_record(cfg, {}), {}
    feed, rows = _feed(batches, cfg)
    check_size(model, int(sum(r.numel() for r in rows)), cfg.max_gb, num_layers=1)
    files = source_files(Path(source))
    headers = read_headers(files)
    lname, layers = decoder_layers(model, [b.name for b in banks.values()])
    moe_at = decoder_index(lname, banks)
    device, lazy = input_device(model), lazy_layers(model)
    out: dict[str, dict] = {}
    overrides: dict[str, str] = {}
    with eval_mode(model), (lazy.manual() if lazy else contextlib.nullcontext()):
        hidden, calls = record_inputs(model, layers, feed, device)
        for i in range(max(moe_at) + 1):
            layer = layers[i]
            with materialised(model, i, layer):
                cap = _Rows(rows)
                bank = banks.get(moe_at.get(i))
                handle = bank.block.register_forward_pre_hook(cap.hook, with_kwargs=True) if bank else None
                try:
                    hidden = run_layer(layer, i, feed, hidden, calls, None, cap, execution_device(layer, device),
                                        keep_inputs=False)
                finally:
                    if handle is not None:
                        handle.remove()
                if bank is None:
                    continue
                with _restored(bank.block, lazy is not None):
                    out[str(bank.layer)] = recover_layer(model, bank, plan, torch.cat(cap.parts), cfg)
                    overrides.update(write_overrides(model, bank, files, headers, work_dir))
    return recovery_record(cfg, {k: out[k] for k in sorted(out, key=int)}), overrides
