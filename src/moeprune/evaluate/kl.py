"""KL divergence of the pruned model's next-token distribution from the original's: a cheap proxy.

``KL(p_orig || p_pruned)`` per token, averaged over the valid tokens of the same batches, plus the
top-1 agreement (fraction of tokens where both models predict the same next token). Either two
models, or one model evaluated plainly (reference) and inside a context manager (candidate), e.g.
``context=lambda: mask_experts(model, plan)`` to measure a plan before slicing anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.models import input_device


def _as_batch(b: Any) -> dict[str, torch.Tensor]:
    """The calibration rule (``observe.runner.as_batch``) plus an all-ones ``attention_mask`` when absent."""
    from moeprune.observe.runner import as_batch

    batch = as_batch(b)
    if "input_ids" not in batch:
        raise TypeError("KL needs token ids: a batch must be a [B, L] LongTensor or a dict with input_ids")
    if batch.get("attention_mask") is None:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    dev = input_device(model)
    out = model(
        input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), use_cache=False
    )
    return out.logits


def kl_divergence(
    reference: torch.nn.Module,
    batches: Iterable[Any],
    candidate: torch.nn.Module | None = None,
    *,
    context: Callable[[], AbstractContextManager] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Mean per-token ``KL(p_ref || p_cand)`` (nats) and top-1 agreement over ``batches``.

    ``batches``: ``[B, L]`` LongTensors or dicts with ``input_ids`` (+ ``attention_mask``; padding
    tokens are excluded). ``candidate`` defaults to ``reference``; ``context`` is a zero-argument
    factory of the context manager the candidate runs in (a factory because most context managers
    can only be entered once). Returns ``{"kl", "kl_max", "top1_agreement", "tokens"}``."""
    if candidate is None and context is None:
        raise ValueError(
            "nothing to compare: pass candidate=<pruned model> and/or context=<factory>, e.g. "
            "context=lambda: mask_experts(model, plan)"
        )
    if context is not None and (hasattr(context, "__enter__") or not callable(context)):
        raise TypeError(
            "context must be a zero-argument factory returning a context manager, e.g. "
            "context=lambda: mask_experts(model, plan), not a context manager instance"
        )
    candidate = reference if candidate is None else candidate
    ctx = context or contextlib.nullcontext
    models = {id(reference): reference, id(candidate): candidate}
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    kl_sum, kl_max, agree, count = 0.0, 0.0, 0, 0
    try:
        for raw in tqdm(batches, desc="kl", unit="batch", total=total, disable=not progress):
            batch = _as_batch(raw)
            ref = _logits(reference, batch)  # [B, L, V]
            with ctx():
                cand = _logits(candidate, batch)
            if ref.shape != cand.shape:
                raise ValueError(
                    f"reference logits {tuple(ref.shape)} and candidate logits {tuple(cand.shape)} "
                    "differ: both models must share the vocabulary"
                )
            valid = batch["attention_mask"].bool()
            for b in range(ref.shape[0]):  # row by row: float32 [L, V] copies only
                rows = valid[b].to(ref.device)
                logp = F.log_softmax(ref[b][rows].float(), -1)
                logq = F.log_softmax(cand[b][rows].to(ref.device).float(), -1)
                kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # [T]
                kl_sum += float(kl.double().sum())
                kl_max = max(kl_max, float(kl.max())) if kl.numel() else kl_max
                agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
                count += int(rows.sum())
    finally:
        for k, m in models.items():
            m.train(modes[k])
    if count == 0:
        raise ValueError("no valid tokens in the batches (all attention_mask entries are 0?)")
    return {"kl": kl_sum / count, "kl_max": kl_max, "top1_agreement": agree / count, "tokens": count}


def _vocab_size(model: torch.nn.Module) -> int | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(emb.weight.shape[0]) if emb is not None else getattr(model.config, "vocab_size", None)


def check_comparable(model: torch.nn.Module, base: torch.nn.Module, tok=None, base_tok=None, *,
                     names: tuple[str, str] = ("model", "base")) -> None:
    """Refuse a KL comparison of unrelated models: a pruned model keeps the base's architecture, hidden
    size, layers, vocabulary and tokenizer; KL between anything else is a number without meaning."""
    a, b = model.config, base.config
    checks = [("model_type", getattr(a, "model_type", None), getattr(b, "model_type", None)),
              ("hidden_size", getattr(a, "hidden_size", None), getattr(b, "hidden_size", None)),
              ("num_hidden_layers", getattr(a, "num_hidden_layers", None), getattr(b, "num_hidden_layers", None)),
              ("vocabulary size", _vocab_size(model), _vocab_size(base))]
    if tok is not None and base_tok is not None and tok.get_vocab() != base_tok.get_vocab():
        checks.append(("tokenizer vocabulary", f"{len(tok)} tokens", f"{len(base_tok)} tokens (different)"))
    bad = [f"{what} {x} vs {y}" for what, x, y in checks if x != y or "different" in str(y)]
    if bad:
        raise ValueError(f"{names[1]} is not the unpruned version of {names[0]} ({'; '.join(bad)}): KL between "
                         "unrelated models means nothing; pass the model you pruned as the base")
