"""Python API: ``oneshot`` runs observe -> plan -> apply -> evaluate -> report in one call.

```python
from moeprune import oneshot
res = oneshot("Qwen/Qwen3-30B-A3B", dataset="calib.jsonl", recipe="reap", sparsity=0.5, output_dir="out")
res.model, res.plan, res.eval
```
Each stage is also a function of its own (``observe.calibration.calibrate``, ``measure``, ``kl_to_original``) used by the CLI.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.atomic import (
    atomic_write_text,
    check_output_dir,
    clean_stale,
    make_temp_dir,
    output_lock,
    replace_dir,
)
from moeprune.methods.registry import MethodConfig
from moeprune.observe.calibration import calibrate
from moeprune.observe.sequential import sequential_plan
from moeprune.observe.stats import ExpertStats
from moeprune.plan import PruningPlan
from moeprune.recipe import EvalConfig, Recipe
from moeprune.serving import warn_if_transformers_only

log = logging.getLogger("moeprune")
RECOVERY_WORK = "recovery-work"  # out-of-core recovery's tensors (in the run folder) until the rewrite read them


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


def eval_text(cfg: EvalConfig) -> str | list[str] | None:
    if cfg.perplexity is None:
        return None
    from moeprune.builtin_text import BUILTINS, builtin_texts

    return builtin_texts(cfg.perplexity, max_chars=4 * (cfg.max_tokens or 10**6) + 1000) \
        if cfg.perplexity in BUILTINS else cfg.perplexity


def measure(model, tokenizer, cfg: EvalConfig, *, progress: bool = True,
            into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Perplexity on the held-out text and lm-eval task results of one model. Results go into ``into``
    (a new dict by default) as each is measured, so a caller keeps the perplexity if lm-eval fails."""
    from moeprune.evaluate.perplexity import perplexity

    res: dict[str, Any] = {} if into is None else into
    text = eval_text(cfg)
    if text is not None:
        res.update(perplexity(model, tokenizer, text, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens,
                              progress=progress))
    if cfg.lm_eval_tasks:
        from moeprune.evaluate.lmeval import run_lm_eval

        res["lm_eval"] = run_lm_eval(model, tokenizer, cfg.lm_eval_tasks, include_path=cfg.lm_eval_include_path,
                                     limit=cfg.lm_eval_limit)["results"]
    return res


def kl_to_original(model, tokenizer, cfg: EvalConfig, *, plan: PruningPlan | None = None, pruned: Any = None,
                   progress: bool = True) -> dict[str, Any]:
    """KL(original || pruned) per token on the held-out text. Without a second model, the pruned model
    is simulated by router masking of ``model`` (exactly equal to structural pruning, see the tests),
    so no second copy of the weights is needed."""
    from moeprune.apply import mask_experts
    from moeprune.evaluate.kl import kl_divergence
    from moeprune.evaluate.perplexity import iter_batches, token_stream

    text = eval_text(cfg)
    if text is None or not cfg.kl:
        return {}
    ids = token_stream(text, tokenizer, max_tokens=cfg.max_tokens)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in iter_batches(ids, cfg.seq_len, None, 4,
                                                                                         pad_id=pad)]
    if pruned is None and plan is None:
        raise ValueError("kl_to_original needs the pruned model or the plan")
    res = kl_divergence(model, batches, candidate=pruned,
                        context=(lambda: mask_experts(model, plan)) if pruned is None else None, progress=progress)
    return {"kl": res["kl"], "kl_max": res["kl_max"], "top1_agreement": res["top1_agreement"],
            "kl_tokens": res["tokens"], "kl_via": "router_masking" if pruned is None else "two_models"}


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
        apply_fn = _apply_streaming if r.apply.mode == "streaming" else _apply_in_memory
        m, plan = apply_fn(model, m, tok, r, plan, out, results, progress)
    finally:
        if out and results:
            _write_json(os.path.join(out, "eval.json"), {**results, "seconds": round(time.time() - t0, 2)})
    if out:
        _write_reports(out, r, plan, results)
    return OneshotResult(model=m, tokenizer=tok, plan=plan, stats=stats, eval=results, output_dir=out)


def _eval_into(results: dict[str, Any], key: str, fn: Callable[[dict[str, Any]], None]) -> None:
    """``fn`` fills ``results[key]`` piece by piece, so what it measured survives a later failure in it."""
    results[key] = {}
    fn(results[key])


