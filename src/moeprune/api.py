"""Python API: ``oneshot`` runs observe -> plan -> apply -> evaluate -> report in one call.

```python
from moeprune import oneshot
res = oneshot("Qwen/Qwen3-30B-A3B", dataset="calib.jsonl", recipe="reap", sparsity=0.5, output_dir="out")
res.model, res.plan, res.eval
```
Each stage is also a function of its own, used by the CLI: ``observe.calibration.calibrate``, ``evaluate.stage``
(``measure``, ``kl_to_original``), ``apply.run`` (recovery + apply + evaluation of a run).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.apply.run import RECOVERY_WORK, apply_in_memory, apply_streaming
from moeprune.atomic import (
    atomic_write_text,
    check_output_dir,
    clean_stale,
    make_temp_dir,
    output_lock,
    replace_dir,
)
from moeprune.evaluate.stage import kl_to_original, measure
from moeprune.methods.registry import MethodConfig
from moeprune.observe.calibration import calibrate
from moeprune.observe.sequential import sequential_plan
from moeprune.observe.stats import ExpertStats
from moeprune.plan import PruningPlan
from moeprune.recipe import Recipe
from moeprune.serving import warn_if_transformers_only

log = logging.getLogger("moeprune")


@dataclass
class OneshotResult:
    model: Any
    tokenizer: Any
    plan: PruningPlan
    stats: ExpertStats
    eval: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None


def resolve_recipe(recipe: Recipe | MethodConfig | str | os.PathLike | dict | None) -> tuple[Recipe, MethodConfig]:
    """A recipe from: None (defaults), a Recipe, a dict, a YAML path, a method name, or a method config."""
    if recipe is None:
        r = Recipe()
    elif isinstance(recipe, Recipe):
        r = recipe
    elif isinstance(recipe, dict):
        r = Recipe.model_validate(recipe)
    elif isinstance(recipe, MethodConfig):
        d = recipe.to_dict()
        return Recipe(method=d), recipe
    elif str(recipe).endswith((".yaml", ".yml")):
        r = Recipe.load(recipe)
    else:
        r = Recipe(method={"name": str(recipe)})
    return r, r.method.build()


def _write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def oneshot(model: Any = "tiny:qwen3_moe", dataset: str | None = None,
            recipe: Recipe | MethodConfig | str | os.PathLike | dict | None = None, *,
            sparsity: float | None = None, recovery: str | dict | None = None,
            output_dir: str | os.PathLike | None = None, tokenizer: Any = None, overwrite: bool = False,
            progress: bool = True) -> OneshotResult:
    """Prune ``model`` in one shot: observe calibration data, plan with the recipe's method, apply
    the plan in place, evaluate, and (with ``output_dir``) save model, stats, plan, results and report.

    ``model``: hub id, folder, ``tiny:<model_type>`` or a loaded model (then pass ``tokenizer``).
    ``recipe``: a ``Recipe``, YAML path, method name (``"reap"``) or method config (``REAP()``).
    ``sparsity`` overrides the recipe's target with an expert sparsity; ``recovery`` (``"compensate"``,
    ``"merge"`` or ``{"name": ..., **options}``) the recipe's recovery step (docs/RECOVERY.md). With ``apply.mode: streaming`` the
    checkpoint folder is rewritten shard by shard (the model is not pruned in memory); add
    ``calibration.layerwise: true`` for models larger than memory (decoder layers stay on disk); the
    result's ``model`` is then the reloaded pruned model when it was evaluated, else None.

    ``output_dir`` is checked before any work (not a source checkpoint, not inside or holding one, empty
    unless ``overwrite``, not being written by another process), the run is built in a temp folder beside
    it and swapped in at the end: ``output_dir`` always holds one complete run. If the run fails, what
    it had computed (statistics, plan, evaluation so far) is kept in ``<output_dir>.failed``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("oneshot runs in one process; for data-parallel calibration run `moeprune observe` under "
                         "torchrun, then `moeprune plan` and `moeprune apply`")
    r, method = _run_recipe(model, dataset, recipe, sparsity, recovery)
    if r.apply.mode == "streaming" and output_dir is None:
        raise ValueError("apply.mode=streaming rewrites the checkpoint into output_dir/model: pass output_dir")
    if output_dir is None:
        return _run(model, r, method, None, tokenizer, progress)
    sources = [_model_source(model)]
    out = check_output_dir(output_dir, sources=sources, overwrite=overwrite)
    with staged_run(out, sources=sources, overwrite=overwrite) as tmp:
        res = _run(model, r, method, str(tmp), tokenizer, progress)
    if res.model is not None and r.apply.mode == "streaming":  # it was loaded from the temp folder
        res.model.name_or_path = res.model.config._name_or_path = str(out / "model")
    res.output_dir = str(out)
    return res


