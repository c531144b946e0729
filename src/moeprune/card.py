"""Model card (README.md) for a pruned checkpoint: what was pruned, how, and what it measured."""
from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from moeprune import __version__
from moeprune.atomic import atomic_write_text
from moeprune.plan import PruningPlan
from moeprune.serving import card_lines, transformers_only_reasons


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hub_id(model: str) -> str | None:
    """``model`` when it is a hub repo id (valid card ``base_model``), None for folders / tiny models."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith("tiny:") or os.path.exists(os.path.expanduser(model)) or model.count("/") != 1:
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    return model


def recovery_line(plan: PruningPlan) -> str:
    """``none``, or the step, its options and the mean calibration residual before -> after."""
    rec = plan.meta.get("recovery")
    if not rec:
        return "none"
    lay = list(rec.get("layers", {}).values())
    opts = {k: v for k, v in rec.items() if k not in ("name", "layers", "fit_inputs")}
    res = (f"; calibration residual (mean over {len(lay)} layers) "
           f"{sum(v['residual_before'] for v in lay) / len(lay):.4g} -> "
           f"{sum(v['residual_after'] for v in lay) / len(lay):.4g}") if lay else ""
    return f"`{rec['name']}` {opts}{res} (docs/RECOVERY.md)"


def card_data(recipe: Any) -> ModelCardData:
    """Hub metadata: base_model (hub ids only), library, pipeline and tags."""
    return ModelCardData(base_model=_hub_id(str(recipe.model)), library_name="transformers",
                         pipeline_tag="text-generation", tags=["moe", "pruning", "moeprune", "expert-pruning"])


def _loading(plan: PruningPlan, path: str) -> list[str]:
    if not transformers_only_reasons(plan):
        return ["from transformers import AutoModelForCausalLM", f"model = AutoModelForCausalLM.from_pretrained({path!r})"]
    return ["import moeprune", f"model = moeprune.load_pruned({path!r})",
            f"# or: AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)"]


def model_card(recipe: Any, plan: PruningPlan, results: dict[str, Any] | None = None,
               model_path: str | None = None) -> str:
    """The card text. ``model_path``: where the pruned checkpoint is (a folder or a hub repo id), used
    verbatim in the loading snippet."""
    kept = plan.kept_counts()
    total = sum(lp.num_experts for lp in plan.layers.values())
    c = recipe.calibration
    lines = [
        f"# {os.path.basename(str(recipe.model).rstrip('/'))} pruned with moeprune {__version__}", "",
        f"* base model: `{recipe.model}`",
        f"* method: `{plan.method}` {plan.method_config or ''}",
        f"* target: {plan.target}",
        (f"* experts kept: {sum(kept.values())} of {total} (expert sparsity {plan.expert_sparsity():.1%}), "
         f"{'uniform' if plan.is_uniform else 'non-uniform'} across layers"),
        f"* neurons pruned inside experts: {'yes' if plan.has_neurons else 'no'}",
        f"* recovery after pruning: {recovery_line(plan)}",
        f"* calibration: {c.dataset}, {c.num_samples} samples x {c.seq_len} tokens, seed {c.seed}",
        "", "## Loading", "", "```python", *_loading(plan, model_path or "path/to/model"), "```",
        "", "## Kept experts per layer", "", "| layer | kept | of |", "|---|---|---|",
    ]
    lines += [f"| {li} | {len(lp.keep)} | {lp.num_experts} |" for li, lp in plan.layers.items()]
    if results:
        lines += ["", "## Evaluation", "", "| model | metric | value |", "|---|---|---|"]
        for name in ("original", "pruned"):
            for k, v in (results.get(name) or {}).items():
                if isinstance(v, (int, float)) and k in ("ppl", "kl", "top1_agreement", "tokens"):
                    lines.append(f"| {name} | {k} | {_fmt(v)} |")
    lines += ["", *card_lines(plan)]
    lines += ["", "Full plan: `pruning_plan.json`; recipe: `recipe.yaml`.", ""]
    return str(ModelCard.from_template(card_data(recipe), template_str="---\n{{ card_data }}\n---\n\n"
                                       "{{ body }}", body="\n".join(lines)))


def write_model_card(out_dir: str, recipe: Any, plan: PruningPlan, results: dict[str, Any] | None = None) -> str:
    """Write the card to ``out_dir/README.md`` and, when present, ``out_dir/model/README.md``."""
    text = model_card(recipe, plan, results, model_path=os.path.abspath(os.path.join(out_dir, "model")))
    paths = [os.path.join(out_dir, "README.md")]
    if os.path.isdir(os.path.join(out_dir, "model")):
        paths.append(os.path.join(out_dir, "model", "README.md"))
    for p in paths:
        atomic_write_text(p, text)
    return paths[0]
