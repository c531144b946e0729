"""``moeprune`` command line: run a recipe end to end, or one pipeline stage at a time."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from moeprune.cli_support import (
    StageFailed,
    check_model_args,
    cli_message,
    hub_snapshot,
    quiet_libraries,
    warn_uncovered,
    writable_dir,
    writable_file,
)

EPILOG = """examples:
  moeprune demo out/demo                                   # trained toy MoE, 4 methods + random, 25/50%
  moeprune run recipe.yaml out/run --set target.expert_sparsity=0.25
  moeprune observe --model Qwen/Qwen3-30B-A3B --data calib.jsonl --features routed --out out/stats
  torchrun --nproc-per-node 8 -m moeprune.cli observe ...  # data-parallel: rank 0 saves merged stats
  moeprune plan --stats out/stats --method msan --sparsity 0.5 --out out/plan.json
  moeprune apply --model Qwen/Qwen3-30B-A3B --plan out/plan.json --out out/model --streaming
  moeprune eval --model out/model --base Qwen/Qwen3-30B-A3B --text heldout.txt --out out/eval.json
  moeprune stability out/stats --method reap --sparsity 0.5   # does the plan survive resampled data?
  moeprune report out/run
  moeprune methods | moeprune archs | moeprune validate recipe.yaml
"""


def _kv(items: list[str]) -> dict:
    """``--opt key=value`` items: the recipe's ``--set`` parser (one rule for both)."""
    from moeprune.recipe import apply_overrides

    return apply_overrides({}, items)


def _default(section: str, field: str):
    """A CLI default read from the pydantic recipe models (one definition, no hand-copied numbers)."""
    from moeprune.recipe import CalibrationConfig, EvalConfig, Recipe

    cls = {"calibration": CalibrationConfig, "eval": EvalConfig, "recipe": Recipe}[section]
    return cls.model_fields[field].default




def cmd_run(a) -> None:
    from moeprune.api import oneshot
    from moeprune.recipe import Recipe, apply_overrides

    recipe = Recipe.load(a.config, a.set) if a.config else Recipe.model_validate(apply_overrides({}, a.set))
    res = oneshot(recipe.model, recipe=recipe, output_dir=a.out, overwrite=a.overwrite, progress=not a.quiet)
    pr = res.eval.get("pruned", {}) if res.eval else {}
    orig = res.eval.get("original", {}) if res.eval else {}
    print(f"plan: {res.plan.method}, expert sparsity {res.plan.expert_sparsity():.1%}, kept {res.plan.kept_counts()}")
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
    from moeprune.api import calibrate
    from moeprune.models import load_model, load_offloaded_model, warn_positions
    from moeprune.recipe import CalibrationConfig

    cfg = CalibrationConfig(dataset=a.data, num_samples=a.num_samples, seq_len=a.seq_len, batch_size=a.batch_size,
                            text_column=a.text_column, select=a.select, seed=a.seed, layerwise=a.layerwise,
                            recon_tokens=a.recon_tokens, recon_max_gb=a.recon_max_gb)
    check_model_args(a)
    if a.method:
        from moeprune.methods.registry import get_method

        get_method(a.method)
    writable_dir(a.out, "statistics")
    warn_positions(a.model, cfg.seq_len, "calibration")
    if a.layerwise and os.path.isdir(a.model):  # larger than memory: decoder layers stay on disk until used
        model, tok = load_offloaded_model(a.model, os.path.join(a.out, "offload"), dtype=a.dtype, device=a.device,
                                          experts_implementation=a.experts_implementation)
    else:
        model, tok = load_model(a.model, dtype=a.dtype, device=a.device,
                                experts_implementation=a.experts_implementation)
    feats = tuple(f.strip() for f in a.features.split(",") if f.strip())
    if a.method:
        from moeprune.methods.registry import get_method

        feats = tuple(dict.fromkeys(feats + tuple(get_method(a.method).needs)))
    dist = _init_distributed()
    stats = calibrate(model, tok, cfg, feats, stats_dir=a.out, progress=not a.quiet)
    if dist is not None:
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    if a.layerwise:
        import shutil

        shutil.rmtree(os.path.join(a.out, "offload"), ignore_errors=True)
    print(f"statistics of {len(stats.layers)} MoE layers ({', '.join(feats)}) saved to {a.out}")


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
    from moeprune.api import kl_to_original, measure
    from moeprune.evaluate.lmeval import run_lm_eval

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


def _gb_or_none(v: str) -> float | None:
    """``--recon-max-gb``: a number > 0, or none."""
    if v.lower() in ("none", "null"):
        return None
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not f > 0:
        raise argparse.ArgumentTypeError(f"{v!r}: give a size in GB > 0 (e.g. 8), or 'none' for no bound")
    return f


