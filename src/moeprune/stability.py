"""How much to trust a plan: calibration confidence from ONE observe pass.

observe keeps each calibration batch's partial sums of the cheap feature groups (``observe/partials.py``),
so a plan can be recomputed on resampled calibration data without running the model again:

* ``bootstrap``: B batches drawn with replacement (multiplicities ``w [B]``), ``stats_w = sum_b w_b P_b``
  (maxima: max over the drawn batches), ``method.plan(stats_w, target)``; per layer the mean Jaccard of
  the resampled kept sets against the full-data plan and each expert's flip rate (fraction of resamples
  whose keep/drop decision differs from the full plan).
* ``sufficiency``: the same agreement when only 1/8, 1/4, 1/2 or all of the batches are used (drawn
  without replacement): how many samples a method needs before its plan stops moving.
* ``agreement``: which experts every method keeps, which are contested (kept by some methods only).

The unit of resampling is the calibration batch (``batch_size=1``: the sample).
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moeprune.methods.registry import MethodConfig
from moeprune.methods.target import Target
from moeprune.observe.partials import INDEX, PARTIAL_GROUPS, base_name, is_partial
from moeprune.observe.stats import SCHEMA, ExpertStats
from moeprune.plan import PruningPlan

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
FLIP_THRESHOLD = 0.10  # an expert whose decision flips in more than 10 % of resamples is "unstable"


def partial_groups(stats: ExpertStats) -> set[str]:
    """Feature groups whose every statistic has per-batch partials in every layer."""
    out = set()
    for g in PARTIAL_GROUPS:
        names = [n for n, (grp, *_) in SCHEMA.items() if grp == g]
        if all(all(n + "@batch" in d for n in names if n in d) and any(n in d for n in names)
               for d in stats.layers.values()) and all(INDEX in d for d in stats.layers.values()):
            out.add(g)
    return out


def check_resamplable(stats: ExpertStats, method: MethodConfig) -> int:
    """Number of calibration batches; a clear error when ``method`` needs groups without partials."""
    have = partial_groups(stats)
    missing = [g for g in method.needs if g not in have]
    if missing:
        raise ValueError(f"method {method.name!r} needs feature group(s) {missing}, which have no per-batch "
                         f"partials in these statistics (partials: {sorted(have) or 'none'}; only "
                         f"{list(PARTIAL_GROUPS)} can keep them); stability works for methods that need only "
                         f"{list(PARTIAL_GROUPS)}: re-run `moeprune observe` (partials are on by default) or "
                         "pick such a method")
    b = int(stats.layers[stats.moe_layers[0]][INDEX].numel())
    if b < 2:
        raise ValueError(f"the statistics hold {b} calibration batch(es); resampling needs at least 2 "
                         "(observe with --batch-size 1 to resample single samples)")
    return b


def resample(stats: ExpertStats, weights: torch.Tensor) -> ExpertStats:
    """Statistics of the batches weighted by ``weights [B]`` (multiplicities; 0 = left out), rebuilt from
    the partials: sums ``w @ P [B, ...]`` (float64), maxima over the batches with ``w > 0``. Only the
    statistics with partials are present."""
    w = weights.to(torch.float64)
    chosen = w > 0
    layers = {}
    for li, d in stats.layers.items():
        out = {}
        for name, p in d.items():
            if not is_partial(name) or name == INDEX:
                continue
            base = base_name(name)
            if SCHEMA[base][1] == "max":
                out[base] = p[chosen].amax(0) if bool(chosen.any()) else torch.zeros_like(p[0])
            else:
                out[base] = torch.tensordot(w, p.double(), dims=1)  # [B] x [B, ...] -> [...]
        layers[li] = out
    frac = float(w.sum()) / max(w.numel(), 1)
    meta = dict(stats.meta)
    meta["num_samples"] = round(stats.meta.get("num_samples", 0) * frac)
    meta["num_tokens"] = round(stats.meta.get("num_tokens", 0) * frac)
    return ExpertStats(layers=layers, meta=meta)


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def bootstrap_weights(num_batches: int, n: int, seed: int) -> torch.Tensor:
    """``[n, B]`` multiplicities of ``n`` bootstrap resamples (B draws with replacement each)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(num_batches, (n, num_batches), generator=gen)
    return torch.zeros(n, num_batches, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def subsample_weights(num_batches: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[n, B]`` 0/1 weights of ``n`` subsets of ``k`` batches drawn without replacement (one row if k = B),
    and, when ``2k <= B``, the weights of a second subset of ``k`` batches disjoint from each (else None)."""
    if k >= num_batches:
        return torch.ones(1, num_batches, dtype=torch.float64), None
    gen = torch.Generator().manual_seed(seed)
    w, w2 = (torch.zeros(n, num_batches, dtype=torch.float64) for _ in range(2))
    for r in range(n):
        perm = torch.randperm(num_batches, generator=gen)
        w[r, perm[:k]] = 1.0
        w2[r, perm[k:2 * k]] = 1.0
    return w, (w2 if 2 * k <= num_batches else None)


def _compare(full: PruningPlan, plans: list[PruningPlan]) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Per layer: the Jaccard of each plan against ``full`` and each expert's flip rate."""
    jac: dict[int, list[float]] = {}
    flips: dict[int, list[float]] = {}
    for li, lp in full.layers.items():
        kept = torch.zeros(lp.num_experts, dtype=torch.bool)
        kept[list(lp.keep)] = True
        n_flip = torch.zeros(lp.num_experts, dtype=torch.float64)
        jac[li] = []
        for p in plans:
            mine = torch.zeros(lp.num_experts, dtype=torch.bool)
            mine[list(p.layers[li].keep)] = True
            n_flip += (mine != kept).double()
            jac[li].append(jaccard(lp.keep, p.layers[li].keep))
        flips[li] = (n_flip / max(len(plans), 1)).tolist()
    return jac, flips


def bootstrap(stats: ExpertStats, method: MethodConfig, target: Target, *, n_resamples: int = 100, seed: int = 0,
              flip_threshold: float = FLIP_THRESHOLD, weights: torch.Tensor | None = None) -> dict[str, Any]:
    """Bootstrap over calibration batches (see the module docstring). ``weights [n, B]`` overrides the draws."""
    b = check_resamplable(stats, method)
    if weights is None:
        if n_resamples < 1:
            raise ValueError(f"n_resamples={n_resamples} must be >= 1 (e.g. 100)")
        weights = bootstrap_weights(b, n_resamples, seed)
    full = method.plan(stats, target)
    jac, flips = _compare(full, [method.plan(resample(stats, w), target) for w in weights])
    return {"method": method.to_dict(), "target": target.to_dict(), "num_batches": b,
            "num_samples": stats.meta.get("num_samples"), "n_resamples": int(weights.shape[0]), "seed": seed,
            "flip_threshold": flip_threshold, "full_keep": {li: list(lp.keep) for li, lp in full.layers.items()},
            "jaccard": {li: statistics.fmean(v) for li, v in jac.items()},
            "jaccard_min": {li: min(v) for li, v in jac.items()},
            "flip_rate": flips,
            "unstable": {li: [e for e, f in enumerate(v) if f > flip_threshold] for li, v in flips.items()}}


def sufficiency(stats: ExpertStats, method: MethodConfig, target: Target, *, fractions: Sequence[float] = FRACTIONS,
                n_resamples: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Agreement with the full-data plan using a fraction of the batches (without replacement): per
    fraction the batches used, the mean (over layers) Jaccard of each draw, its mean and sd over draws.
    A subset shares its batches with the full data, which flatters it (all batches: 1 by construction);
    ``independent`` (fractions <= 1/2) is the mean Jaccard between the plans of two DISJOINT subsets of
    that size, the agreement two users calibrating on that many different samples would see."""
    b = check_resamplable(stats, method)
    full = method.plan(stats, target)
    per_sample = (stats.meta.get("num_samples") or b) / b
    out = []
    for i, f in enumerate(fractions):
        if not 0 < f <= 1:
            raise ValueError(f"fraction {f} must be in (0, 1] (e.g. 0.125, 0.25, 0.5, 1)")
        k = max(1, round(f * b))
        ws, ws2 = subsample_weights(b, k, n_resamples, seed + i)
        plans = [method.plan(resample(stats, w), target) for w in ws]
        jac, _ = _compare(full, plans)
        draws = [statistics.fmean(jac[li][r] for li in jac) for r in range(ws.shape[0])]
        row = {"fraction": f, "batches": k, "samples": round(k * per_sample), "draws": draws,
               "mean": statistics.fmean(draws), "sd": statistics.pstdev(draws),
               "per_layer": {li: statistics.fmean(v) for li, v in jac.items()}}
        if ws2 is not None:
            others = [method.plan(resample(stats, w2), target) for w2 in ws2]
            pairs = [statistics.fmean(jaccard(p.layers[li].keep, q.layers[li].keep) for li in full.layers)
                     for p, q in zip(plans, others)]
            row |= {"independent": statistics.fmean(pairs), "independent_sd": statistics.pstdev(pairs)}
        out.append(row)
    return out


def agreement(stats: ExpertStats, methods: Mapping[str, MethodConfig], target: Target) -> dict[str, Any]:
    """Full-data plans of several methods: per layer the experts every method keeps (``consensus``), those
    kept by some but not all (``contested``: expert -> methods keeping it), and pairwise mean Jaccard."""
    plans = {label: m.plan(stats, target) for label, m in methods.items()}
    labels = list(plans)
    layers: dict[int, dict[str, Any]] = {}
    for li in stats.moe_layers:
        keeps = {lab: set(plans[lab].layers[li].keep) for lab in labels}
        every = set.intersection(*keeps.values())
        some = set.union(*keeps.values())
        layers[li] = {"consensus": sorted(every),
                      "contested": {e: [lab for lab in labels if e in keeps[lab]] for e in sorted(some - every)}}
    pair = {a: {b: statistics.fmean(jaccard(plans[a].layers[li].keep, plans[b].layers[li].keep)
                                    for li in stats.moe_layers) for b in labels} for a in labels}
    return {"methods": labels, "layers": layers, "pairwise_jaccard": pair}
