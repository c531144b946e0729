"""Stability report: the sufficiency plot and the markdown section of ``moeprune stability``.

Inputs are the dicts of ``moeprune.stability`` (``bootstrap``, ``sufficiency``, ``agreement``), saved as
``stability.json``; ``stability_section`` renders that file for a report.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from moeprune.atomic import atomic_write_text
from moeprune.report.plots import _save

# Okabe-Ito: distinguishable with the common colour-vision deficiencies; markers differ as well
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_sufficiency(panels: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], path: str | os.PathLike,
                     title: str = "How many calibration samples until the plan stops moving") -> str:
    """One panel per entry of ``panels`` (e.g. per sparsity), one line per method: mean Jaccard (over
    layers) of the plan from a subsample against the full-data plan, vs the samples used; bars = sd
    over the random subsamples."""
    fig = Figure(figsize=(4.2 * len(panels) + 2.6, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    low = 1.0
    for ax, (name, curves) in zip(axes, panels.items()):
        ticks: set[int] = set()
        for i, (label, curve) in enumerate(curves.items()):
            ticks.update(c["samples"] for c in curve)
            dodge = 2 ** (0.04 * (i - (len(curves) - 1) / 2))  # side by side on the log axis, bars readable
            xs = [c["samples"] * dodge for c in curve]
            style = {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)], "capsize": 3}
            ax.errorbar(xs, [c["mean"] for c in curve], yerr=[c["sd"] for c in curve], label=label, lw=1.8, **style)
            ind = [c for c in curve if "independent" in c]
            if ind:  # two disjoint subsets of that size: no shared data flattering the agreement
                ax.errorbar([c["samples"] * dodge for c in ind], [c["independent"] for c in ind],
                            yerr=[c["independent_sd"] for c in ind], ls="--", lw=1.2, mfc="white", **style)
            low = min([low] + [c["mean"] - c["sd"] for c in curve] +
                      [c["independent"] - c["independent_sd"] for c in ind])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in sorted(ticks)])
        ax.set_title(name, fontsize=12)
        ax.set_xlabel("calibration samples used", fontsize=11)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=10)
    axes[0].set_ylim(max(0.0, math.floor(low * 10 - 0.5) / 10), 1.02)
    axes[0].set_ylabel("plan agreement\n(mean Jaccard of kept experts)", fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", lw=1.8), Line2D([], [], color="0.3", lw=1.2, ls="--")]
    labels += ["vs full-data plan", "two disjoint subsets"]
    fig.legend(handles, labels, loc="outside right center", fontsize=10, title="method / comparison")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def _fmt_experts(ids: Sequence[int], rates: Sequence[float]) -> str:
    return ", ".join(f"{e} ({rates[e]:.0%})" for e in ids) or "none"


def stability_markdown(boot: Mapping[str, Any], suff: Sequence[Mapping[str, Any]] | None = None,
                       agree: Mapping[str, Any] | None = None) -> str:
    """The markdown section: per-layer bootstrap agreement and unstable experts, the sufficiency curve,
    and (several methods) consensus / contested experts."""
    m, t = boot["method"]["name"], boot["target"]
    lines = [f"## Calibration stability: {m}, target {t}", "",
             (f"{boot['n_resamples']} bootstrap resamples of the {boot['num_batches']} calibration batches "
              f"(seed {boot['seed']}). Jaccard = |kept in resample & kept with all data| / |union|; unstable = the "
              f"keep/drop decision flips in more than {boot['flip_threshold']:.0%} of resamples."), "",
             "| layer | mean Jaccard | min Jaccard | unstable experts (flip rate) |", "|---|---|---|---|"]
    for li, j in boot["jaccard"].items():
        lines.append(f"| {li} | {j:.3f} | {boot['jaccard_min'][li]:.3f} | "
                     f"{_fmt_experts(boot['unstable'][li], boot['flip_rate'][li])} |")
    if suff:
        lines += ["", ("Sufficiency (subsamples without replacement, mean Jaccard over layers against the "
                       "full-data plan, and between the plans of two disjoint subsets of that size; mean ± sd over "
                       "draws):"), "", "| fraction | samples | vs full-data plan | two disjoint subsets |",
                  "|---|---|---|---|"]
        lines += [f"| {c['fraction']:.3g} | {c['samples']} | {c['mean']:.3f} ± {c['sd']:.3f} | "
                  + (f"{c['independent']:.3f} ± {c['independent_sd']:.3f} |" if "independent" in c else "- |")
                  for c in suff]
    if agree:
        lines += ["", f"Agreement between methods ({', '.join(agree['methods'])}), full-data plans:", "",
                  "| layer | kept by every method | contested (methods keeping it) |", "|---|---|---|"]
        for li, d in agree["layers"].items():
            contested = "; ".join(f"{e}: {'/'.join(ms)}" for e, ms in d["contested"].items()) or "none"
            lines.append(f"| {li} | {', '.join(map(str, d['consensus'])) or 'none'} | {contested} |")
    return "\n".join(lines) + "\n"


def write_stability(out_dir: str | os.PathLike, boot: Mapping[str, Any], suff: Sequence[Mapping[str, Any]],
                    agree: Mapping[str, Any] | None = None) -> list[str]:
    """``stability.json``, ``stability.md`` and ``sufficiency.png`` in ``out_dir``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = {"bootstrap": boot, "sufficiency": suff, "agreement": agree}
    paths = [os.path.join(out_dir, n) for n in ("stability.json", "stability.md", "sufficiency.png")]
    atomic_write_text(paths[0], json.dumps(data, indent=1))
    atomic_write_text(paths[1], stability_markdown(boot, suff, agree))
    label = boot["method"]["name"]
    plot_sufficiency({_target_label(boot["target"]): {label: suff}}, paths[2])
    return paths


def _target_label(target: Mapping[str, Any]) -> str:
    s = target.get("expert_sparsity")
    return f"{s:.0%} of experts pruned" if s is not None else ", ".join(f"{k}={v}" for k, v in target.items() if v)


def stability_section(path: str | os.PathLike) -> str:
    """The report section of a saved ``stability.json`` (for ``moeprune report``)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return stability_markdown(data["bootstrap"], data.get("sufficiency"), data.get("agreement"))
