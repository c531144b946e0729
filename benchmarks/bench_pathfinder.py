"""Time MoE Pathfinder's path search at DeepSeek-V3 scale on random statistics.

    python benchmarks/bench_pathfinder.py                      # 256 experts x 60 layers, m=500, N=25
    python benchmarks/bench_pathfinder.py --coroute --samples 5
    python benchmarks/bench_pathfinder.py --threads 1
    python benchmarks/bench_pathfinder.py --stats STATS_DIR --m 10 --sparsity 0.5   # compare variants

Prints seconds for the DP alone (``topm_paths`` on each sample's graph) and for the whole
``plan`` (graph building, IQR outlier rule, DP, aggregation to the budget). With ``--stats`` (an
``ExpertStats`` folder observed with feature "paths", plus "transitions" for the co-routing row) it
instead plans with the reference default and each importance / L-normalisation variant and prints the
Jaccard index of their kept (layer, expert) sets against the reference default.
"""
from __future__ import annotations

import argparse
import time

import torch

from moeprune.methods.pathfinder import Pathfinder, PathfinderCoroute, node_importance
from moeprune.methods.pathfinder_dp import topm_paths
from moeprune.methods.target import Target
from moeprune.observe.stats import ExpertStats


def random_stats(n: int, e: int, layers: int, seed: int = 0) -> ExpertStats:
    """Plausible per-sample statistics: peaked router probabilities, log-normal norms, losses ~ 40-60."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for li in range(layers):
        data[li] = {
            "count": torch.rand(e, generator=g, dtype=torch.float64) * 1000,
            "sample_tokens": torch.full((n,), 2048.0, dtype=torch.float64),
            "sample_prob_mean": torch.softmax(2 * torch.randn(n, e, generator=g, dtype=torch.float64), 1),
            "sample_norm_mean": torch.exp(0.3 * torch.randn(n, e, generator=g, dtype=torch.float64)),
            "sample_recon_loss": 40 + 20 * torch.rand(n, e, generator=g, dtype=torch.float64),
            "transition": torch.poisson(torch.rand(e, e, generator=g, dtype=torch.float64) * 8, generator=g),
        }
    meta = {"model_type": "synthetic", "moe_layers": list(range(layers)),
            "num_experts": {str(li): e for li in range(layers)},
            "top_k": {str(li): 8 for li in range(layers)},
            "next_moe_layer": {str(li): li + 1 for li in range(layers - 1)}}
    return ExpertStats(layers=data, meta=meta)


VARIANTS = {  # label -> (class, options); the first is the reference default
    "reference (default)": (Pathfinder, {}),
    "ti_only ablation": (Pathfinder, {"ablation": "ti_only"}),
    "stable_softmax": (Pathfinder, {"importance": "stable_softmax"}),
    "l_norm=relative tau=0.05": (Pathfinder, {"l_norm": "relative", "tau": 0.05}),
    "l_norm=relative tau=0.1": (Pathfinder, {"l_norm": "relative", "tau": 0.1}),
    "l_norm=rms tau=1": (Pathfinder, {"l_norm": "rms"}),
    "coroute (default)": (PathfinderCoroute, {}),
    "coroute stable_softmax": (PathfinderCoroute, {"importance": "stable_softmax"}),
}


def compare(stats: ExpertStats, m: int, sparsity: float) -> None:
    """Kept-set Jaccard of each variant against the reference default plan."""
    layers = stats.moe_layers
    loss = torch.stack([stats.get(li, "sample_recon_loss") for li in layers])  # [layers, N, E]
    print(f"L: min {float(loss.min()):.4g}, max {float(loss.max()):.4g}; layers {len(layers)}, "
          f"samples {loss.shape[1]}, experts {loss.shape[2]}")
    if "sample_out_norm" in stats.layers[layers[0]]:
        rel = loss / torch.stack([stats.get(li, "sample_out_norm") for li in layers]).unsqueeze(-1)
        print(f"L / ||Y||_F: min {float(rel.min()):.4g}, max {float(rel.max()):.4g}")
    target = Target(expert_sparsity=sparsity, allocation="method")
    ref = None
    for label, (cls, kw) in VARIANTS.items():
        try:
            keep = cls(m=m, **kw).plan(stats, target).keep()
        except KeyError as exc:  # statistic not observed (transitions, sample_out_norm)
            print(f"  {label:28s} skipped: {exc}")
            continue
        kept = {(li, e) for li, v in keep.items() for e in v}
        ref = kept if ref is None else ref
        print(f"  {label:28s} Jaccard vs reference {len(kept & ref) / len(kept | ref):.3f}  "
              f"per layer {[len(v) for v in keep.values()]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--m", type=int, default=None, help="paths per sample (default 500; 10 with --stats)")
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--coroute", action="store_true", help="time the co-routing variant (dense E x E DP)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stats", default=None, help="ExpertStats folder: compare the variants' plans instead")
    ap.add_argument("--sparsity", type=float, default=0.5, help="expert sparsity of the --stats comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stats:
        compare(ExpertStats.load(args.stats), args.m or 10, args.sparsity)
        return
    args.m = args.m or 500
    stats = random_stats(args.samples, args.experts, args.layers)
    cls = PathfinderCoroute if args.coroute else Pathfinder
    method = cls(m=args.m, max_samples=None)
    layers = stats.moe_layers
    ctx = method._prepare(stats, layers)

    dp_s, n_paths = 0.0, 0
    for s in range(args.samples):
        en = [torch.ones(args.experts, dtype=torch.bool)] * len(layers)
        e = [node_importance(stats.get(li, "sample_recon_loss")[s], en[0], method.tau, method.importance)
             for li in layers]
        source, edges, sink, _ = method._graph(stats, layers, s, e, en, ctx)
        t0 = time.perf_counter()
        w, _ = topm_paths(source, edges, sink, args.m)
        dp_s += time.perf_counter() - t0
        n_paths += w.numel()
    t0 = time.perf_counter()
    plan = method.plan(stats, Target(expert_sparsity=0.5, allocation="method"))
    plan_s = time.perf_counter() - t0
    print(f"{cls.name}: {args.experts} experts x {args.layers} layers, m={args.m}, N={args.samples}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"  DP only   : {dp_s:.2f} s total, {dp_s / args.samples:.3f} s/sample ({n_paths} paths)")
    print(f"  full plan : {plan_s:.2f} s (kept {sum(plan.kept_counts().values())} experts, "
          f"sparsity {plan.expert_sparsity():.3f})")


if __name__ == "__main__":
    main()
