"""The evaluate stage of a run: held-out perplexity, lm-eval tasks and KL to the unpruned model."""
from __future__ import annotations

from typing import Any

from moeprune.plan import PruningPlan
from moeprune.recipe import EvalConfig


def eval_text(cfg: EvalConfig) -> str | list[str] | None:
    if cfg.perplexity is None:
        return None
    from moeprune.builtin_text import BUILTINS, builtin_texts

    return builtin_texts(cfg.perplexity, max_chars=4 * (cfg.max_tokens or 10**6) + 1000) \
        if cfg.perplexity in BUILTINS else cfg.perplexity


def measure(model, tokenizer, cfg: EvalConfig, *, progress: bool = True,
            into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Perplexity on the held-out text and lm-eval task results of one model. Results go into ``into``
    (a new dict by default) as each is measured, so a caller keeps the perplexity if lm-eval fails."""
    from moeprune.evaluate.perplexity import perplexity

    res: dict[str, Any] = {} if into is None else into
    text = eval_text(cfg)
    if text is not None:
        res.update(perplexity(model, tokenizer, text, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens,
                              progress=progress))
    if cfg.lm_eval_tasks:
        from moeprune.evaluate.lmeval import run_lm_eval

        res["lm_eval"] = run_lm_eval(model, tokenizer, cfg.lm_eval_tasks, include_path=cfg.lm_eval_include_path,
                                     limit=cfg.lm_eval_limit)["results"]
    return res


def kl_to_original(model, tokenizer, cfg: EvalConfig, *, plan: PruningPlan | None = None, pruned: Any = None,
                   progress: bool = True) -> dict[str, Any]:
    """KL(original || pruned) per token on the held-out text. Without a second model, the pruned model
    is simulated by router masking of ``model`` (exactly equal to structural pruning, see the tests),
    so no second copy of the weights is needed."""
    from moeprune.apply import mask_experts
    from moeprune.evaluate.kl import kl_divergence
    from moeprune.evaluate.perplexity import iter_batches, token_stream

    text = eval_text(cfg)
    if text is None or not cfg.kl:
        return {}
    ids = token_stream(text, tokenizer, max_tokens=cfg.max_tokens)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in iter_batches(ids, cfg.seq_len, None, 4,
                                                                                         pad_id=pad)]
    if pruned is None and plan is None:
        raise ValueError("kl_to_original needs the pruned model or the plan")
    res = kl_divergence(model, batches, candidate=pruned,
                        context=(lambda: mask_experts(model, plan)) if pruned is None else None, progress=progress)
    return {"kl": res["kl"], "kl_max": res["kl_max"], "top1_agreement": res["top1_agreement"],
            "kl_tokens": res["tokens"], "kl_via": "router_masking" if pruned is None else "two_models"}


def has_eval(cfg: EvalConfig) -> bool:
    return cfg.perplexity is not None or bool(cfg.lm_eval_tasks)
