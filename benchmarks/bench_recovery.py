"""Recovery benchmark: the best three methods of the quality table, with and without each recovery step.

Same toy MoE, calibration rows and per-domain held-out text as ``bench_quality.py`` (its helpers), and
the same saved statistics when present (``results/quality-stats``: then the "none" rows reproduce the
quality table). The best three methods are read from ``results/quality.jsonl`` (lowest macro perplexity
at 50 %). The MoE-block inputs are captured once from the unpruned model and shared by every fit. Each
recovered model is a copy of the unpruned one, recovered, then pruned structurally with ``apply_plan``.

    nice -n 5 python benchmarks/bench_recovery.py     # writes benchmarks/results/recovery.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_quality import METHODS, calibration, macro_ppl
from benchmarks.toy_moe.corpus import load_splits
from benchmarks.toy_moe.model import load_toy_model
from moeprune.apply import apply_plan
from moeprune.methods import Target, get_method
from moeprune.observe import ExpertStats, observe
from moeprune.recover import capture_inputs, recover

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RECOVERIES = [  # (label, recovery config or None); every option spelled out in the label
    ("none", None),
    ("compensate down ridge=0.001", {"name": "compensate", "target": "down", "ridge": 1e-3}),
    ("compensate down ridge=0.01", {"name": "compensate", "target": "down", "ridge": 1e-2}),
    ("compensate down ridge=0.1", {"name": "compensate", "target": "down", "ridge": 0.1}),
    ("compensate down ridge=0.3", {"name": "compensate", "target": "down", "ridge": 0.3}),
    ("compensate down ridge=1", {"name": "compensate", "target": "down", "ridge": 1.0}),
    ("compensate scale ridge=0.01", {"name": "compensate", "target": "scale", "ridge": 1e-2}),
    ("compensate scale ridge=0.1", {"name": "compensate", "target": "scale", "ridge": 0.1}),
    ("merge align=true", {"name": "merge", "align": True}),
    ("merge align=false", {"name": "merge", "align": False}),
]


def best_methods(n: int, sparsity: float = 0.5) -> list[tuple]:
    """The ``n`` METHODS rows of lowest macro perplexity at ``sparsity`` in results/quality.jsonl."""
    with open(os.path.join(RESULTS, "quality.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    labels = {m[0]: m for m in METHODS}
    ranked = sorted((r for r in rows if r["sparsity"] == sparsity and r["method"] in labels and "macro" in r),
                    key=lambda r: r["macro"])
    return [labels[r["method"]] for r in ranked[:n]]


def target_of(kind: str, s: float) -> Target:
    return (Target(param_ratio=1.0 - s) if kind == "params" else
            Target(expert_sparsity=s, allocation="method" if kind == "method" else "uniform"))


def run_one(model, tok, splits, plan, rec_cfg, inputs, test_tokens: int) -> dict:
    """Macro/per-domain held-out perplexity of ``plan`` after recovery ``rec_cfg`` (None: plain pruning)."""
    m = copy.deepcopy(model)
    row: dict = {}
    if rec_cfg is not None:
        try:
            record = recover(m, plan, cfg=rec_cfg, inputs=inputs)
        except (ValueError, NotImplementedError) as e:
            return {"error": str(e)}
        lays = record["layers"].values()
        row["residual_before"] = sum(v["residual_before"] for v in lays) / len(lays)
        row["residual_after"] = sum(v["residual_after"] for v in lays) / len(lays)
        aligned = [a for v in lays for a in v.get("aligned", {}).values()]
        if aligned:  # merge align=true: how many dropped experts had their neurons re-ordered
            row["aligned"] = f"{sum(aligned)}/{len(aligned)}"
    apply_plan(m, plan)
    return {**row, **macro_ppl(m, tok, splits, test_tokens)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-dir", default=None)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--per-domain", type=int, default=16, help="calibration rows per domain (as bench_quality)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--test-tokens", type=int, default=16384, help="held-out tokens per domain")
    p.add_argument("--max-tokens", type=int, default=4096, help="captured tokens per layer (recovery.max_tokens)")
    p.add_argument("--methods", type=int, default=3, help="how many of the best methods")
    p.add_argument("--stats", default=os.path.join(RESULTS, "quality-stats"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(RESULTS, "recovery"))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    splits = load_splits(a.toy_dir, build=False)
    model, tok = load_toy_model(a.toy_dir)
    methods = best_methods(a.methods)
    needs = sorted({g for _, name, _, _ in methods for g in get_method(name).needs})
    batches = calibration(splits, tok, a.per_domain, a.seq_len)
    if os.path.isfile(os.path.join(a.stats, "stats.json")) and \
            set(needs) <= set(ExpertStats.load(a.stats).meta.get("features", [])):
        stats = ExpertStats.load(a.stats)  # bench_quality's pass on the same calibration rows
    else:
        stats = observe(model, batches, features=needs, data={"source": "toy-moe calib splits"}, recon_tokens=64)
    inputs = capture_inputs(model, batches, max_tokens=a.max_tokens, seed=0)
    print(f"statistics + captured inputs: {time.time() - t0:.0f}s; methods {[m[0] for m in methods]}")
    rows = [{"method": "unpruned", "sparsity": 0.0, "recovery": "none", **macro_ppl(model, tok, splits,
                                                                                     a.test_tokens)}]
    for s in a.sparsities:
        for label, name, opts, kind in methods:
            plan = get_method(name, **opts).plan(stats, target_of(kind, s))
            for rlabel, rcfg in RECOVERIES:
                t = time.time()
                res = run_one(model, tok, splits, plan, rcfg, inputs, a.test_tokens)
                rows.append({"method": label, "sparsity": s, "recovery": rlabel, **res,
                             "seconds": round(time.time() - t, 1)})
                print(f"{label:28s} s={s:.2f} {rlabel:18s} " + (f"macro {res['macro']:7.2f}" if "macro" in res
                                                                else f"n/a: {res['error'][:80]}"), flush=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"test_tokens_per_domain": a.test_tokens, "max_tokens": a.max_tokens, "rows": rows}, f, indent=1)
    md = to_markdown(rows, sorted(splits))
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print("\n" + md + f"\ntotal {time.time() - t0:.0f}s; results in {a.out}.json / .md")


def to_markdown(rows: list[dict], domains: list[str]) -> str:
    base = rows[0]["macro"]
    lines = ["| method | sparsity | recovery | macro ppl | x unpruned | calib. residual before -> after | "
             + " | ".join(domains) + " |", "|" + "---|" * (6 + len(domains))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['recovery']} | n/a: {r['error'][:70]} |"
                         + " |" * (2 + len(domains)))
            continue
        res = (f"{r['residual_before']:.3f} -> {r['residual_after']:.3f}" if "residual_after" in r else "-")
        cells = " | ".join(f"{r[d]:.1f}" for d in domains)
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['recovery']} | {r['macro']:.1f} | "
                     f"{r['macro'] / base:.3f} | {res} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
