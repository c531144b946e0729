"""The ``moeprune`` subcommands: one function per stage, called with the parsed arguments (``cli.py``
builds the parser and turns errors into one-line messages)."""
from __future__ import annotations

import dataclasses
import json
import os

from moeprune.cli_support import (
    StageFailed,
    check_model_args,
    hub_snapshot,
    warn_uncovered,
    writable_dir,
    writable_file,
)


def _kv(items: list[str]) -> dict:
    """``--opt key=value`` items: the recipe's ``--set`` parser (one rule for both)."""
    from moeprune.recipe import apply_overrides

    return apply_overrides({}, items)


def recovery_overrides(name: str | None, opts: list[str]) -> list[str]:
    """``--recovery NAME --recovery-opt k=v`` as recipe overrides (parsed by ``recipe.apply_overrides``)."""
    if opts and name is None:
        raise ValueError(f"--recovery-opt {opts[0]} needs --recovery compensate|merge (or change a recipe's "
                         "recovery with --set recovery.KEY=VALUE)")
    if name is None:
        return []
    if name.lower() in ("none", "null"):
        return ["recovery=null"]
    return [f"recovery={{name: {name}}}"] + [f"recovery.{o}" for o in opts]


def cmd_run(a) -> None:
    from moeprune.api import oneshot
    from moeprune.recipe import Recipe, apply_overrides

    sets = a.set + recovery_overrides(a.recovery, a.recovery_opt)
    recipe = Recipe.load(a.config, sets) if a.config else Recipe.model_validate(apply_overrides({}, sets))
    res = oneshot(recipe.model, recipe=recipe, output_dir=a.out, overwrite=a.overwrite, progress=not a.quiet)
    pr = res.eval.get("pruned", {}) if res.eval else {}
    orig = res.eval.get("original", {}) if res.eval else {}
    print(f"plan: {res.plan.method}, expert sparsity {res.plan.expert_sparsity():.1%}, kept {res.plan.kept_counts()}")
    rec = res.plan.meta.get("recovery")
    if rec:
        lay = rec["layers"].values()
        print(f"recovery: {rec['name']}, calibration residual (mean over layers) "
              f"{sum(v['residual_before'] for v in lay) / max(len(lay), 1):.4f} -> "
              f"{sum(v['residual_after'] for v in lay) / max(len(lay), 1):.4f}")
    if "ppl" in orig:
        print(f"perplexity: original {orig['ppl']:.3f} -> pruned {pr.get('ppl', float('nan')):.3f}; "
              f"KL {pr.get('kl', float('nan')):.4f}")
    print(f"outputs in {res.output_dir}")


def cmd_demo(a) -> None:
    import torch

    from moeprune.demo import run_demo

    torch.set_num_threads(a.threads)  # 1 by default: the toy model is too small to gain from threads
    res = run_demo(a.out, overwrite=a.overwrite, progress=not a.quiet)
    print(f"demo finished in {res['seconds']:.0f} s; report: {res['report']}")


def cmd_observe(a) -> None:
    from moeprune.models import load_layerwise_model, load_model, warn_positions
    from moeprune.observe.calibration import calibrate
    from moeprune.recipe import CalibrationConfig

    cfg = CalibrationConfig(dataset=a.data, num_samples=a.num_samples, seq_len=a.seq_len, batch_size=a.batch_size,
                            text_column=a.text_column, select=a.select, seed=a.seed, layerwise=a.layerwise,
                            sequential=a.sequential, recon_tokens=a.recon_tokens, recon_max_gb=a.recon_max_gb,
                            paths_max_gb=a.paths_max_gb, cluster_max_gb=a.cluster_max_gb,
                            partials_max_gb=a.partials_max_gb, transitions_max_gb=a.transitions_max_gb,
                            cluster_dtype=a.cluster_dtype)
    check_model_args(a)
    seq = _sequential_args(a)
    if a.method:
        from moeprune.methods.registry import get_method

        get_method(a.method)
    writable_dir(a.out, "statistics")
    warn_positions(a.model, cfg.seq_len, "calibration")
    if a.layerwise and os.path.isdir(a.model):  # larger than memory: each decoder layer read when it runs
        model, tok = load_layerwise_model(a.model, dtype=a.dtype, device=a.device,
                                          experts_implementation=a.experts_implementation)
    else:
        model, tok = load_model(a.model, dtype=a.dtype, device=a.device,
                                experts_implementation=a.experts_implementation)
    feats = tuple(f.strip() for f in a.features.split(",") if f.strip())
    if a.method:
        from moeprune.methods.registry import get_method

        feats = tuple(dict.fromkeys(feats + tuple(get_method(a.method).needs)))
    dist = _init_distributed()
    stats = calibrate(model, tok, cfg, feats, stats_dir=a.out, progress=not a.quiet, **seq)
    if dist is not None:
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    print(f"statistics of {len(stats.layers)} MoE layers ({', '.join(feats)}) saved to {a.out}")
    if seq:
        from moeprune.observe.sequential import sequential_plan

        plan = sequential_plan(stats)
        plan.save(os.path.join(a.out, "plan.json"))
        print(f"sequential {plan.method}: kept per layer {plan.kept_counts()} -> {os.path.join(a.out, 'plan.json')}")


