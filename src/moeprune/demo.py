"""``moeprune demo``: several methods x sparsities on a small trained MoE, from ONE calibration pass.

The demo prunes the packaged toy MoE (``builtin:toy-moe``, trained on five text domains, see its model
card) so that the numbers mean something: every method's plan is applied to a private copy of the model
(real slicing, not masking) and scored on held-out text with perplexity and KL to the unpruned model,
next to random expert choices of several seeds (the spread any method must beat). The report shows
perplexity / KL against sparsity, the retention map per method, and the memory ``apply`` saved.

Perplexity is pooled over the domains with the same number of scored tokens per domain, so it equals
the geometric mean of the per-domain perplexities (the "macro" number of the model card).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moeprune.evaluate.perplexity import iter_batches, token_stream

RANDOM = "random"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo sweeps. ``sparsities`` are fractions of routed-expert parameters removed: experts
    for expert-pruning methods (``expert_sparsity``), parameters for neuron-pruning ones (``tenp``,
    ``param_ratio = 1 - s``, its paper's setting)."""

    model: str = "builtin:toy-moe"
    methods: tuple[str, ...] = ("frequency", "reap", "pathfinder", "tenp")
    sparsities: tuple[float, ...] = (0.25, 0.5)
    random_seeds: tuple[int, ...] = (0, 1, 2, 3)
    calib_samples: int = 32
    seq_len: int = 256
    eval_tokens_per_domain: int = 1024
    batch_size: int = 8
    dtype: str = "float32"
    seed: int = 42
    param_methods: tuple[str, ...] = ("tenp",)

    def __post_init__(self):
        for s in self.sparsities:
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsity {s} must be in (0, 1); e.g. sparsities=(0.25, 0.5)")
        if self.eval_tokens_per_domain < self.seq_len:
            raise ValueError(f"eval_tokens_per_domain={self.eval_tokens_per_domain} must be >= seq_len="
                             f"{self.seq_len} (one full window per domain)")


@dataclass
class Reference:
    """Held-out batches with the unpruned model's per-row log-probabilities ``[T, V]`` (valid tokens)."""

    batches: list[dict[str, torch.Tensor]]
    domains: list[str]  # domain of each batch
    logp: list[list[torch.Tensor]] = field(default_factory=list)


