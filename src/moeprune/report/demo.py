"""Report of ``moeprune demo``: quality against sparsity per method, retention maps, memory saved.

Plots follow paper conventions: linear axes with plain tick labels, units in the labels, the legend
outside the data, the Okabe-Ito colour-blind-safe palette, the unpruned model as a dashed line and the
random baseline as its seed mean with a min-max band.
"""
from __future__ import annotations

import os
import statistics
from collections import defaultdict
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from moeprune.report.plots import RETENTION_CMAP, _save, retention_matrix

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")
RANDOM_COLOR, UNPRUNED_COLOR = "#999999", "#000000"
FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10}
METRICS = (("ppl", "held-out perplexity (macro over domains)"),
           ("kl", "KL(unpruned || pruned), nats / token"))


def _plain(x: float, _pos=None) -> str:
    return f"{x:g}" if abs(x) >= 0.01 or x == 0 else f"{x:.3f}"


def _series(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[float, list[dict]]], dict]:
    """``({method: {sparsity: [rows]}}, unpruned row)``."""
    by: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    base = next(r for r in rows if r["method"] == "unpruned")
    for r in rows:
        if r["method"] != "unpruned":
            by[r["method"]][r["sparsity"]].append(r)
    return by, base


def plot_sweep(rows: list[dict[str, Any]], path: str | os.PathLike) -> str:
    """Two panels (perplexity, KL) against sparsity; every curve starts at the unpruned model."""
    import matplotlib

    by, base = _series(rows)
    methods = [m for m in by if m != "random"]
    with matplotlib.rc_context(FONT):
        fig = Figure(figsize=(11.5, 4.0))
        axes = fig.subplots(1, 2)
        for ax, (metric, label) in zip(axes, METRICS):
            if "random" in by:
                xs = [0.0] + sorted(by["random"])
                vals = [[base[metric]]] + [[r[metric] for r in by["random"][s]] for s in xs[1:]]
                x100 = [100 * x for x in xs]
                ax.fill_between(x100, [min(v) for v in vals], [max(v) for v in vals], color=RANDOM_COLOR,
                                alpha=0.25, lw=0, label=f"random, min-max of {len(vals[-1])} seeds")
                ax.plot(x100, [statistics.fmean(v) for v in vals], color=RANDOM_COLOR, ls=":", marker="x",
                        label="random, mean")
            for i, m in enumerate(methods):
                xs = [0.0] + sorted(by[m])
                ys = [base[metric]] + [by[m][s][0][metric] for s in xs[1:]]
                ax.plot([100 * x for x in xs], ys, color=OKABE_ITO[i % len(OKABE_ITO)], marker="o", lw=1.8,
                        label=m)
            ax.axhline(base[metric], color=UNPRUNED_COLOR, ls="--", lw=1,
                       label=f"unpruned ({base['ppl']:.1f} ppl)")
            ax.set_xlabel("routed-expert parameters removed (%)")
            ax.set_ylabel(label)
            ax.set_xticks([100 * x for x in [0.0] + sorted({s for m in by for s in by[m]})])
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.yaxis.set_major_formatter(FuncFormatter(_plain))
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.77, 0.5), frameon=False)
        fig.tight_layout(rect=(0, 0, 0.77, 1))
        return _save(fig, path)


