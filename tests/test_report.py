"""report/: plots and tables from saved artifacts reflect their inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from moeprune.observe.stats import ExpertStats
from moeprune.plan import LayerPlan, PruningPlan
from moeprune.report import (
    comparison_rows,
    flatten_result,
    make_report,
    plot_method_comparison,
    plot_retention,
    plot_score_distributions,
    retention_matrix,
    to_markdown,
    write_tables,
)
from moeprune.report.plots import KEPT_COLOR, REMOVED_COLOR


def _plan(keep: dict[int, list[int]], n=8, scores=True, **kw) -> PruningPlan:
    rng = np.random.default_rng(0)
    return PruningPlan(
        layers={
            li: LayerPlan(num_experts=n, keep=tuple(k), scores=tuple(rng.random(n)) if scores else None)
            for li, k in keep.items()
        },
        method="reap",
        **kw,
    )


def _count(png: str, color: str) -> int:
    img = imread(png)[..., :3]
    return int(np.all(np.abs(img - np.array(to_rgb(color))) < 2 / 255, axis=-1).sum())


def test_retention_heatmap_pixels_follow_kept_cells(tmp_path):
    sparse = _plan({1: [0, 1], 2: [3, 4], 3: [6, 7]})  # 6 of 24 kept
    dense = _plan({1: [0, 1, 2, 3, 4, 5], 2: list(range(8)), 3: [1, 2, 3, 4]})  # 18 of 24 kept
    fracs = []
    for name, plan in (("sparse", sparse), ("dense", dense)):
        png = plot_retention(plan, tmp_path / f"{name}.png")
        kept, removed = _count(png, KEPT_COLOR), _count(png, REMOVED_COLOR)
        assert kept > 0 and removed > 0
        fracs.append(kept / (kept + removed))
    assert fracs[0] == pytest.approx(6 / 24, abs=0.02)
    assert fracs[1] == pytest.approx(18 / 24, abs=0.02)


def test_retention_matrix_neurons_and_ragged_layers():
    plan = PruningPlan(
        layers={
            1: LayerPlan(num_experts=4, keep=(0, 2), neurons={2: tuple(range(8))}, intermediate_size=32),
            2: LayerPlan(num_experts=6, keep=(1, 2, 5)),
        }
    )
    layers, m = retention_matrix(plan)
    assert layers == [1, 2]
    np.testing.assert_array_equal(m[0, :4], [1.0, 0.0, 0.25, 0.0])
    assert np.isnan(m[0, 4:]).all()
    np.testing.assert_array_equal(m[1], [0, 1, 1, 0, 0, 1])


def test_score_plot_marks_removed_experts(tmp_path):
    red = "#d62728"
    all_kept = plot_score_distributions(
        tmp_path / "a.png", plan=_plan({1: list(range(8)), 2: list(range(8))})
    )
    some_removed = plot_score_distributions(tmp_path / "b.png", plan=_plan({1: [0, 1, 2], 2: [4, 5, 6, 7]}))
    assert _count(all_kept, red) == 0 and _count(all_kept, KEPT_COLOR) > 0
    assert _count(some_removed, red) > 0
    with pytest.raises(ValueError, match="no scores"):
        plot_score_distributions(tmp_path / "c.png", plan=_plan({1: [0, 1]}, scores=False))


def test_score_plot_from_stats_folder(tmp_path):
    stats = ExpertStats(
        layers={
            li: {
                "tokens": torch.tensor(100.0, dtype=torch.float64),
                "count": torch.arange(8, dtype=torch.float64) * 10,
            }
            for li in (1, 2)
        }
    )
    stats.save(tmp_path / "stats")
    png = plot_score_distributions(tmp_path / "s.png", stats=tmp_path / "stats", stat="count")
    assert _count(png, KEPT_COLOR) > 0
    with pytest.raises(KeyError, match="gate_sum"):
        plot_score_distributions(tmp_path / "t.png", stats=tmp_path / "stats", stat="gate_sum")


RESULTS = [
    {"method": "unpruned", "sparsity": 0.0, "perplexity": {"ppl": 10.0, "tokens": 500}},
    {
        "method": "reap",
        "sparsity": 0.5,
        "perplexity": {"ppl": 12.5},
        "kl": {"kl": 0.25, "top1_agreement": 0.8},
        "lm_eval": {"results": {"arc_easy": {"acc,none": 0.61, "acc_stderr,none": 0.01}}},
    },
    {"method": "frequency", "plan": {"summary": {"expert_sparsity": 0.5}}, "perplexity": {"ppl": 15.0}},
    {"method": "reap", "expert_sparsity": 0.25, "ppl": 11.0},
]


def test_flatten_and_rows():
    f = flatten_result(RESULTS[1])
    assert f == {
        "method": "reap",
        "sparsity": 0.5,
        "ppl": 12.5,
        "kl": 0.25,
        "top1_agreement": 0.8,
        "lm_eval.arc_easy.acc": 0.61,
    }
    cols, rows = comparison_rows(RESULTS)
    assert cols[:5] == ["method", "sparsity", "ppl", "kl", "top1_agreement"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("unpruned", 0.0),
        ("reap", 0.25),
        ("frequency", 0.5),
        ("reap", 0.5),
    ]
    with pytest.raises(ValueError, match="available"):
        comparison_rows(RESULTS, metrics=["bleu"])


def test_markdown_and_csv_tables(tmp_path):
    md_path, csv_path = write_tables(RESULTS, tmp_path, metrics=["ppl", "kl"])
    md = Path(md_path).read_text().strip().splitlines()
    assert md[0] == "| method | sparsity | ppl | kl |"
    assert len(md) == 2 + len(RESULTS)
    assert md[2] == "| unpruned | 0 | 10 |  |"
    assert md[5] == "| reap | 0.5 | 12.5 | 0.25 |"
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["unpruned", "reap", "frequency", "reap"]
    assert float(rows[2]["ppl"]) == 15.0 and rows[2]["kl"] == ""
    assert to_markdown(RESULTS).count("\n") == 2 + len(RESULTS)


def test_method_comparison_plot(tmp_path):
    png = plot_method_comparison(RESULTS, tmp_path / "cmp.png", metric="ppl")
    assert imread(png).shape[0] > 100
    with pytest.raises(ValueError, match="available"):
        plot_method_comparison(RESULTS, tmp_path / "x.png", metric="bleu")


def test_make_report_renders_everything_found(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    plan = _plan({1: [0, 1, 2, 3], 2: [2, 3, 4, 5]}, target={"expert_sparsity": 0.5})
    plan.save(run / "model" / "pruning_plan.json")
    ExpertStats(
        layers={
            li: {
                "tokens": torch.tensor(50.0, dtype=torch.float64),
                "count": torch.ones(8, dtype=torch.float64),
            }
            for li in (1, 2)
        }
    ).save(run / "stats")
    with open(run / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in RESULTS)
    (run / "eval.json").write_text(
        json.dumps({"original": {"perplexity": {"ppl": 9.0}}, "pruned": {"perplexity": {"ppl": 13.0}}})
    )
    paths = make_report(run)
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == sorted(
        [
            "retention.png",
            "plan_scores.png",
            "routing_frequency.png",
            "comparison.md",
            "comparison.csv",
            "ppl_vs_sparsity.png",
            "kl_vs_sparsity.png",
            "top1_agreement_vs_sparsity.png",
            "report.md",
        ]
    )
    report = Path(paths[-1]).read_text()
    assert "| reap | 0.5 | 13 |" in report  # eval.json's pruned row, method/sparsity taken from the plan
    assert "| unpruned | 0 | 9 |" in report
    assert "![retention](retention.png)" in report


def test_make_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="nothing to report"):
        make_report(tmp_path)
