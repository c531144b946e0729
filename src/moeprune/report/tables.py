"""Comparison tables across methods and sparsities, from saved result dicts (markdown + CSV).

A result dict describes one evaluated model: ``method`` (str), its expert ``sparsity`` (or
``expert_sparsity``, or a ``plan``/``summary`` holding it) and any metrics, possibly nested, e.g.
``{"method": "reap", "sparsity": 0.5, "perplexity": {"ppl": 12.1}, "kl": {"kl": 0.2},
"lm_eval": {"results": {"arc_easy": {"acc,none": 0.61}}}}``. Nested keys are flattened with ``.``;
lm-eval's ``results`` level and ``,none`` filter suffix are dropped (``lm_eval.arc_easy.acc``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from moeprune.atomic import atomic_write_text

_FIRST = ("ppl", "nll", "kl", "top1_agreement")
_SKIP = {
    "tokens",
    "windows",
    "seq_len",
    "stride",
    "nll_sum",
    "kl_max",
    "n-samples",
    "versions",
    "n-shot",
    "higher_is_better",
    "config",
    "configs",
    "samples",
    "sample_len",
}


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Result dicts from a ``.jsonl`` file (one per line) or a ``.json`` file (a dict or a list)."""
    path = os.fspath(path)
    with open(path) as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            data = json.load(f)
            rows = data if isinstance(data, list) else [data]
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: entry {i} is a {type(r).__name__}, expected a result object")  # noqa: TRY004 (bad file content)
    return rows


def _sparsity(d: dict[str, Any]) -> float | None:
    for src in (
        d,
        d.get("plan") or {},
        (d.get("plan") or {}).get("summary") or {},
        d.get("summary") or {},
        d.get("target") or {},
    ):
        for k in ("sparsity", "expert_sparsity"):
            v = src.get(k) if isinstance(src, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def _flatten(d: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            k = str(k)
            if k in _SKIP or k in (
                "method",
                "sparsity",
                "expert_sparsity",
                "plan",
                "target",
                "summary",
                "meta",
            ):
                continue
            if k == "results" and isinstance(v, dict):  # lm-eval: {"results": {task: {metric: v}}}
                _flatten(v, prefix, out)
                continue
            name = k.split(",")[0] if k.endswith(",none") else k
            if name.endswith("_stderr") or "_stderr," in k:
                continue
            _flatten(v, f"{prefix}.{name}" if prefix else name, out)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix] = float(d)


def flatten_result(d: dict[str, Any]) -> dict[str, Any]:
    """``{"method", "sparsity", <flat metric>: float, ...}``; metric names shortened where unambiguous
    (``perplexity.ppl`` -> ``ppl``, ``kl.kl`` -> ``kl``)."""
    flat: dict[str, float] = {}
    _flatten(d, "", flat)
    short: dict[str, float] = {}
    for k, v in flat.items():
        leaf = k.rsplit(".", 1)[-1]
        key = leaf if leaf in _FIRST and sum(x.rsplit(".", 1)[-1] == leaf for x in flat) == 1 else k
        short[key] = v
    method = d.get("method") or (d.get("plan") or {}).get("method") or "?"
    return {"method": str(method), "sparsity": _sparsity(d), **short}


def comparison_rows(
    results: Iterable[dict[str, Any]], metrics: Sequence[str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per result, sorted by (sparsity, method); ``metrics`` picks and
    orders the metric columns (default: all, ``ppl``/``kl`` first)."""
    rows = [flatten_result(r) for r in results]
    if not rows:
        raise ValueError("no results to tabulate")
    found = sorted(
        {k for r in rows for k in r if k not in ("method", "sparsity")},
        key=lambda k: (_FIRST.index(k) if k in _FIRST else len(_FIRST), k),
    )
    if metrics is None:
        metrics = found
    else:
        unknown = [m for m in metrics if m not in found]
        if unknown:
            raise ValueError(f"metrics {unknown} are in no result; available: {found}")
    rows.sort(key=lambda r: (r["sparsity"] if r["sparsity"] is not None else -1.0, r["method"]))
    return ["method", "sparsity", *metrics], rows


def _fmt(v: Any, floatfmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v)


def to_markdown(
    results: Iterable[dict[str, Any]], metrics: Sequence[str] | None = None, floatfmt: str = ".4g"
) -> str:
    """A GitHub-markdown table of ``results`` (see the module doc for their shape)."""
    cols, rows = comparison_rows(results, metrics)
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c == "method" else "---:" for c in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), floatfmt) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_csv(
    results: Iterable[dict[str, Any]], path: str | os.PathLike, metrics: Sequence[str] | None = None
) -> str:
    """Write the comparison table as CSV (full precision); returns the path."""
    cols, rows = comparison_rows(results, metrics)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return atomic_write_text(path, buf.getvalue())


def write_tables(
    results: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike,
    stem: str = "comparison",
    metrics: Sequence[str] | None = None,
) -> list[str]:
    """``out_dir/{stem}.md`` and ``out_dir/{stem}.csv``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, f"{stem}.md")
    atomic_write_text(md, to_markdown(results, metrics))
    return [md, to_csv(results, os.path.join(out_dir, f"{stem}.csv"), metrics)]