def plot_retention_grid(plans: dict[str, Any], path: str | os.PathLike) -> str:
    """One retention map (MoE layer x expert) per method: dark = kept at full width, lighter = kept with
    fewer channels (neuron pruning), light grey = removed."""
    import matplotlib

    names = list(plans)
    with matplotlib.rc_context(FONT):
        n_l, _n_e = retention_matrix(plans[names[0]])[1].shape
        cols = min(len(names), 3)
        rows = -(-len(names) // cols)
        fig = Figure(figsize=(3.6 * cols + 1.2, (0.28 * n_l + 1.3) * rows + 0.4))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        im = None
        for ax, name in zip(axes, names):
            layers, m = retention_matrix(plans[name])
            im = ax.imshow(np.ma.masked_invalid(np.where(m == 0, -1.0, m)), cmap=RETENTION_CMAP, vmin=1e-9,
                           vmax=1, aspect="auto", interpolation="nearest")
            ax.set_title(name)
            ax.set_yticks(range(len(layers)), [str(li) for li in layers])
            ax.set_xticks(range(0, m.shape[1], 4))
            ax.set_xlabel("expert id")
            ax.set_ylabel("MoE layer")
        for ax in axes[len(names):]:
            ax.set_visible(False)
        fig.tight_layout(rect=(0, 0, 0.9, 1))
        cax = fig.add_axes((0.92, 0.2, 0.015, 0.6))
        fig.colorbar(im, cax=cax, label="kept fraction of channels")
        return _save(fig, path)


def _fmt_spread(vals: list[float], digits: int) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per method and sparsity (random: mean ± sd over seeds), memory after apply."""
    by, base = _series(rows)
    mb = 1e6
    out = [("| method | params removed | perplexity | KL (nats/token) | top-1 agreement | weights after apply "
           "| memory saved |"), "|---|---|---|---|---|---|---|",
           f"| unpruned | 0 % | {base['ppl']:.2f} | 0 | 100 % | {base['bytes'] / mb:.2f} MB | - |"]
    for s in sorted({s for m in by for s in by[m]}):
        for m in by:
            rs = by[m].get(s, [])
            if not rs:
                continue
            name = m if len(rs) == 1 else f"{m} ({len(rs)} seeds)"
            saved = statistics.fmean(r["bytes_saved"] for r in rs)
            out.append(f"| {name} | {s:.0%} | {_fmt_spread([r['ppl'] for r in rs], 2)} "
                       f"| {_fmt_spread([r['kl'] for r in rs], 3)} "
                       f"| {statistics.fmean(r['top1_agreement'] for r in rs):.1%} "
                       f"| {statistics.fmean(r['bytes'] for r in rs) / mb:.2f} MB "
                       f"| {saved / mb:.2f} MB ({saved / base['bytes']:.0%}) |")
    return "\n".join(out)


def domain_table(rows: list[dict[str, Any]], sparsity: float) -> str:
    """Markdown: perplexity per held-out domain at one sparsity (random: seed mean)."""
    by, base = _series(rows)
    domains = list(base["ppl_by_domain"])
    out = ["| method | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|",
           "| unpruned | " + " | ".join(f"{base['ppl_by_domain'][d]:.1f}" for d in domains) + " |"]
    for m in by:
        rs = by[m].get(sparsity, [])
        if rs:
            out.append(f"| {m} | " + " | ".join(
                f"{statistics.fmean(r['ppl_by_domain'][d] for r in rs):.1f}" for d in domains) + " |")
    return "\n".join(out)


def write_demo_report(out_dir: str | os.PathLike, rows: list[dict[str, Any]], plans: dict[tuple, Any],
                      info: dict[str, Any]) -> str:
    """``out_dir/report/{report.md, sweep.png, retention.png}``; returns the path of ``report.md``.
    ``plans``: ``{(method, seed, sparsity): PruningPlan}``; ``info``: model, tokens, domains, seconds."""
    rep = os.path.join(os.fspath(out_dir), "report")
    top = max(s for _, _, s in plans)
    grid = {(m if sd is None else f"{m} (seed {sd})"): p for (m, sd, s), p in plans.items()
            if s == top and sd in (None, 0)}
    plot_sweep(rows, os.path.join(rep, "sweep.png"))
    plot_retention_grid(grid, os.path.join(rep, "retention.png"))
    md = [
        "# moeprune demo",
        "",
        (f"Model `{info['model']}`, pruned in one shot from ONE calibration pass of {info['calib_tokens']:,} tokens "
        f"(domains: {', '.join(info['domains'])}). Each plan is applied to a copy of the model (experts and "
        f"channels sliced out) and scored on {info['eval_tokens']:,} held-out tokens per domain. "
        f"Wall time {info['seconds']:.0f} s."),
        "",
        ("Perplexity is the geometric mean over domains (lower is better); KL is the mean per-token "
        "divergence of the pruned model's next-token distribution from the unpruned one (0 = identical). "
        "A method is useful where it stays well below the grey random band."),
        "",
        "![perplexity and KL against sparsity](sweep.png)",
        "",
        "## Summary",
        "",
        summary_table(rows),
        "",
        ("Memory is that of all weights after `apply` (the saved part is the removed experts and channels; "
        f"tensors stored in {info['dtype']}). Plans: `plans/*.json`; raw numbers: `results.jsonl`."),
        "",
        ("Neuron pruning (tenp) keeps its most important experts at full width and narrows the others; "
         "`apply` stores such a layer's experts in a few width buckets (one fused tensor per width, "
         "`config.moe_pruning['buckets']`), so its memory saving is real: the 'weights after apply' column "
         "is measured on the applied model."),
        "",
        f"## Perplexity per held-out domain at {top:.0%}",
        "",
        domain_table(rows, top),
        "",
        f"## Which experts each method keeps at {top:.0%}",
        "",
        "![retention maps](retention.png)",
        "",
    ]
    path = os.path.join(rep, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path
