"""Memory of ragged (TENP) plans stored in width buckets vs. the pad layout vs. expert removal.

On the toy MoE (``benchmarks/toy_moe``; a tiny random Qwen3-MoE and random-token "perplexity" when the
trained model is missing, said in the output), for TENP at ``param_ratio`` and REAP at the same
expert sparsity: the routed-expert parameters the plan promises, the bytes on disk of the saved
checkpoint, the parameters / bytes in memory after ``load_pruned``, and held-out perplexity (macro
geometric mean over the toy domains, as ``bench_quality.py``) of the reloaded model.

    python benchmarks/bench_ragged.py                  # prints a markdown table, writes results/ragged.*
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moeprune.apply import apply_plan, load_pruned, save_pruned
from moeprune.apply.experts import moe_blocks
from moeprune.arch.structure import get_experts, intermediate_size_of
from moeprune.methods import Target, get_method
from moeprune.observe import ExpertStats, observe

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def routed_params(model) -> int:
    """Parameters of the routed experts (every bucket of bucketed layers)."""
    return sum(p.numel() for b in moe_blocks(model).values() for p in get_experts(b).parameters())


def promised_routed(model, plan) -> int:
    """Routed-expert parameters the plan keeps: per kept expert, its kept channels x (gate, up, down)."""
    total = 0
    for li, block in moe_blocks(model).items():
        inter = intermediate_size_of(block)
        per_channel = routed_params_of(block) // (block.experts.num_experts * inter)
        lp = plan.layers.get(li)
        keep = lp.keep if lp else range(block.experts.num_experts)
        neurons = dict(lp.neurons or {}) if lp else {}
        total += sum(len(neurons.get(e, range(inter))) for e in keep) * per_channel
    return total


def routed_params_of(block) -> int:
    return sum(p.numel() for p in get_experts(block).parameters())


def tensor_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def disk_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def load_inputs(a):
    """(model, tokenizer or None, eval callable, stats, note)."""
    try:
        from benchmarks.bench_quality import calibration, macro_ppl
        from benchmarks.toy_moe.corpus import load_splits
        from benchmarks.toy_moe.model import load_toy_model

        model, tok = load_toy_model(a.toy_dir)
        splits = load_splits(a.toy_dir, build=False)
    except (FileNotFoundError, ImportError) as e:
        return fallback(a, e)
    stats_dir = os.path.join(RESULTS, "quality-stats")
    needs = sorted(set(get_method("tenp").needs) | set(get_method("reap").needs))
    if os.path.isfile(os.path.join(stats_dir, "stats.json")) and \
            set(needs) <= set(ExpertStats.load(stats_dir).meta.get("features", [])):
        stats = ExpertStats.load(stats_dir)  # bench_quality's calibration pass (same data and seed)
    else:
        stats = observe(model, calibration(splits, tok, a.per_domain, a.seq_len), features=needs)
    return model, lambda m: macro_ppl(m, tok, splits, a.test_tokens)["macro"], stats, "trained toy MoE"


def fallback(a, why):
    from moeprune.arch.tiny import tiny_model

    model = tiny_model("qwen3_moe", num_experts=16)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 250, (4, 64), generator=g)} for _ in range(4)]
    test = torch.randint(3, 250, (8, 64), generator=g)
    needs = sorted(set(get_method("tenp").needs) | set(get_method("reap").needs))
    stats = observe(model, calib, features=needs)

    def ppl(m):
        with torch.no_grad():
            out = m(input_ids=test, labels=test)
        return math.exp(out.loss.item())

    return model, ppl, stats, f"TINY RANDOM qwen3_moe (no trained toy model: {why}); perplexity on random tokens"


def measure(label, model, plan, ppl, tmp, **apply_kw) -> dict:
    t = time.time()
    pruned = apply_plan(copy.deepcopy(model), plan, **apply_kw)
    path = save_pruned(pruned, os.path.join(tmp, label.replace(" ", "_")), plan=plan)
    loaded = load_pruned(path, experts_implementation="eager").eval()
    return {"plan": label, "promised_routed": promised_routed(model, plan), "routed_after_load": routed_params(loaded),
            "params_after_load": sum(p.numel() for p in loaded.parameters()), "bytes_in_memory": tensor_bytes(loaded),
            "bytes_on_disk": disk_bytes(path), "ppl": ppl(loaded), "seconds": round(time.time() - t, 1)}


def to_markdown(rows: list[dict], base: dict) -> str:
    head = ("| plan | routed params promised | routed params after load | total params after load | "
            "bytes in memory | bytes on disk | disk vs unpruned | held-out ppl |")
    lines = [head, "|" + "---|" * 8]
    for r in [base, *rows]:
        lines.append(f"| {r['plan']} | {r['promised_routed']:,} | {r['routed_after_load']:,} "
                     f"({r['routed_after_load'] / r['promised_routed']:.1%} of promised) | {r['params_after_load']:,} | "
                     f"{r['bytes_in_memory']:,} | {r['bytes_on_disk']:,} | {r['bytes_on_disk'] / base['bytes_on_disk']:.1%} "
                     f"| {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-dir", default=None)
    p.add_argument("--ratio", type=float, default=0.5, help="TENP param_ratio; REAP removes 1-ratio of the experts")
    p.add_argument("--per-domain", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--test-tokens", type=int, default=16384, help="held-out tokens per domain")
    p.add_argument("--out", default=os.path.join(RESULTS, "ragged"))
    a = p.parse_args()
    torch.manual_seed(0)
    model, ppl, stats, note = load_inputs(a)
    print(note)
    plans = {"tenp": get_method("tenp").plan(stats, Target(param_ratio=a.ratio)),
             "reap": get_method("reap").plan(stats, Target(expert_sparsity=1.0 - a.ratio))}
    print("tenp plan meta: params_kept", plans["tenp"].meta.get("params_kept"), "params_padded",
          plans["tenp"].meta.get("params_padded"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_path = save_pruned(model, os.path.join(tmp, "unpruned"))
        base = {"plan": "unpruned", "promised_routed": routed_params(model), "routed_after_load": routed_params(model),
                "params_after_load": sum(q.numel() for q in model.parameters()), "bytes_in_memory": tensor_bytes(model),
                "bytes_on_disk": disk_bytes(base_path), "ppl": ppl(model)}
        rows.append(measure(f"tenp {a.ratio} buckets (default)", model, plans["tenp"], ppl, tmp))
        rows.append(measure(f"tenp {a.ratio} pad", model, plans["tenp"], ppl, tmp, ragged="pad"))
        rows.append(measure(f"reap {1 - a.ratio:.2f} experts", model, plans["reap"], ppl, tmp))
    md = f"{note}\n\n" + to_markdown(rows, base)
    print("\n" + md)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".jsonl", "w") as f:
        f.writelines(json.dumps({**r, "model": note}) + "\n" for r in [base, *rows])
    with open(a.out + ".md", "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
