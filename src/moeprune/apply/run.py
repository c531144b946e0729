"""Recovery, apply and evaluation of one run (``oneshot`` / ``moeprune run``), in memory or out of core.

Each result is written into ``results`` as soon as it is measured, so a later failure keeps it.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from moeprune.evaluate.stage import eval_text, has_eval, kl_to_original, measure
from moeprune.plan import PruningPlan
from moeprune.recipe import Recipe

RECOVERY_WORK = "recovery-work"  # out-of-core recovery's tensors (in the run folder) until the rewrite read them


def eval_into(results: dict[str, Any], key: str, fn: Callable[[dict[str, Any]], None]) -> None:
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


def apply_in_memory(model, m, tok, r: Recipe, plan: PruningPlan, out, results, progress):
    from moeprune.apply import apply_plan, save_pruned

    evaluate = has_eval(r.eval)
    summary = {"method": plan.method, "expert_sparsity": plan.expert_sparsity()}
    if evaluate:
        eval_into(results, "original", lambda d: measure(m, tok, r.eval, progress=progress, into=d))
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

        eval_into(results, "pruned", pruned)
    if out and r.apply.save:
        save_pruned(m, os.path.join(out, "model"), plan=plan, tokenizer=tok, max_shard_size=r.apply.max_shard_size)
    return m, plan


def apply_streaming(model, m, tok, r: Recipe, plan: PruningPlan, out, results, progress):
    """Out of core: shards are rewritten, the pruned model is loaded only to evaluate it."""
    from moeprune.apply.streaming import rewrite_checkpoint
    from moeprune.models import load_model

    evaluate = has_eval(r.eval)
    if evaluate:
        eval_into(results, "original", lambda d: measure(m, tok, r.eval, progress=progress, into=d))
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

    eval_into(results, "pruned", measure_pruned)
    return pruned, plan
