"""Plots from saved artifacts only (plan JSON, stats folder, result dicts), rendered off-screen.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it is
safe in notebooks, servers and tests alike. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from moeprune.atomic import atomic_write
from moeprune.plan import PruningPlan
from moeprune.report.tables import flatten_result

KEPT_COLOR, REMOVED_COLOR = "#08519c", "#f0f0f0"
# kept experts: light (few channels kept) to dark (all kept); removed experts: the "under" colour
RETENTION_CMAP = LinearSegmentedColormap.from_list("moeprune_retention", ["#c6dbef", KEPT_COLOR]).with_extremes(
    under=REMOVED_COLOR, bad="white"
)


def _plan(plan: PruningPlan | str | os.PathLike) -> PruningPlan:
    return plan if isinstance(plan, PruningPlan) else PruningPlan.load(plan)


def _save(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:] or "png"))


def retention_matrix(plan: PruningPlan) -> tuple[list[int], np.ndarray]:
    """``(layers, M [n_layers, max_E])``: 1 kept, 0 removed, the kept channel fraction for experts with
    a neuron plan (needs ``intermediate_size``), NaN past a layer's expert count."""
    layers = list(plan.layers)
    n_max = max(lp.num_experts for lp in plan.layers.values())
    m = np.full((len(layers), n_max), np.nan)
    for r, li in enumerate(layers):
        lp = plan.layers[li]
        m[r, : lp.num_experts] = 0.0
        for e in lp.keep:
            m[r, e] = 1.0
            if lp.neurons and e in lp.neurons and lp.intermediate_size:
                m[r, e] = len(lp.neurons[e]) / lp.intermediate_size
    return layers, m


def plot_retention(plan: PruningPlan | str | os.PathLike, path: str | os.PathLike) -> str:
    """Heatmap layers x experts (original ids): blue = kept (lighter = fewer channels kept under a
    neuron plan), light grey = removed, white = no such expert; kept counts written on the right."""
    plan = _plan(plan)
    layers, m = retention_matrix(plan)
    n_l, n_e = m.shape
    fig = Figure(figsize=(min(2.5 + 0.22 * n_e, 20), min(1.5 + 0.3 * n_l, 24)))
    ax = fig.add_subplot()
    im = ax.imshow(
        np.ma.masked_invalid(np.where(m == 0, -1.0, m)),  # removed (0) -> below vmin -> REMOVED_COLOR
        cmap=RETENTION_CMAP,
        vmin=1e-9,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("expert (original id)")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_l), [str(li) for li in layers])
    if n_e <= 64:
        ax.set_xticks(range(n_e), [str(e) for e in range(n_e)], fontsize=7 if n_e > 16 else 9)
    for r, li in enumerate(layers):
        lp = plan.layers[li]
        ax.text(
            n_e - 0.5 + 0.02 * n_e, r, f"{len(lp.keep)}/{lp.num_experts}", va="center", ha="left", fontsize=8
        )
    ax.set_title(f"kept experts: {plan.method}, expert sparsity {plan.expert_sparsity():.1%}")
    if plan.has_neurons:
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.12, label="kept channel fraction")
    fig.tight_layout()
    return _save(fig, path)


def _stat_scores(stats, stat: str, normalize: bool) -> dict[int, np.ndarray]:
    out = {}
    for li in stats.moe_layers:
        v = stats.get(li, stat).double()
        if v.dim() != 1:
            raise ValueError(
                f"statistic {stat!r} has shape {tuple(v.shape)}; pick a per-expert [E] statistic "
                "(e.g. count, gate_sum, gate_norm_sum, prob_sum)"
            )
        if normalize:
            tok = float(stats.get(li, "tokens")) if "tokens" in stats.layers[li] else float(v.sum())
            v = v / max(tok, 1.0)
        out[li] = v.numpy()
    return out


def plot_score_distributions(
    path: str | os.PathLike,
    *,
    plan: PruningPlan | str | os.PathLike | None = None,
    stats=None,
    stat: str = "count",
    normalize: bool = True,
    seed: int = 0,
) -> str:
    """Per-layer expert scores as a jittered strip plot (x = layer), kept experts dark, removed red.

    Scores come from ``plan`` (``LayerPlan.scores``) unless ``stats`` (an ``ExpertStats`` or its
    folder) is given: then ``stat`` per expert, divided by the layer's token count when
    ``normalize`` (``count`` becomes the routing frequency)."""
    plan = _plan(plan) if plan is not None else None
    if stats is not None:
        if not hasattr(stats, "moe_layers"):
            from moeprune.observe.stats import ExpertStats

            stats = ExpertStats.load(stats)
        scores = _stat_scores(stats, stat, normalize)
        ylabel = f"{stat}{' / tokens' if normalize else ''}"
    elif plan is not None:
        scores = {li: np.asarray(lp.scores, dtype=float) for li, lp in plan.layers.items() if lp.scores}
        if not scores:
            raise ValueError(
                "the plan carries no scores; pass stats=<stats folder> to plot a statistic instead"
            )
        ylabel = f"{plan.method} score"
    else:
        raise ValueError("pass plan=... (with scores) and/or stats=...")
    rng = np.random.default_rng(seed)
    layers = sorted(scores)
    fig = Figure(figsize=(min(3 + 0.35 * len(layers), 20), 4.2))
    ax = fig.add_subplot()
    labelled = set()
    for x, li in enumerate(layers):
        s = scores[li]
        kept = np.ones(len(s), bool)
        if plan is not None and li in plan.layers:
            kept[:] = False
            kept[list(plan.layers[li].keep)] = True
        jitter = rng.uniform(-0.25, 0.25, len(s))
        for mask, color, label in ((kept, KEPT_COLOR, "kept"), (~kept, "#d62728", "removed")):
            if mask.any():
                ax.scatter(
                    x + jitter[mask],
                    s[mask],
                    s=14,
                    color=color,
                    linewidths=0,
                    label=None if label in labelled else label,
                )
                labelled.add(label)
    ax.set_xticks(range(len(layers)), [str(li) for li in layers], fontsize=8 if len(layers) > 24 else 10)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per expert, by layer")
    if plan is not None:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_method_comparison(
    results: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    metric: str = "ppl",
    logy: bool | None = None,
) -> str:
    """``metric`` vs expert sparsity, one line per method (results as in ``report.tables``); results at
    sparsity 0 (the unpruned model) are drawn as a dashed reference line."""
    rows = [flatten_result(r) for r in results]
    have = sorted({k for r in rows for k in r} - {"method", "sparsity"})
    if metric not in have:
        raise ValueError(f"metric {metric!r} is in no result; available: {have}")
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    dense = []
    for r in rows:
        if r.get(metric) is None or r["sparsity"] is None:
            continue
        if r["sparsity"] == 0.0:
            dense.append(r[metric])
        else:
            series[r["method"]].append((r["sparsity"], r[metric]))
    if not series and not dense:
        raise ValueError(f"no result has both a sparsity and {metric!r}")
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for method in sorted(series):
        pts = sorted(series[method])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if dense:
        ax.axhline(float(np.mean(dense)), color="k", ls="--", lw=1, label="unpruned")
    if logy if logy is not None else metric in ("ppl", "perplexity.ppl"):
        ax.set_yscale("log")
    ax.set_xlabel("expert sparsity")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} vs expert sparsity")
    fig.tight_layout()
    return _save(fig, path)