def _sequential_args(a) -> dict:
    """``--sequential``: the method and target each layer is planned with during the pass."""
    given = [f for f in ("sparsity", "param_ratio") if getattr(a, f) is not None]
    if not a.sequential:
        if given or a.opt:
            raise ValueError(f"--{given[0].replace('_', '-') if given else 'opt'} only applies with --sequential "
                             "(to plan during observe); plan saved statistics with `moeprune plan`")
        return {}
    if not a.method or len(given) != 1:
        raise ValueError("--sequential plans each layer during the pass: give --method (e.g. reap) and exactly one "
                         "of --sparsity / --param-ratio")
    from moeprune.methods.registry import get_method
    from moeprune.methods.target import Target

    return {"method": get_method(a.method, **_kv(a.opt)),
            "target": Target(expert_sparsity=a.sparsity, param_ratio=a.param_ratio, allocation="uniform")}


def _init_distributed():
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist


def cmd_plan(a) -> None:
    from moeprune.methods.registry import get_method
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats

    method = get_method(a.method, **_kv(a.opt))
    writable_file(a.out, "plan")
    stats = ExpertStats.load(a.stats)
    if stats.meta.get("sequential_plan"):
        import logging

        logging.getLogger("moeprune").warning(
            "%s holds sequential statistics (each layer observed with the %s plan's upstream layers pruned); "
            "their own plan is %s/plan.json, a new plan here is made from those pruned-upstream statistics",
            a.stats, stats.meta["sequential_plan"].get("method"), a.stats)
    target = Target(expert_sparsity=a.sparsity, param_ratio=a.param_ratio, memory_gb=a.memory_gb,
                    allocation=a.allocation, min_keep=a.min_keep)
    plan = method.plan(stats, target)
    from moeprune.serving import warn_if_transformers_only

    warn_if_transformers_only(plan)  # non-uniform / ragged: say where the result will (not) load
    plan.save(a.out)
    print(f"{plan.method}: expert sparsity {plan.expert_sparsity():.1%}, kept per layer {plan.kept_counts()} -> {a.out}")


def cmd_apply(a) -> None:
    from moeprune.atomic import check_output_dir, output_lock
    from moeprune.plan import PruningPlan

    plan = PruningPlan.load(a.plan)
    src = a.model
    if a.streaming:
        from moeprune.models import resolve_model_source

        src = resolve_model_source(a.model)
        if src.startswith("tiny:"):
            raise ValueError(f"--streaming rewrites a checkpoint folder; {a.model!r} is a built-in tiny model, not "
                             "one (drop --streaming)")
        if not os.path.isdir(src):  # a hub id: the local snapshot (downloaded once, or from the cache offline)
            src = hub_snapshot(src)
    # before loading anything: never into / over the source, empty unless --overwrite, one writer at a time
    with output_lock(check_output_dir(a.out, sources=[src], overwrite=a.overwrite)):
        if a.streaming:
            from moeprune.apply.streaming import rewrite_checkpoint

            out = rewrite_checkpoint(src, plan, a.out, max_shard_size=a.max_shard_size, overwrite=a.overwrite,
                                     ragged=a.ragged)
        else:
            from moeprune.apply import apply_plan, save_pruned
            from moeprune.models import load_model

            model, tok = load_model(a.model, dtype=a.dtype, device="cpu")
            warn_uncovered(model, plan)
            apply_plan(model, plan, ragged=a.ragged)
            out = save_pruned(model, a.out, plan=plan, tokenizer=tok, max_shard_size=a.max_shard_size,
                              overwrite=a.overwrite)
    print(f"pruned checkpoint written to {out}")


