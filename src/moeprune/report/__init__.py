"""Reports from a run folder's saved artifacts: retention heatmap, score plots, comparison tables.

``make_report(run_dir)`` renders whatever it finds:

* ``plan.json`` / ``pruning_plan.json`` (also one level down, e.g. ``model/pruning_plan.json``):
  retention heatmap, and the plan's score distribution when it carries scores;
* ``stats/`` (``stats.safetensors`` + ``stats.json``): routing frequency per expert and layer;
* ``eval.json`` (one result; ``{"original": {...}, "pruned": {...}}`` gives two rows) and
  ``results.jsonl`` (one result per line, several methods/sparsities): comparison table (markdown +
  CSV) and metric-vs-sparsity plots;
* ``report.md`` linking all of the above.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from moeprune.atomic import atomic_write_text
from moeprune.report.plots import (
    plot_method_comparison,
    plot_retention,
    plot_score_distributions,
    retention_matrix,
)
from moeprune.report.tables import (
    comparison_rows,
    flatten_result,
    load_results,
    to_csv,
    to_markdown,
    write_tables,
)

__all__ = [
    "comparison_rows",
    "flatten_result",
    "load_results",
    "make_report",
    "plot_method_comparison",
    "plot_retention",
    "plot_score_distributions",
    "retention_matrix",
    "to_csv",
    "to_markdown",
    "write_tables",
]

_BASELINE_KEYS = ("original", "baseline", "unpruned", "dense")


def _find_plan(run_dir: str) -> str | None:
    for pattern in ("plan.json", "pruning_plan.json", "*/plan.json", "*/pruning_plan.json"):
        hits = sorted(glob.glob(os.path.join(run_dir, pattern)))
        if hits:
            return hits[0]
    return None


def _find_stats(run_dir: str) -> str | None:
    for d in (os.path.join(run_dir, "stats"), run_dir):
        if os.path.isfile(os.path.join(d, "stats.safetensors")) and os.path.isfile(
            os.path.join(d, "stats.json")
        ):
            return d
    return None


def _eval_rows(path: str, plan) -> list[dict[str, Any]]:
    (data,) = load_results(path)
    defaults = {"method": plan.method, "sparsity": plan.expert_sparsity()} if plan is not None else {}
    base = next((k for k in _BASELINE_KEYS if isinstance(data.get(k), dict)), None)
    if base is not None and isinstance(data.get("pruned"), dict):
        return [{"method": "unpruned", "sparsity": 0.0, **data[base]}, {**defaults, **data["pruned"]}]
    return [{**defaults, **data}]


def _find_stability(run_dir: str, stats_dir: str | None) -> list[str]:
    """``stability.json`` files written by ``moeprune stability`` under the run or its statistics."""
    found = []
    for base in dict.fromkeys(d for d in (run_dir, stats_dir) if d):
        for name in sorted(os.listdir(base)):
            path = os.path.join(base, name, "stability.json")
            if name.startswith("stability") and os.path.isfile(path):
                found.append(path)
    return found


def make_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Render every artifact found in ``run_dir`` into ``out_dir`` (default ``run_dir/report``);
    returns the written paths (``report.md`` last)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist")
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(run_dir, "report")
    from moeprune.plan import PruningPlan

    plan_path, stats_dir = _find_plan(run_dir), _find_stats(run_dir)
    plan = PruningPlan.load(plan_path) if plan_path else None
    rows: list[dict[str, Any]] = []
    if os.path.isfile(os.path.join(run_dir, "results.jsonl")):
        rows += load_results(os.path.join(run_dir, "results.jsonl"))
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        rows += _eval_rows(os.path.join(run_dir, "eval.json"), plan)
    if plan is None and stats_dir is None and not rows:
        raise ValueError(
            f"{run_dir} holds nothing to report: looked for plan.json / pruning_plan.json, stats/, "
            "eval.json and results.jsonl"
        )
    written: list[str] = []
    md = [f"# moeprune report: {os.path.basename(os.path.abspath(run_dir))}", ""]
    if plan is not None:
        written.append(plot_retention(plan, os.path.join(out_dir, "retention.png")))
        kept = plan.kept_counts()
        md += [
            "## Plan",
            "",
            f"method `{plan.method}`, expert sparsity {plan.expert_sparsity():.1%}, kept per layer {kept}",
            "",
            "![retention](retention.png)",
            "",
        ]
        if any(lp.scores for lp in plan.layers.values()):
            written.append(plot_score_distributions(os.path.join(out_dir, "plan_scores.png"), plan=plan))
            md += ["![plan scores](plan_scores.png)", ""]
    if stats_dir is not None:
        written.append(
            plot_score_distributions(
                os.path.join(out_dir, "routing_frequency.png"), plan=plan, stats=stats_dir, stat="count"
            )
        )
        md += ["## Calibration statistics", "", "![routing frequency](routing_frequency.png)", ""]
    if rows:
        written += write_tables(rows, out_dir, stem="comparison")
        md += ["## Results", "", to_markdown(rows), ""]
        flat = [flatten_result(r) for r in rows]
        sparsities = {r["sparsity"] for r in flat if r["sparsity"] is not None}
        if len(sparsities) > 1:
            for metric in ("ppl", "kl", "top1_agreement"):
                if any(metric in r for r in flat):
                    written.append(
                        plot_method_comparison(
                            rows, os.path.join(out_dir, f"{metric}_vs_sparsity.png"), metric=metric
                        )
                    )
                    md += [f"![{metric}]({metric}_vs_sparsity.png)", ""]
    for path in _find_stability(run_dir, stats_dir):
        from moeprune.report.stability import stability_section

        md += [f"## Calibration stability ({os.path.basename(os.path.dirname(path))})", "",
               stability_section(path), ""]
    report = os.path.join(out_dir, "report.md")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(report, "\n".join(md))
    written.append(report)
    return written
