"""Calibration: one observation pass that serves every pruning method.

* ``observe(model, batches, features=...)`` -> ``ExpertStats`` (full-model pass); the package itself is
  callable with the same arguments, so ``from moeprune import observe; observe(model, batches)`` works.
* ``calibrate(model, tokenizer, cfg, features)``: the one calibration entry point (source, selection, and
  the full / layer-wise / data-parallel pass chosen from the config; ``observe/calibration.py``).
* ``observe_layerwise(model, batches, checkpoint_dir=...)``: one decoder layer at a time (models larger
    than memory, resumable); ``moeprune.models.load_layerwise_model(path)`` opens a checkpoint folder for it
    with every decoder layer read from the safetensors only while it runs (``observe.lazy``).
* ``observe_distributed(model, batches)``: data-parallel over a torch.distributed group.
* ``load_calibration(source, tokenizer, ...)`` -> ``Calibration(batches, meta)``; ``build_batches`` /
  ``load_texts`` are its parts; ``select_representatives`` is MoE Pathfinder's k-means selection.
* ``MoECapture`` is the underlying instrumentation; ``SCHEMA`` / ``FEATURES`` name what is collected.
"""
import sys
import types

from moeprune.observe.calibration import calibrate, calibration_batches
from moeprune.observe.capture import MoECapture
from moeprune.observe.data import (
    Calibration,
    build_batches,
    load_calibration,
    load_texts,
    select_representatives,
)
from moeprune.observe.distributed import observe_distributed, reduce_stats
from moeprune.observe.layerwise import observe_layerwise
from moeprune.observe.record import MoERecord
from moeprune.observe.runner import Observer, observe
from moeprune.observe.stats import FEATURES, SCHEMA, ExpertStats

__all__ = [
    "FEATURES",
    "SCHEMA",
    "Calibration",
    "ExpertStats",
    "MoECapture",
    "MoERecord",
    "Observer",
    "build_batches",
    "calibrate",
    "calibration_batches",
    "load_calibration",
    "load_texts",
    "observe",
    "observe_distributed",
    "observe_layerwise",
    "reduce_stats",
    "select_representatives",
]


class _CallablePackage(types.ModuleType):
    """The ``moeprune.observe`` package: ``moeprune.observe(model, batches, ...)`` is ``runner.observe``."""

    def __call__(self, *args, **kwargs) -> ExpertStats:
        return observe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
