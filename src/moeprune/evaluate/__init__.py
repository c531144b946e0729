"""Evaluation of pruned models: perplexity, KL to the unpruned model, lm-eval-harness (optional extra)."""

from __future__ import annotations

from moeprune.evaluate.kl import kl_divergence
from moeprune.evaluate.lmeval import LOCAL_TASKS, run_lm_eval, shipped_task_dir
from moeprune.evaluate.perplexity import iter_batches, perplexity, read_texts, token_stream, windows

__all__ = [
    "LOCAL_TASKS",
    "iter_batches",
    "kl_divergence",
    "perplexity",
    "read_texts",
    "run_lm_eval",
    "shipped_task_dir",
    "token_stream",
    "windows",
]