def cmd_eval(a) -> None:
    """Perplexity (+ KL to --base), then lm-eval; what finished is saved even when a later stage fails."""
    from moeprune.evaluate.kl import check_comparable
    from moeprune.models import load_model, warn_positions
    from moeprune.recipe import EvalConfig

    text = None if a.text in ("none", "") else a.text
    cfg = EvalConfig(perplexity=text, seq_len=a.seq_len, max_tokens=a.max_tokens, kl=a.base is not None,
                     lm_eval_tasks=[t for t in (a.tasks or "").split(",") if t], lm_eval_include_path=a.include_path,
                     lm_eval_limit=a.limit)
    check_model_args(a)
    writable_file(a.out, "eval output")
    warn_positions(a.model, cfg.seq_len, "eval")
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device)
    base = None
    if a.base:
        base, base_tok = load_model(a.base, dtype=a.dtype, device=a.device)
        check_comparable(model, base, tok, base_tok, names=(f"--model {a.model}", f"--base {a.base}"))
    key = "pruned" if base is not None else "model"
    res: dict = {key: {}}
    stage = ["perplexity"]
    try:
        _eval_stages(res, key, model, base, tok, cfg, stage, progress=not a.quiet)
    except Exception as e:
        if not any(res.values()) or os.environ.get("MOEPRUNE_DEBUG"):
            raise
        res["error"] = {"stage": stage[0], "type": type(e).__name__, "message": str(e)}
        _write_eval(res, a.out)
        where = f"; the finished results are saved in {a.out}" if a.out else " (finished results printed above)"
        raise StageFailed(f"{stage[0]} failed after earlier stages finished ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}){where}") from e
    _write_eval(res, a.out)


def _eval_stages(res: dict, key: str, model, base, tok, cfg, stage: list[str], *, progress: bool) -> None:
    """Fill ``res`` stage by stage (``stage[0]`` names the running one, for the error entry)."""
    from moeprune.evaluate.lmeval import run_lm_eval
    from moeprune.evaluate.stage import kl_to_original, measure

    ppl_only = cfg.model_copy(update={"lm_eval_tasks": []})
    res[key].update(measure(model, tok, ppl_only, progress=progress))
    if base is not None:
        res["original"] = measure(base, tok, ppl_only, progress=progress)
        stage[0] = "kl"
        res[key].update(kl_to_original(base, tok, cfg, pruned=model, progress=progress))
    if cfg.lm_eval_tasks:
        stage[0] = "lm_eval"
        for name, m in ((key, model), ("original", base)):
            if m is not None:
                res[name]["lm_eval"] = run_lm_eval(m, tok, cfg.lm_eval_tasks, include_path=cfg.lm_eval_include_path,
                                                   limit=cfg.lm_eval_limit)["results"]


def _write_eval(res: dict, out: str | None) -> None:
    text = json.dumps(res, indent=1, default=str)
    if out:
        from moeprune.atomic import atomic_write_text

        atomic_write_text(out, text)
    print(text)


def cmd_report(a) -> None:
    from moeprune.report import make_report

    for p in make_report(a.run_dir, a.out):
        print(p)


def cmd_stability(a) -> None:
    """Bootstrap the plan over calibration batches (per-batch partials of one observe pass)."""
    from moeprune.methods.registry import get_method
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.report.stability import write_stability
    from moeprune.stability import agreement, bootstrap, sufficiency

    method, stats = get_method(a.method, **_kv(a.opt)), ExpertStats.load(a.stats)
    target = Target(expert_sparsity=a.sparsity)
    boot = bootstrap(stats, method, target, n_resamples=a.resamples, seed=a.seed)
    suff = sufficiency(stats, method, target, n_resamples=a.subsamples, seed=a.seed)
    names = [m.strip() for m in (a.compare or "").split(",") if m.strip()]
    agree = agreement(stats, {n: get_method(n) for n in dict.fromkeys([a.method, *names])}, target) if names else None
    out = a.out or os.path.join(a.stats, f"stability-{a.method}-{a.sparsity:g}")
    for path in write_stability(out, boot, suff, agree):
        print(path)
    worst = min(boot["jaccard"].items(), key=lambda kv: kv[1])
    n_unstable = sum(len(v) for v in boot["unstable"].values())
    print(f"{a.method} at {a.sparsity:.0%}: mean Jaccard {sum(boot['jaccard'].values()) / len(boot['jaccard']):.3f} "
          f"(worst layer {worst[0]}: {worst[1]:.3f}); {n_unstable} expert decisions flip in >10% of resamples; "
          f"half the samples agree {suff[-2]['mean']:.3f}")


def cmd_methods(a) -> None:
    from moeprune.methods.registry import METHODS, get_method

    get_method("frequency")  # imports and registers the built-in methods
    for name, cls in sorted(METHODS.items()):
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                         if f.default is not dataclasses.MISSING)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:20s} needs={','.join(cls.needs):28s} {doc}")
        if opts:
            print(f"{'':20s} options: {opts}")


def cmd_archs(a) -> None:
    from moeprune.arch.adapters import ADAPTERS

    for mt, ad in sorted(ADAPTERS.items()):
        print(f"{mt:22s} {getattr(ad, 'notes', '') or ''}")


def cmd_validate(a) -> None:
    from moeprune.recipe import Recipe

    r = Recipe.load(a.config, a.set)  # dtype, device, sizes, paths, method options: all checked here
    print(r.dump())
    print("recipe is valid")