def _run_recipe(model: Any, dataset: str | None, recipe: Any, sparsity: float | None,
                recovery: str | dict | None = None) -> tuple[Recipe, MethodConfig]:
    """The recipe with the call's overrides, re-validated as a whole."""
    r, method = resolve_recipe(recipe)
    updates: dict[str, Any] = {}
    if recovery is not None:
        updates["recovery"] = {"name": recovery} if isinstance(recovery, str) else dict(recovery)
    if dataset is not None:
        updates["calibration"] = r.calibration.model_copy(update={"dataset": str(dataset)})
    if sparsity is not None:
        updates["target"] = r.target.model_copy(update={"expert_sparsity": sparsity, "param_ratio": None,
                                                         "memory_gb": None})
    updates["model"] = model if isinstance(model, str) else getattr(model, "name_or_path", None) or "<in-memory model>"
    r = Recipe.model_validate(r.model_copy(update=updates).model_dump())  # re-check the combination
    return r, method


def _model_source(model: Any) -> str | None:
    """The checkpoint folder the model comes from (it must never be written or replaced), if any."""
    src = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    return os.fspath(src) if src and os.path.isdir(src) else None


@contextmanager
def staged_run(out: Path, *, sources: list[str | None], overwrite: bool) -> Iterator[Path]:
    """Hold ``out``'s lock, build the run in a temp folder and swap it in on success. On failure keep
    what was computed in ``<out>.failed`` (with ``status.json`` naming the error) and leave ``out`` as it
    was; a killed run leaves a hidden temp folder that the next run into ``out`` deletes."""
    with output_lock(out):
        check_output_dir(out, sources=sources, overwrite=overwrite)  # again: a run may have finished meanwhile
        clean_stale(out)
        tmp = make_temp_dir(out)
        try:
            yield tmp
        except BaseException as e:
            _keep_partial(tmp, out, e)
            raise
        replace_dir(tmp, out)


def _keep_partial(tmp: Path, out: Path, err: BaseException) -> None:
    shutil.rmtree(tmp / "stats" / "layerwise-work", ignore_errors=True)
    shutil.rmtree(tmp / RECOVERY_WORK, ignore_errors=True)
    if not any(tmp.iterdir()):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    failed = out.with_name(out.name + ".failed")
    try:
        atomic_write_text(tmp / "status.json", json.dumps(
            {"status": "failed", "error": f"{type(err).__name__}: {err}", "run": str(out)}, indent=1))
        replace_dir(tmp, failed)
    except OSError:  # e.g. the disk is full: a hidden temp folder is still better than nothing
        log.warning("could not keep the partial results of %s; they are in %s", out, tmp)
        return
    log.warning("the run failed; results computed before the failure are in %s", failed)
    if hasattr(err, "add_note"):
        err.add_note(f"results computed before the failure are in {failed}")


def _load(model: Any, r: Recipe, tokenizer: Any) -> tuple[Any, Any]:
    from moeprune.models import load_layerwise_model, load_model

    if r.calibration.layerwise and isinstance(model, str) and os.path.isdir(model):  # the recipe ensures streaming
        m, tok = load_layerwise_model(model, dtype=r.dtype, device=r.device,
                                      experts_implementation=r.experts_implementation)
    else:
        m, tok = load_model(model, dtype=r.dtype, device=r.device, experts_implementation=r.experts_implementation)
    tok = tokenizer or tok
    if tok is None:
        raise ValueError("no tokenizer: pass tokenizer=... (the model folder has none)")
    return m, tok


def _run(model: Any, r: Recipe, method: MethodConfig, out: str | None, tokenizer: Any,
         progress: bool) -> OneshotResult:
    """observe -> plan -> apply -> evaluate -> write into ``out`` (the staged temp folder), saving each
    result as soon as it exists."""
    if out:
        atomic_write_text(os.path.join(out, "recipe.yaml"), r.dump())
    torch.manual_seed(r.seed)
    t0 = time.time()
    results: dict[str, Any] = {}
    m, tok = _load(model, r, tokenizer)
    try:
        target = r.target.build()
        stats = calibrate(m, tok, r.calibration, tuple(method.needs), method=method, target=target,
                          progress=progress, stats_dir=os.path.join(out, "stats") if out else None)
        plan = sequential_plan(stats) if r.calibration.sequential else method.plan(stats, target)
        warn_if_transformers_only(plan)  # non-uniform / ragged: say where the result will (not) load
        if out:
            plan.save(os.path.join(out, "plan.json"))
        apply_fn = apply_streaming if r.apply.mode == "streaming" else apply_in_memory
        m, plan = apply_fn(model, m, tok, r, plan, out, results, progress)
    finally:
        if out and results:
            _write_json(os.path.join(out, "eval.json"), {**results, "seconds": round(time.time() - t0, 2)})
    if out:
        _write_reports(out, r, plan, results)
    return OneshotResult(model=m, tokenizer=tok, plan=plan, stats=stats, eval=results, output_dir=out)


def _write_reports(out: str, r: Recipe, plan: PruningPlan, results: dict[str, Any]) -> None:
    if r.report:
        from moeprune.report import make_report

        make_report(out)
    from moeprune.card import write_model_card

    write_model_card(out, r, plan, results)


__all__ = ["OneshotResult", "kl_to_original", "measure", "oneshot", "resolve_recipe"]
