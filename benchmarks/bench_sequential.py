"""Sequential (error-propagating) vs one-shot calibration on the toy quality table.

One-shot: one full-model pass, every method plans from the same statistics (as ``bench_quality.py``).
Sequential: one layer-wise pass per method and sparsity (``observe_layerwise(..., sequential=True)``): each
MoE layer is planned when observed and re-run pruned before the next is observed. Same calibration
windows, same held-out per-domain perplexity (router masking), uniform allocation throughout (the only
one sequential calibration supports).

    python benchmarks/bench_sequential.py       # writes benchmarks/results/sequential.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_quality import METHODS, calibration, macro_ppl
from benchmarks.toy_moe.corpus import load_splits
from benchmarks.toy_moe.model import load_toy_model
from moeprune.apply import mask_experts
from moeprune.methods import Target, get_method
from moeprune.observe import observe, observe_layerwise
from moeprune.observe.sequential import sequential_plan

LABELS = ("frequency", "reap", "naee", "cprune", "pathfinder (code defaults)", "pathfinder m=100 all samples")
# TENP: its neuron plan (param_ratio = 1 - s, as the quality table) and its expert-removal mode
EXTRA = [("tenp (params)", "tenp", {}, "params"), ("tenp (experts)", "tenp", {}, "experts")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--per-domain", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--test-tokens", type=int, default=16384)
    p.add_argument("--recon-tokens", type=int, default=64, help="NAEE cache tokens per batch (as the quality table)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of labels")
    p.add_argument("--append", action="store_true", help="replace only these rows (method, sparsity) in an "
                   "existing results file")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sequential"))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    splits = load_splits(build=False)
    model, tok = load_toy_model()
    methods = [m for m in METHODS if m[0] in LABELS] + EXTRA
    methods = [m for m in methods if a.methods is None or m[0] in a.methods]
    batches = calibration(splits, tok, a.per_domain, a.seq_len)
    needs = sorted({g for _, name, _, _ in methods for g in get_method(name).needs})
    t0 = time.time()
    stats = observe(model, batches, features=needs, recon_tokens=a.recon_tokens, progress=False)
    print(f"one-shot calibration ({', '.join(needs)}): {time.time() - t0:.1f}s")
    rows = [{"method": "unpruned", "sparsity": 0.0, "ppl": macro_ppl(model, tok, splits, a.test_tokens)}]
    for s in a.sparsities:
        for label, name, opts, kind in methods:
            target = Target(param_ratio=1.0 - s) if kind == "params" else Target(expert_sparsity=s)
            method = get_method(name, **opts)
            one = method.plan(stats, target)
            t = time.time()
            st = observe_layerwise(model, batches, features=method.needs, recon_tokens=a.recon_tokens,
                                   progress=False, sequential=True, method=method, target=target)
            seq = sequential_plan(st)
            seconds = time.time() - t
            row = {"method": label, "sparsity": s, "sequential_seconds": round(seconds, 2),
                   "keep_oneshot": one.keep(), "keep_sequential": seq.keep(),
                   "same_layers": sum(one.layers[li].keep == seq.layers[li].keep
                                      and one.layers[li].neurons == seq.layers[li].neurons for li in one.layers)}
            for mode, plan in (("oneshot", one), ("sequential", seq)):
                with mask_experts(model, plan):
                    row[f"ppl_{mode}"] = macro_ppl(model, tok, splits, a.test_tokens)
            rows.append(row)
            print(f"s={s:.2f} {label:30s} one-shot {row['ppl_oneshot']['macro']:8.2f}  sequential "
                  f"{row['ppl_sequential']['macro']:8.2f}  same layers {row['same_layers']}/{len(one.layers)}  "
                  f"({seconds:.1f}s)")
    meta = {"windows": sum(int(b["input_ids"].shape[0]) for b in batches), "seq_len": a.seq_len,
            "test_tokens_per_domain": a.test_tokens, "recon_tokens": a.recon_tokens, "threads": a.threads}
    if a.append and os.path.isfile(a.out + ".json"):
        with open(a.out + ".json") as f:
            old = json.load(f)["rows"]
        new = {(r["method"], r["sparsity"]): r for r in rows}
        rows = [new.pop((r["method"], r["sparsity"]), r) for r in old] + list(new.values())
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = to_markdown(rows, sorted(splits), meta)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print("\n" + md)


def to_markdown(rows: list[dict], domains: list[str], meta: dict) -> str:
    head = (f"Toy MoE, {meta['windows']} x {meta['seq_len']} calibration tokens, uniform allocation; held-out "
            f"perplexity ({meta['test_tokens_per_domain']} tokens per domain), one-shot -> sequential.")
    out = [head, "", "| method | sparsity | same layers | macro ppl one-shot | macro ppl sequential | change | "
           + " | ".join(domains) + " |", "|---|---|---|---|---|---|" + "---|" * len(domains)]
    for r in rows:
        if r["method"] == "unpruned":
            out.append(f"| unpruned | 0% | | {r['ppl']['macro']:.2f} | | | "
                       + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains) + " |")
            continue
        o, q = r["ppl_oneshot"], r["ppl_sequential"]
        out.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['same_layers']}/{len(r['keep_oneshot'])} | "
                   f"{o['macro']:.2f} | {q['macro']:.2f} | {100 * (q['macro'] / o['macro'] - 1):+.1f} % | "
                   + " | ".join(f"{o[d]:.1f} -> {q[d]:.1f}" for d in domains) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
