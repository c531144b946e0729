"""``moeprune`` command line: run a recipe end to end, or one pipeline stage at a time."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from moeprune.cli_commands import (
    cmd_apply,
    cmd_archs,
    cmd_demo,
    cmd_eval,
    cmd_methods,
    cmd_observe,
    cmd_plan,
    cmd_report,
    cmd_run,
    cmd_stability,
    cmd_validate,
)
from moeprune.cli_support import StageFailed, cli_message, quiet_libraries

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


def _default(section: str, field: str):
    """A CLI default read from the pydantic recipe models (one definition, no hand-copied numbers)."""
    from moeprune.recipe import CalibrationConfig, EvalConfig, Recipe

    cls = {"calibration": CalibrationConfig, "eval": EvalConfig, "recipe": Recipe}[section]
    return cls.model_fields[field].default



def _gb_or_none(v: str) -> float | None:
    """``--recon-max-gb`` and the other ``--*-max-gb`` caps: a number > 0, or none."""
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
    s.add_argument("--recovery", default=None, help="recovery after planning: compensate | merge | none "
                   "(docs/RECOVERY.md)")
    s.add_argument("--recovery-opt", action="append", default=[], help="recovery option key=value, e.g. target=scale")
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
    s.add_argument("--sequential", action="store_true",
                   help="plan and prune each MoE layer before the next is observed (implies the layer-wise pass; "
                   "needs --method and --sparsity or --param-ratio; writes OUT/plan.json)")
    s.add_argument("--sparsity", type=float, default=None, help="with --sequential: expert sparsity")
    s.add_argument("--param-ratio", type=float, default=None, help="with --sequential: routed parameters kept")
    s.add_argument("--opt", action="append", default=[], help="with --sequential: method option key=value")
    s.add_argument("--recon-max-gb", type=_gb_or_none, default=_default("calibration", "recon_max_gb"),
                   help="reconstruction (NAEE) cache bound in GB; above it a seeded per-batch token subsample, "
                   "with a warning ('none': no bound)")
    s.add_argument("--recon-tokens", type=_int_or_none, default=_default("calibration", "recon_tokens"),
                   help="reconstruction (NAEE): cache this many tokens per batch (default: every token)")
    for opt, what in (("paths_max_gb", "paths (Pathfinder) per-sample rows"),
                      ("cluster_max_gb", "cluster (C-Prune) per-sample expert outputs"),
                      ("partials_max_gb", "per-batch partials of routed / direction"),
                      ("transitions_max_gb", "routed ids a layer-wise pass holds for transitions")):
        s.add_argument("--" + opt.replace("_", "-"), type=_gb_or_none, default=_default("calibration", opt),
                       help=f"bound in GB on the {what}, checked before calibration ('none': no bound)")
    s.add_argument("--cluster-dtype", choices=["float64", "float16"], default=_default("calibration", "cluster_dtype"),
                   help="storage of C-Prune's rows (float16: a quarter of the memory, cprune's default precision)")
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
