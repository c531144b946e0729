"""``moeprune`` command line: run a recipe end to end, or one pipeline stage at a time."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

EPILOG = """examples:
  moeprune demo out/demo                                   # tiny model, built-in data, REAP 50%
  moeprune run recipe.yaml out/run --set target.expert_sparsity=0.25
  moeprune observe --model Qwen/Qwen3-30B-A3B --data calib.jsonl --features routed --out out/stats
  torchrun --nproc-per-node 8 -m moeprune.cli observe ...  # data-parallel: rank 0 saves merged stats
  moeprune plan --stats out/stats --method msan --sparsity 0.5 --out out/plan.json
  moeprune apply --model Qwen/Qwen3-30B-A3B --plan out/plan.json --out out/model --streaming
  moeprune eval --model out/model --base Qwen/Qwen3-30B-A3B --text heldout.txt --out out/eval.json
  moeprune report out/run
  moeprune methods | moeprune archs | moeprune validate recipe.yaml
"""


def _kv(items: list[str]) -> dict:
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"option {it!r} must look like key=value")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


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


def cmd_observe(a) -> None:
    from moeprune.api import calibrate
    from moeprune.models import load_model, load_offloaded_model
    from moeprune.recipe import CalibrationConfig

    cfg = CalibrationConfig(dataset=a.data, num_samples=a.num_samples, seq_len=a.seq_len, batch_size=a.batch_size,
                            text_column=a.text_column, select=a.select, seed=a.seed, layerwise=a.layerwise)
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

    stats = ExpertStats.load(a.stats)
    method = get_method(a.method, **_kv(a.opt))
    target = Target(expert_sparsity=a.sparsity, param_ratio=a.param_ratio, memory_gb=a.memory_gb,
                    allocation=a.allocation, min_keep=a.min_keep)
    plan = method.plan(stats, target)
    plan.save(a.out)
    print(f"{plan.method}: expert sparsity {plan.expert_sparsity():.1%}, kept per layer {plan.kept_counts()} -> {a.out}")


def cmd_apply(a) -> None:
    from moeprune.plan import PruningPlan

    plan = PruningPlan.load(a.plan)
    if a.streaming:
        from moeprune.apply.streaming import rewrite_checkpoint

        src = a.model
        if not os.path.isdir(src):  # a hub id: the local snapshot (downloaded once, or from the cache offline)
            from huggingface_hub import snapshot_download

            src = snapshot_download(a.model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.py", "*.jinja"])
        out = rewrite_checkpoint(src, plan, a.out, max_shard_size=a.max_shard_size, ragged=a.ragged)
    else:
        from moeprune.apply import apply_plan, save_pruned
        from moeprune.models import load_model

        model, tok = load_model(a.model, dtype=a.dtype, device="cpu")
        apply_plan(model, plan, ragged=a.ragged)
        out = save_pruned(model, a.out, plan=plan, tokenizer=tok, max_shard_size=a.max_shard_size,
                          overwrite=a.overwrite)
    print(f"pruned checkpoint written to {out}")


def cmd_eval(a) -> None:
    from moeprune.api import kl_to_original, measure
    from moeprune.models import load_model
    from moeprune.recipe import EvalConfig

    cfg = EvalConfig(perplexity=a.text, seq_len=a.seq_len, max_tokens=a.max_tokens, kl=a.base is not None,
                     lm_eval_tasks=[t for t in (a.tasks or "").split(",") if t], lm_eval_include_path=a.include_path,
                     lm_eval_limit=a.limit)
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device)
    res = {"pruned" if a.base else "model": measure(model, tok, cfg, progress=not a.quiet)}
    if a.base:
        base, _ = load_model(a.base, dtype=a.dtype, device=a.device)
        res["original"] = measure(base, tok, cfg, progress=not a.quiet)
        res["pruned"].update(kl_to_original(base, tok, cfg, pruned=model, progress=not a.quiet))
    text = json.dumps(res, indent=1, default=str)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


def cmd_report(a) -> None:
    from moeprune.report import make_report

    for p in make_report(a.run_dir, a.out):
        print(p)


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

    r = Recipe.load(a.config, a.set)
    print(r.dump())
    print("recipe is valid")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeprune", description="One-shot expert pruning for MoE LLMs.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, device=True):
        sp.add_argument("--model", required=True, help="hub id, folder, or tiny:<model_type>")
        sp.add_argument("--dtype", default="float32")
        if device:
            sp.add_argument("--device", default="cpu")

    s = sub.add_parser("run", help="observe -> plan -> apply -> eval -> report from a recipe")
    s.add_argument("config", nargs="?", help="recipe YAML (defaults when omitted)")
    s.add_argument("out")
    s.add_argument("--set", action="append", default=[], help="override, e.g. target.expert_sparsity=0.25")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("demo", help="the built-in default: a tiny MoE pruned with REAP on built-in text")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_run, config=None, set=["calibration.num_samples=64", "calibration.seq_len=256"])

    s = sub.add_parser("observe", help="collect calibration statistics")
    model_args(s)
    s.add_argument("--experts-implementation", default="auto", help="auto: eager on CPU, default elsewhere")
    s.add_argument("--data", default="builtin:stdlib", help="file, HF dataset name, or builtin:stdlib")
    s.add_argument("--text-column", default="text")
    s.add_argument("--features", default="routed", help="comma list: routed,direction,neurons,transitions,"
                   "paths,cluster,reconstruction")
    s.add_argument("--method", default=None, help="also collect what this method needs")
    s.add_argument("--num-samples", type=int, default=128)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--select", choices=["random", "kmeans"], default="random")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--layerwise", action="store_true", help="onload one decoder layer at a time")
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
    s.add_argument("--text", default="builtin:stdlib-heldout")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--max-tokens", type=int, default=20000)
    s.add_argument("--tasks", default=None, help="lm-eval tasks, comma separated (pip install moeprune[eval])")
    s.add_argument("--include-path", default=None)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--out", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="plots and tables from a run folder")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_report)

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
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, NotImplementedError, ImportError) as e:
        if os.environ.get("MOEPRUNE_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"moeprune {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