def heldout_batches(tokenizer, texts: dict[str, str], tokens_per_domain: int, seq_len: int,
                    batch_size: int) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Batches of the first ``tokens_per_domain`` tokens of each domain; windows never cross domains,
    so every domain scores the same number of tokens when its text is long enough."""
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    out, doms = [], []
    for d, text in texts.items():
        ids = token_stream(text, tokenizer, max_tokens=tokens_per_domain)
        if ids.numel() < tokens_per_domain:
            raise ValueError(f"held-out text of {d!r} has {ids.numel()} tokens, fewer than "
                             f"tokens_per_domain={tokens_per_domain}; lower it or give more text")
        for b in iter_batches(ids, seq_len, None, batch_size, pad_id=pad):
            out.append(b)
            doms.append(d)
    return out, doms


@torch.no_grad()
def _row_logp(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per row, float32 log-softmax ``[T, V]`` over the row's valid (attention_mask) positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    valid = batch["attention_mask"].bool()
    return [F.log_softmax(logits[b][valid[b]].float(), -1) for b in range(logits.shape[0])]


def reference(model, batches, domains) -> Reference:
    model.eval()
    return Reference(batches, domains, [_row_logp(model, b) for b in batches])


def score_model(model, ref: Reference) -> dict[str, Any]:
    """Perplexity (as ``evaluate.perplexity``: scored tokens of ``score_mask``), KL(unpruned || model) and
    top-1 agreement (as ``evaluate.kl``: every valid token) against the cached reference."""
    model.eval()
    nll = {d: [0.0, 0] for d in dict.fromkeys(ref.domains)}
    kl_sum, agree, count = 0.0, 0, 0
    for batch, dom, ref_rows in zip(ref.batches, ref.domains, ref.logp):
        rows = _row_logp(model, batch)
        valid = batch["attention_mask"].bool()
        for b, (logq, logp) in enumerate(zip(rows, ref_rows)):
            ids = batch["input_ids"][b][valid[b]]  # [T]
            scored = batch["score_mask"][b][valid[b]][1:]  # targets 1..T-1
            tok_nll = -logq[:-1].gather(-1, ids[1:, None])[:, 0]  # [T-1]
            nll[dom][0] += float(tok_nll[scored].double().sum())
            nll[dom][1] += int(scored.sum())
            kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # [T]
            kl_sum += float(kl.double().sum())
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            count += logq.shape[0]
    total = sum(v[0] for v in nll.values()) / max(sum(v[1] for v in nll.values()), 1)
    return {"ppl": math.exp(total), "ppl_by_domain": {d: math.exp(s / max(n, 1)) for d, (s, n) in nll.items()},
            "kl": kl_sum / max(count, 1), "top1_agreement": agree / max(count, 1), "tokens": count}


def param_bytes(model) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied embeddings share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def sweep_plans(stats, cfg: DemoConfig) -> list[tuple[str, int | None, float, Any]]:
    """``(method, seed, sparsity, plan)`` for every method and random seed at every sparsity."""
    from moeprune.methods.registry import get_method
    from moeprune.methods.target import Target

    out = []
    for s in cfg.sparsities:
        for name in cfg.methods:
            tgt = Target(param_ratio=1.0 - s) if name in cfg.param_methods else Target(expert_sparsity=s)
            out.append((name, None, s, get_method(name).plan(stats, tgt)))
        for seed in cfg.random_seeds:
            out.append((RANDOM, seed, s, get_method(RANDOM, seed=seed).plan(stats, Target(expert_sparsity=s))))
    return out


def evaluate_plans(model, ref: Reference, plans, *, progress: bool = True) -> list[dict[str, Any]]:
    """Apply each plan to a deep copy of ``model`` and score it; the first row is the unpruned model."""
    from moeprune.apply import apply_plan

    base_bytes = param_bytes(model)
    rows = [{"method": "unpruned", "seed": None, "sparsity": 0.0, **score_model(model, ref),
             "bytes": base_bytes, "bytes_saved": 0}]
    for i, (name, seed, s, plan) in enumerate(plans):
        t0 = time.time()
        pruned = apply_plan(copy.deepcopy(model), plan)
        row = {"method": name, "seed": seed, "sparsity": s, **score_model(pruned, ref)}
        row["bytes"] = param_bytes(pruned)
        row["bytes_saved"] = base_bytes - row["bytes"]
        row["expert_sparsity"] = plan.expert_sparsity()
        rows.append(row)
        del pruned
        if progress:
            tag = name if seed is None else f"{name} (seed {seed})"
            print(f"  [{i + 1}/{len(plans)}] {tag:18s} sparsity {s:.0%}: ppl {row['ppl']:8.2f}  "
                  f"KL {row['kl']:.3f}  ({time.time() - t0:.1f}s)", flush=True)
    return rows


def pieces(text: str, size: int = 2000) -> list[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def features_for(cfg: DemoConfig) -> tuple[str, ...]:
    from moeprune.methods.registry import get_method

    feats = ["routed"]
    for name in cfg.methods:
        feats += list(get_method(name).needs)
    return tuple(dict.fromkeys(feats))


def run_demo(out_dir: str | os.PathLike, cfg: DemoConfig = DemoConfig(), *, calib_texts: list[str] | None = None,
             heldout: dict[str, str] | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the sweep and write ``results.jsonl``, plans and the report into ``out_dir``; returns
    ``{"rows", "report", "seconds"}``. Texts default to the packaged toy-moe calibration / held-out slices."""
    from moeprune.builtin_text import toy_moe_texts
    from moeprune.models import load_model
    from moeprune.observe import build_batches, observe
    from moeprune.report.demo import write_demo_report

    out = os.fspath(out_dir)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty; choose another or pass --overwrite")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    if calib_texts is None:  # pieces, so that the seeded shuffle of packing mixes the domains
        calib_texts = [p for t in toy_moe_texts("calib").values() for p in pieces(t)]
    heldout = heldout if heldout is not None else toy_moe_texts("heldout")
    batches = build_batches(calib_texts, tok, num_samples=cfg.calib_samples, seq_len=cfg.seq_len,
                            batch_size=cfg.batch_size, seed=cfg.seed)
    if progress:
        print(f"calibrating {cfg.model} on {cfg.calib_samples} x {cfg.seq_len} tokens ...", flush=True)
    stats = observe(model, batches, features=features_for(cfg), progress=False)
    plans = sweep_plans(stats, cfg)
    ref = reference(model, *heldout_batches(tok, heldout, cfg.eval_tokens_per_domain, cfg.seq_len,
                                            cfg.batch_size))
    rows = evaluate_plans(model, ref, plans, progress=progress)
    os.makedirs(os.path.join(out, "plans"), exist_ok=True)
    for name, seed, s, plan in plans:
        plan.save(os.path.join(out, "plans", f"{name}{'' if seed is None else seed}_{round(100 * s)}.json"))
    seconds = round(time.time() - t0, 1)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"config": asdict(cfg), "seconds": seconds, "domains": list(heldout)}, f, indent=1)
    info = {"model": cfg.model, "calib_tokens": cfg.calib_samples * cfg.seq_len, "domains": list(heldout),
            "eval_tokens": cfg.eval_tokens_per_domain, "seconds": seconds, "dtype": cfg.dtype}
    report = write_demo_report(out, rows, {(n, sd, s): p for n, sd, s, p in plans}, info)
    return {"rows": rows, "report": report, "seconds": seconds}