def _int_or_none(v: str) -> int | None:
    """``--recon-tokens``: a positive integer, or none (every token)."""
    if v.lower() in ("none", "null", "all"):
        return None
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: give a positive number of tokens per batch, or 'all'")
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeprune", description="One-shot expert pruning for MoE LLMs.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, device=True):
        sp.add_argument("--model", required=True, help="hub id, folder, or tiny:<model_type>")
        sp.add_argument("--dtype", default=_default("recipe", "dtype"))
        if device:
            sp.add_argument("--device", default=_default("recipe", "device"))

    s = sub.add_parser("run", help="observe -> plan -> apply -> eval -> report from a recipe")
    s.add_argument("config", nargs="?", help="recipe YAML (defaults when omitted)")
    s.add_argument("out")
    s.add_argument("--set", action="append", default=[], help="override, e.g. target.expert_sparsity=0.25")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("demo", help="a small trained MoE pruned by several methods at 25 %% and 50 %%: report")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the toy model is too small to gain from more)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("observe", help="collect calibration statistics")
    model_args(s)
    s.add_argument("--experts-implementation", default=_default("recipe", "experts_implementation"),
                   help="auto: eager on CPU, default elsewhere")
    s.add_argument("--data", default=_default("calibration", "dataset"),
                   help="file (.txt .md .py .jsonl .json .parquet .csv), folder of them, HF dataset name, or "
                        "builtin:stdlib")
    s.add_argument("--text-column", default=_default("calibration", "text_column"))
    s.add_argument("--features", default="routed", help="comma list: routed,direction,neurons,transitions,"
                   "paths,cluster,reconstruction")
    s.add_argument("--method", default=None, help="also collect what this method needs")
    s.add_argument("--num-samples", type=int, default=_default("calibration", "num_samples"))
    s.add_argument("--seq-len", type=int, default=_default("calibration", "seq_len"))
    s.add_argument("--batch-size", type=int, default=_default("calibration", "batch_size"))
    s.add_argument("--select", choices=["random", "kmeans"], default=_default("calibration", "select"))
    s.add_argument("--seed", type=int, default=_default("calibration", "seed"))
    s.add_argument("--layerwise", action="store_true", help="onload one decoder layer at a time")
    s.add_argument("--recon-max-gb", type=_gb_or_none, default=_default("calibration", "recon_max_gb"),
                   help="reconstruction (NAEE) cache bound in GB; above it a seeded per-batch token subsample, "
                   "with a warning ('none': no bound)")
    s.add_argument("--recon-tokens", type=_int_or_none, default=_default("calibration", "recon_tokens"),
                   help="reconstruction (NAEE): cache this many tokens per batch (default: every token)")
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_observe)

    s = sub.add_parser("plan", help="score saved statistics and write a plan JSON")
    s.add_argument("--stats", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--opt", action="append", default=[], help="method option key=value")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--sparsity", type=float, dest="sparsity")
    g.add_argument("--param-ratio", type=float)
    g.add_argument("--memory-gb", type=float)
    s.add_argument("--allocation", choices=["uniform", "global", "method"], default="uniform")
    s.add_argument("--min-keep", type=int, default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("apply", help="apply a plan: in memory, or by streaming safetensors shards")
    s.add_argument("--model", required=True)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--plan", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--streaming", action="store_true", help="rewrite shards without loading the model")
    s.add_argument("--ragged", choices=("auto", "buckets", "pad"), default="auto",
                   help="ragged neuron widths: width buckets where supported (auto), always buckets, or pad+zero; "
                        "--streaming writes pad only")
    s.add_argument("--max-shard-size", default="5GB")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_apply)

    s = sub.add_parser("eval", help="perplexity, KL to a base model, lm-eval tasks")
    model_args(s)
    s.add_argument("--base", default=None, help="unpruned model, for KL and side-by-side numbers")
    s.add_argument("--text", default=_default("eval", "perplexity"),
                   help="held-out text: file, folder, builtin:stdlib-heldout, or none")
    s.add_argument("--seq-len", type=int, default=_default("eval", "seq_len"))
    s.add_argument("--max-tokens", type=int, default=_default("eval", "max_tokens"))
    s.add_argument("--tasks", default=None, help="lm-eval tasks, comma separated (pip install moeprune[eval])")
    s.add_argument("--include-path", default=None)
    s.add_argument("--limit", type=int, default=_default("eval", "lm_eval_limit"))
    s.add_argument("--out", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="plots and tables from a run folder")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("stability", help="bootstrap a method's plan over the calibration batches of saved stats")
    s.add_argument("stats", help="stats folder from `moeprune observe` (per-batch partials are on by default)")
    s.add_argument("--method", required=True)
    s.add_argument("--opt", action="append", default=[], help="method option key=value")
    s.add_argument("--sparsity", type=float, required=True, help="expert sparsity, e.g. 0.5")
    s.add_argument("--resamples", type=int, default=100, help="bootstrap resamples")
    s.add_argument("--subsamples", type=int, default=20, help="random subsets per fraction of the sufficiency curve")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--compare", default=None, help="comma list of other methods: consensus / contested experts")
    s.add_argument("--out", default=None, help="folder (default STATS/stability-METHOD-SPARSITY)")
    s.set_defaults(fn=cmd_stability)

    sub.add_parser("methods", help="list methods").set_defaults(fn=cmd_methods)
    sub.add_parser("archs", help="list supported architectures").set_defaults(fn=cmd_archs)
    s = sub.add_parser("validate", help="validate a recipe")
    s.add_argument("config")
    s.add_argument("--set", action="append", default=[])
    s.set_defaults(fn=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOEPRUNE_LOG_LEVEL", "DEBUG" if args.verbose else "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        args.fn(args)
    except StageFailed as e:
        print(f"moeprune {args.cmd}: error: {cli_message(e, args.cmd)}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError, NotImplementedError, ImportError) as e:
        if os.environ.get("MOEPRUNE_DEBUG"):
            raise
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", ()))  # e.g. where a failed run's results are
        print(f"moeprune {args.cmd}: error: {cli_message(e, args.cmd)}{notes}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
