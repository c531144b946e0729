"""Calibration stability on the toy MoE: how many samples until each method's plan stops moving.

One observe pass (``routed`` + ``direction``, per-batch partials, one sample per batch) over the toy
model's calibration split, then for every method and sparsity: bootstrap over the samples (mean Jaccard
of the resampled kept sets against the full-data plan, experts flipping in > 10 % of resamples), the
sufficiency curve (1/8, 1/4, 1/2, all of the samples, subsampled without replacement), and the agreement
between methods. No model forward after the observe pass.

    python -m benchmarks.toy_moe.train            # once
    python benchmarks/bench_stability.py          # writes benchmarks/results/stability.{jsonl,md,png}
    python benchmarks/bench_stability.py --dtype bfloat16 --out benchmarks/results/stability-bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_quality import calibration
from benchmarks.toy_moe.corpus import load_splits
from benchmarks.toy_moe.model import load_toy_model
from moeprune.methods import Target, get_method
from moeprune.observe import ExpertStats, observe
from moeprune.report.stability import plot_sufficiency
from moeprune.stability import agreement, bootstrap, sufficiency

METHODS = ("frequency", "reap", "man", "easyep")


def run(stats, methods, sparsities, resamples: int, subsamples: int, seed: int) -> tuple[list[dict], dict]:
    rows, panels = [], {}
    for s in sparsities:
        target, curves = Target(expert_sparsity=s), {}
        for name in methods:
            m = get_method(name)
            boot = bootstrap(stats, m, target, n_resamples=resamples, seed=seed)
            suff = sufficiency(stats, m, target, n_resamples=subsamples, seed=seed)
            curves[name] = suff
            rows.append({"method": name, "sparsity": s, "num_samples": boot["num_samples"],
                         "bootstrap_jaccard": statistics.fmean(boot["jaccard"].values()),
                         "bootstrap_jaccard_per_layer": boot["jaccard"],
                         "unstable": boot["unstable"], "n_unstable": sum(map(len, boot["unstable"].values())),
                         "sufficiency": [{k: c[k] for k in ("fraction", "samples", "mean", "sd", "independent",
                                                             "independent_sd") if k in c} for c in suff]})
            print(f"{name:10s} s={s:.2f} bootstrap J={rows[-1]['bootstrap_jaccard']:.3f} unstable="
                  f"{rows[-1]['n_unstable']:2d}  curve " + " ".join(f"{c['samples']}:{c['mean']:.3f}/{c.get('independent', 1):.3f}"
                                                     for c in suff))
        agree = agreement(stats, {n: get_method(n) for n in methods}, target)
        rows.append({"agreement": agree, "sparsity": s})
        panels[f"{s:.0%} of experts pruned"] = curves
    return rows, panels


def to_markdown(rows: list[dict]) -> str:
    fr = [c for c in next(r for r in rows if "method" in r)["sufficiency"]]
    head = " | ".join(f"{c['samples']} samples" for c in fr)
    lines = [("Cells: mean Jaccard of the kept sets vs the full-data plan ± sd over subsamples; after `/`, "
              "between the plans of two disjoint subsets of that many samples."), "",
             f"| method | sparsity | bootstrap mean Jaccard | experts flipping >10% | {head} |",
             "|---|---|---|---|" + "---|" * len(fr)]
    for r in rows:
        if "method" not in r:
            continue
        cells = " | ".join(f"{c['mean']:.3f} ± {c['sd']:.3f}" + (f" / {c['independent']:.3f}" if "independent" in c
                                                                  else "") for c in r["sufficiency"])
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['bootstrap_jaccard']:.3f} | {r['n_unstable']} | "
                     f"{cells} |")
    lines.append("")
    for r in rows:
        if "agreement" in r:
            a = r["agreement"]
            n_cons = sum(len(d["consensus"]) for d in a["layers"].values())
            n_cont = sum(len(d["contested"]) for d in a["layers"].values())
            lines.append(f"- {r['sparsity']:.0%}: every method keeps {n_cons} experts, {n_cont} are contested "
                         f"(over {len(a['layers'])} layers)")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-dir", default=None)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--per-domain", type=int, default=32, help="calibration samples per domain (5 domains)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--subsamples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "stability"))
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    splits = load_splits(a.toy_dir, build=False)
    model, tok = load_toy_model(a.toy_dir)
    model = model.to(getattr(torch, a.dtype))
    t0 = time.time()
    data = {"source": "toy-moe calib splits", "per_domain": a.per_domain, "seq_len": a.seq_len, "dtype": a.dtype}
    stats_dir = f"{a.out}-{a.dtype}-stats"  # git-ignored (benchmarks/results/*-stats/)
    if os.path.isfile(os.path.join(stats_dir, "stats.json")) and ExpertStats.load(stats_dir).meta["data"] == data:
        stats = ExpertStats.load(stats_dir)  # the same calibration pass: reuse it
    else:
        batches = calibration(splits, tok, a.per_domain, a.seq_len, batch_size=1)  # one sample per batch
        stats = observe(model, batches, features=("routed", "direction"), data=data)
        stats.save(stats_dir)
    n = stats.meta["num_samples"]
    print(f"observe: {n} samples in {time.time() - t0:.1f}s ({a.dtype})")
    t1 = time.time()
    rows, panels = run(stats, a.methods, a.sparsities, a.resamples, a.subsamples, a.seed)
    print(f"resampling: {time.time() - t1:.1f}s")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    md = to_markdown(rows)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    plot_sufficiency(panels, a.out + ".png", title=f"Toy MoE ({n} calibration samples, {a.dtype}): "
                     "plan agreement vs samples used")
    print("\n" + md + f"results in {a.out}.jsonl / .md / .png")


if __name__ == "__main__":
    main()
