"""Quality benchmark: every method on the toy MoE trained here on real offline text.

One calibration pass (all feature groups) over the calibration split of 5 domains, then every
registered method plans at each sparsity from the same saved statistics, and each plan is evaluated
by per-domain test perplexity (macro average) with the plan simulated by router masking (exactly
equal to structural pruning, see tests/test_apply_*). Random is run over several seeds.

    python -m benchmarks.toy_moe.train          # once (about 10 minutes on 2 cores)
    python benchmarks/bench_quality.py          # prints the table, writes benchmarks/results/quality.*
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.toy_moe.corpus import chunk_text, load_splits, split_documents
from benchmarks.toy_moe.model import domain_perplexity, load_toy_model
from moeprune.apply import mask_experts
from moeprune.methods import Target, get_method
from moeprune.observe import ExpertStats, build_batches, observe

# (label, method name, options, budget kind): "experts" -> expert_sparsity=s (uniform per layer),
# "method" -> the same sparsity with the method's own (non-uniform) allocation, "params" -> param_ratio=1-s
METHODS = [
    ("frequency", "frequency", {}, "experts"),
    ("soft_frequency", "soft_frequency", {}, "experts"),
    ("ean", "ean", {}, "experts"),
    ("reap", "reap", {}, "experts"),
    ("reap gate=applied", "reap", {"gate": "applied"}, "experts"),
    ("man", "man", {}, "experts"),
    ("msan", "msan", {}, "experts"),
    ("S(0,1,1)", "gated_ean_sum", {}, "experts"),
    ("S(0,1,1) gate=applied", "gated_ean_sum", {"gate": "applied"}, "experts"),
    ("S(0,2,2)", "squared_gated_sum", {}, "experts"),
    ("easyep", "easyep", {}, "experts"),
    ("naee", "naee", {"max_combinations": 20000}, "experts"),
    ("cprune", "cprune", {}, "experts"),
    ("cprune non-uniform", "cprune", {}, "method"),
    ("cprune global_stage=exact", "cprune", {"global_stage": "exact"}, "method"),
    ("pathfinder (code defaults)", "pathfinder", {}, "experts"),
    ("pathfinder m=100 all samples", "pathfinder", {"m": 100, "max_samples": None}, "experts"),
    ("pathfinder non-uniform", "pathfinder", {"m": 100, "max_samples": None}, "method"),
    ("pathfinder_coroute non-uniform", "pathfinder_coroute", {"m": 100, "max_samples": None}, "method"),
    ("pathfinder ti_only", "pathfinder", {"m": 100, "max_samples": None, "ablation": "ti_only"}, "experts"),
    ("pathfinder stable_softmax", "pathfinder", {"m": 100, "max_samples": None, "importance": "stable_softmax"},
     "experts"),
    ("pathfinder l_norm=relative tau=0.1", "pathfinder",
     {"m": 100, "max_samples": None, "l_norm": "relative", "tau": 0.1}, "experts"),
    ("pathfinder l_norm=relative tau=0.1 non-uniform", "pathfinder",
     {"m": 100, "max_samples": None, "l_norm": "relative", "tau": 0.1}, "method"),
    ("tenp (params)", "tenp", {}, "params"),
]


def calibration(splits: dict[str, dict[str, str]], tok, per_domain: int, seq_len: int,
                batch_size: int = 8) -> list[dict]:
    """``per_domain`` packed rows of ``seq_len`` tokens from each domain's calibration split, rows of all
    domains interleaved (seeded), so any prefix of the samples (Pathfinder's ``max_samples``) and every
    batch (C-Prune clusters per batch) mixes the domains."""
    rows = []
    for d in sorted(splits):
        docs = [c for doc in split_documents(splits[d]["calib"]) for c in chunk_text(doc, 4000)]
        rows += [b["input_ids"] for b in build_batches(docs, tok, num_samples=per_domain, seq_len=seq_len,
                                                       batch_size=1, seed=0)]
    ids = torch.cat(rows)[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size])}
            for i in range(0, len(ids), batch_size)]


def naee_online_stats(model, splits, tok, a, method, target) -> ExpertStats:
    """NAEE's candidate losses over every calibration token for ``target`` (feature ``naee_online``)."""
    from moeprune.observe.calibration import skeleton_stats
    from moeprune.observe.experts import build_banks

    t = time.time()
    spec = method.online_spec(skeleton_stats(model, build_banks(model)), target)
    batches = calibration(splits, tok, a.per_domain, a.seq_len)
    st = observe(model, batches, features=("routed", "naee_online"), naee=spec, progress=False)
    n = sum(int(s.candidates.shape[0]) for s in spec.values())
    print(f"naee online: {n} candidates over {len(batches)} batches, {st.meta['num_tokens']} tokens: "
          f"{time.time() - t:.0f}s ({(time.time() - t) / len(batches):.1f}s per batch)")
    return st


def macro_ppl(model, tok, splits, test_tokens: int) -> dict[str, float]:
    ppl = {d: domain_perplexity(model, tok, splits[d]["test"], max_tokens=test_tokens) for d in sorted(splits)}
    ppl["macro"] = statistics.geometric_mean([ppl[d] for d in sorted(splits)])  # as the toy recipe reports
    return ppl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-dir", default=None)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--random-seeds", type=int, default=8, help="0 skips the random baseline")
    p.add_argument("--per-domain", type=int, default=16, help="calibration rows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--test-tokens", type=int, default=16384, help="test tokens per domain")
    p.add_argument("--methods", nargs="*", default=None, help="subset of method labels")
    p.add_argument("--append", action="store_true", help="add these rows to an existing results file "
                   "(rows of the same method and sparsity are replaced; random/unpruned rows are kept)")
    p.add_argument("--naee-path", choices=["online", "cache"], default="online",
                   help="NAEE: score every keep set on every token during observe (one pass per sparsity; the "
                   "default of run / oneshot) or on the token cache of the shared pass (--recon-tokens)")
    p.add_argument("--recon-tokens", type=int, default=64,
                   help="NAEE cache: tokens per calibration batch (None = all; enumerating C(16,8) keep sets over "
                   "every token of the calibration set takes hours on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the toy model gains little from "
                   "more, and a busy machine makes several threads far slower)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality"))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    splits = load_splits(a.toy_dir, build=False)
    model, tok = load_toy_model(a.toy_dir)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    stats_dir = a.out + "-stats"
    t0 = time.time()
    methods = [m for m in METHODS if a.methods is None or m[0] in a.methods]
    online = a.naee_path == "online"
    needs = sorted({g for _, name, _, _ in methods for g in get_method(name).needs
                    if not (online and name == "naee" and g == "reconstruction")})
    if os.path.isfile(os.path.join(stats_dir, "stats.json")) and \
            set(needs) <= set(ExpertStats.load(stats_dir).meta.get("features", [])):
        stats = ExpertStats.load(stats_dir)  # same calibration data and seed: reuse the saved pass
    else:
        batches = calibration(splits, tok, a.per_domain, a.seq_len)
        stats = observe(model, batches, features=needs, data={"source": "toy-moe calib splits"},
                        recon_tokens=a.recon_tokens)
        stats.save(stats_dir)
    print(f"calibration statistics: {time.time() - t0:.1f}s ({', '.join(stats.meta.get('features', []))})")
    rows = [{"method": "unpruned", "sparsity": 0.0, **macro_ppl(model, tok, splits, a.test_tokens)}]
    print(f"unpruned macro ppl {rows[0]['macro']:.2f}")
    for s in a.sparsities:
        for label, name, opts, kind in methods:
            t = time.time()
            target = (Target(param_ratio=1.0 - s) if kind == "params" else
                      Target(expert_sparsity=s, allocation="method" if kind == "method" else "uniform"))
            try:
                st = stats
                if online and name == "naee":  # scored during observe, every token (run / oneshot's default)
                    st = naee_online_stats(model, splits, tok, a, get_method(name, **opts), target)
                plan = get_method(name, **opts).plan(st, target)
            except (ValueError, NotImplementedError) as e:
                print(f"{label:20s} s={s:.2f}  skipped: {e}")
                rows.append({"method": label, "sparsity": s, "error": str(e)})
                continue
            with mask_experts(model, plan):
                ppl = macro_ppl(model, tok, splits, a.test_tokens)
            rows.append({"method": label, "sparsity": s, "kept": plan.kept_counts(), **ppl,
                         "plan_seconds": round(time.time() - t, 2)})
            print(f"{label:20s} s={s:.2f}  macro ppl {ppl['macro']:8.2f}  kept {plan.kept_counts()}")
        if a.random_seeds < 1:
            continue
        rand = []
        for seed in range(a.random_seeds):
            plan = get_method("random", seed=seed).plan(stats, Target(expert_sparsity=s))
            with mask_experts(model, plan):
                rand.append(macro_ppl(model, tok, splits, a.test_tokens))
        ms = [r["macro"] for r in rand]
        rows.append({"method": f"random x{len(ms)}", "sparsity": s, "macro": statistics.fmean(ms),
                     "macro_sd": statistics.stdev(ms) if len(ms) > 1 else 0.0, "macro_min": min(ms),
                     **{d: statistics.fmean(r[d] for r in rand) for d in sorted(splits)}})
        print(f"{'random':20s} s={s:.2f}  macro ppl {rows[-1]['macro']:8.2f} +- {rows[-1]['macro_sd']:.2f}")
    if a.append and os.path.isfile(a.out + ".jsonl"):
        with open(a.out + ".jsonl") as f:
            old = [json.loads(line) for line in f if line.strip()]
        new_keys = {(r["method"], r["sparsity"]) for r in rows if r["method"] != "unpruned"}
        rows = [r for r in old if (r["method"], r["sparsity"]) not in new_keys] + \
            [r for r in rows if r["method"] != "unpruned" or not any(o["method"] == "unpruned" for o in old)]
        rows.sort(key=lambda r: (r["sparsity"], _order(r["method"])))
    with open(a.out + ".jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    md = to_markdown(rows, sorted(splits))
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print("\n" + md)
    print(f"total {time.time() - t0:.0f}s; results in {a.out}.jsonl / .md")


def _order(label: str) -> int:
    labels = [m[0] for m in METHODS]
    return labels.index(label) if label in labels else len(labels) + (0 if label.startswith("random") else 1)


def to_markdown(rows: list[dict], domains: list[str]) -> str:
    head = "| method | sparsity | macro ppl | " + " | ".join(domains) + " |"
    lines = [head, "|" + "---|" * (3 + len(domains))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['sparsity']:.0%} | n/a: {r['error'][:60]} |" + " |" * len(domains))
            continue
        macro = f"{r['macro']:.1f}" + (f" ± {r['macro_sd']:.1f}" if "macro_sd" in r else "")
        cells = " | ".join(f"{r[d]:.1f}" if isinstance(r.get(d), float) and math.isfinite(r[d]) else "-"
                           for d in domains)
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {macro} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
