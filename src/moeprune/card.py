"""Model card (README.md) for a pruned checkpoint: what was pruned, how, and what it measured."""
from __future__ import annotations

import os
from typing import Any

from moeprune import __version__
from moeprune.atomic import atomic_write_text
from moeprune.plan import PruningPlan


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(recipe: Any, plan: PruningPlan, results: dict[str, Any] | None = None) -> str:
    kept = plan.kept_counts()
    total = sum(lp.num_experts for lp in plan.layers.values())
    lines = [
        "---", "tags: [moe, pruning, moeprune]", f"base_model: {recipe.model}", "---", "",
        f"# {os.path.basename(str(recipe.model).rstrip('/'))} pruned with moeprune {__version__}", "",
        f"* method: `{plan.method}` {plan.method_config or ''}",
        f"* target: {plan.target}",
        f"* experts kept: {sum(kept.values())} of {total} (expert sparsity {plan.expert_sparsity():.1%}), "
        f"{'uniform' if plan.is_uniform else 'non-uniform'} across layers",
        f"* neurons pruned inside experts: {'yes' if plan.has_neurons else 'no'}",
        f"* calibration: {recipe.calibration.dataset}, {recipe.calibration.num_samples} samples x "
        f"{recipe.calibration.seq_len} tokens, seed {recipe.calibration.seed}",
        "", "## Loading", "", "```python",
    ]
    if plan.is_uniform and not plan.has_neurons:
        lines += ["from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained('PATH')"]
    else:
        lines += ["import moeprune", "model = moeprune.load_pruned('PATH')",
                  "# or: AutoModelForCausalLM.from_pretrained('PATH', trust_remote_code=True)"]
    lines += ["```", "", "## Kept experts per layer", "", "| layer | kept | of |", "|---|---|---|"]
    lines += [f"| {li} | {len(lp.keep)} | {lp.num_experts} |" for li, lp in plan.layers.items()]
    if results:
        lines += ["", "## Evaluation", "", "| model | metric | value |", "|---|---|---|"]
        for name in ("original", "pruned"):
            for k, v in (results.get(name) or {}).items():
                if isinstance(v, (int, float)) and k in ("ppl", "kl", "top1_agreement", "tokens"):
                    lines.append(f"| {name} | {k} | {_fmt(v)} |")
    lines += ["", "Full plan: `pruning_plan.json`; recipe: `recipe.yaml`.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str, recipe: Any, plan: PruningPlan, results: dict[str, Any] | None = None) -> str:
    """Write the card to ``out_dir/README.md`` and, when present, ``out_dir/model/README.md``."""
    text = model_card(recipe, plan, results)
    paths = [os.path.join(out_dir, "README.md")]
    if os.path.isdir(os.path.join(out_dir, "model")):
        paths.append(os.path.join(out_dir, "model", "README.md"))
    for p in paths:
        atomic_write_text(p, text)
    return paths[0]