def _recover(m, tok, r: Recipe, plan: PruningPlan, out) -> PruningPlan:
    """The recipe's recovery step on the unpruned ``m`` (in place); the plan with its record, saved."""
    from moeprune.observe.calibration import calibration_batches
    from moeprune.recover import recover, with_record

    batches, _ = calibration_batches(tok, r.calibration)
    plan = with_record(plan, recover(m, plan, batches, r.recovery.build()))
    if out:
        plan.save(os.path.join(out, "plan.json"))
    return plan


def _recover_out_of_core(model, m, tok, r: Recipe, plan: PruningPlan, out, work) -> tuple[PruningPlan, dict]:
    """The recipe's recovery step layer by layer (``m`` stays unpruned); the plan with its record, saved,
    and the recovered tensors for ``rewrite_checkpoint(overrides=...)``."""
    from moeprune.observe.calibration import calibration_batches
    from moeprune.recover import with_record
    from moeprune.recover.layerwise import recover_out_of_core

    batches, _ = calibration_batches(tok, r.calibration)
    record, overrides = recover_out_of_core(m, plan, batches, r.recovery.build(), model, work)
    plan = with_record(plan, record)
    plan.save(os.path.join(out, "plan.json"))
    return plan, overrides


def _apply_in_memory(model, m, tok, r: Recipe, plan: PruningPlan, out, results, progress):
    from moeprune.apply import apply_plan, save_pruned

    evaluate = _has_eval(r.eval)
    summary = {"method": plan.method, "expert_sparsity": plan.expert_sparsity()}
    if evaluate:
        _eval_into(results, "original", lambda d: measure(m, tok, r.eval, progress=progress, into=d))
    reference = None
    if r.recovery is not None:  # recovery changes m: KL then needs the original as a second copy
        import copy

        reference = copy.deepcopy(m) if evaluate and r.eval.kl and eval_text(r.eval) is not None else None
        plan = _recover(m, tok, r, plan, out)
        summary["recovery"] = r.recovery.name
    kl = kl_to_original(m, tok, r.eval, plan=plan, progress=progress) if evaluate and reference is None \
        and r.recovery is None else {}
    apply_plan(m, plan)
    if reference is not None:
        kl = kl_to_original(reference, tok, r.eval, pruned=m, progress=progress)
        del reference
    if evaluate:
        def pruned(d: dict[str, Any]) -> None:
            d.update(kl, **summary)
            measure(m, tok, r.eval, progress=progress, into=d)

        _eval_into(results, "pruned", pruned)
    if out and r.apply.save:
        save_pruned(m, os.path.join(out, "model"), plan=plan, tokenizer=tok, max_shard_size=r.apply.max_shard_size)
    return m, plan


def _apply_streaming(model, m, tok, r: Recipe, plan: PruningPlan, out, results, progress):
    """Out of core: shards are rewritten, the pruned model is loaded only to evaluate it."""
    from moeprune.apply.streaming import rewrite_checkpoint
    from moeprune.models import load_model

    evaluate = _has_eval(r.eval)
    if evaluate:
        _eval_into(results, "original", lambda d: measure(m, tok, r.eval, progress=progress, into=d))
    work = os.path.join(out, RECOVERY_WORK)
    try:
        overrides: dict[str, str] = {}
        if r.recovery is not None:
            plan, overrides = _recover_out_of_core(model, m, tok, r, plan, out, work)
        path = rewrite_checkpoint(model, plan, os.path.join(out, "model"), max_shard_size=r.apply.max_shard_size,
                                  progress=progress, overrides=overrides)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not evaluate:
        return None, plan
    pruned, _ = load_model(path, dtype=r.dtype, device=r.device, experts_implementation=r.experts_implementation)

    def measure_pruned(d: dict[str, Any]) -> None:
        d.update(method=plan.method, expert_sparsity=plan.expert_sparsity())
        if r.recovery is not None:
            d["recovery"] = r.recovery.name
        measure(pruned, tok, r.eval, progress=progress, into=d)
        d.update(kl_to_original(m, tok, r.eval, pruned=pruned, progress=progress))

    _eval_into(results, "pruned", measure_pruned)
    return pruned, plan


def _write_reports(out: str, r: Recipe, plan: PruningPlan, results: dict[str, Any]) -> None:
    if r.report:
        from moeprune.report import make_report

        make_report(out)
    from moeprune.card import write_model_card

    write_model_card(out, r, plan, results)


def _has_eval(cfg: EvalConfig) -> bool:
    return cfg.perplexity is not None or bool(cfg.lm_eval_tasks)
