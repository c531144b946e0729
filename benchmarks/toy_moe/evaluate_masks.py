"""Sanity check of the toy MoE as a pruning benchmark: test perplexity per domain of the unpruned model,
of frequency pruning (keep the experts most often in the top-k on the calib split, per layer) and of
random expert masks. Pruned experts are removed by adding -inf to their router logits before the
softmax/top-k (exactly equal to deleting them and renormalising over the kept ones).

    python -m benchmarks.toy_moe.evaluate_masks [--sparsity 0.5] [--seeds 4]

Expected on the recipe's model (reference run): unpruned ~59, frequency ~83, random ~184 +- 62.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.toy_moe.corpus import load_splits, toy_dir
from benchmarks.toy_moe.model import SEQ_LEN, domain_perplexity, load_toy_model, pack_windows


def routers(model) -> dict[int, torch.nn.Module]:
    """``{decoder layer index: router}`` for the toy's Qwen3-MoE blocks (``layers[i].mlp.gate``)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
            out[i] = gate
    if not out:
        raise ValueError(f"{type(model).__name__} has no layers[i].mlp.gate router; expected a Qwen3-MoE model")
    return out


def _masked_routing(gate, logits: torch.Tensor, mask: torch.Tensor):
    """The Qwen3-MoE router maths (softmax -> top-k -> optional renorm) on masked logits [T, E]."""
    logits = logits + mask.to(logits.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # [T, E]
    top_v, top_i = torch.topk(probs, gate.top_k, dim=-1)  # [T, k]
    if gate.norm_topk_prob:
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    return logits, top_v.to(logits.dtype), top_i


@contextlib.contextmanager
def router_mask(model, keep: dict[int, list[int]]) -> Iterator[None]:
    """Route only to ``keep[layer]`` experts inside the block (forward hooks on ``mlp.gate``, always removed)."""
    gates = routers(model)
    handles = []
    try:
        for li, experts in keep.items():
            if li not in gates:
                raise ValueError(f"layer {li} has no MoE router; MoE layers are {sorted(gates)}")
            gate = gates[li]
            if len(set(experts)) < gate.top_k or not all(0 <= e < gate.num_experts for e in experts):
                raise ValueError(f"layer {li}: keep={sorted(experts)} must hold >= top_k={gate.top_k} distinct "
                                 f"ids in [0, {gate.num_experts})")
            mask = torch.full((gate.num_experts,), float("-inf"))
            mask[list(experts)] = 0.0

            def hook(mod, args, output, mask=mask):
                return _masked_routing(mod, output[0], mask.to(output[0].device))

            handles.append(gate.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def routing_counts(model, windows: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer, float64 [E] counts of top-k selections over all tokens of ``windows``."""
    gates = routers(model)
    counts = {li: torch.zeros(g.num_experts, dtype=torch.float64) for li, g in gates.items()}
    handles = []
    try:
        for li, g in gates.items():
            def hook(mod, args, output, li=li):
                counts[li] += torch.bincount(output[2].flatten().cpu(), minlength=mod.num_experts).double()

            handles.append(g.register_forward_hook(hook))
        model.eval()
        for w in tqdm(windows, desc="routing counts", disable=None):
            model(input_ids=w[None].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return counts


def keep_most_frequent(counts: dict[int, torch.Tensor], n_keep: int) -> dict[int, list[int]]:
    """Per layer, the ``n_keep`` experts with the most selections (ties: lower id first)."""
    return {li: sorted(int(i) for i in np.argsort(-c.numpy(), kind="stable")[:n_keep]) for li, c in counts.items()}


def random_keep(model, n_keep: int, seed: int) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {li: sorted(torch.randperm(r.num_experts, generator=g)[:n_keep].tolist())
            for li, r in routers(model).items()}


def evaluate(model, tokenizer, tests: dict[str, str], test_tokens: int, seq_len: int = SEQ_LEN) -> dict:
    """Per-domain test perplexity and their geometric mean (= exp of the mean per-domain loss)."""
    ppl = {d: domain_perplexity(model, tokenizer, t, seq_len, test_tokens) for d, t in tests.items()}
    return {"macro": math.exp(np.mean([math.log(p) for p in ppl.values()])), "per_domain": ppl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="cache root (default $MOEPRUNE_TOY_DIR or ~/.cache/moeprune/toy-moe)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of experts removed in every layer")
    p.add_argument("--seeds", type=int, default=4, help="number of random masks")
    p.add_argument("--calib-tokens", type=int, default=32 * SEQ_LEN, help="per domain, from the calib split")
    p.add_argument("--test-tokens", type=int, default=64 * SEQ_LEN, help="per domain, from the test split")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tok = load_toy_model(a.dir)
    splits = load_splits(a.dir, build=False)
    n_exp = model.config.num_experts
    n_keep = n_exp - round(a.sparsity * n_exp)
    if not model.config.num_experts_per_tok <= n_keep <= n_exp:
        raise SystemExit(f"--sparsity {a.sparsity} keeps {n_keep} of {n_exp} experts; need between "
                         f"top_k={model.config.num_experts_per_tok} and {n_exp}")
    tests = {d: s["test"] for d, s in splits.items()}
    rows: dict[str, dict] = {}

    def report(name: str, res: dict) -> None:
        rows[name] = res
        print(f"{name:22s} ppl {res['macro']:8.2f} | "
              + " ".join(f"{d}:{v:.1f}" for d, v in res["per_domain"].items()), flush=True)

    report("unpruned", evaluate(model, tok, tests, a.test_tokens))
    calib = [w for s in splits.values()
             for w in pack_windows(tok(s["calib"], add_special_tokens=False)["input_ids"], SEQ_LEN, a.calib_tokens)]
    counts = routing_counts(model, calib)
    freq_keep = keep_most_frequent(counts, n_keep)
    with router_mask(model, freq_keep):
        report("frequency", evaluate(model, tok, tests, a.test_tokens))
    rand_keeps = {}
    for seed in range(a.seeds):
        rand_keeps[seed] = random_keep(model, n_keep, seed)
        with router_mask(model, rand_keeps[seed]):
            report(f"random seed={seed}", evaluate(model, tok, tests, a.test_tokens))
    rp = np.array([rows[f"random seed={s}"]["macro"] for s in range(a.seeds)])
    sd = float(rp.std(ddof=1)) if len(rp) > 1 else 0.0
    print(f"\nunpruned {rows['unpruned']['macro']:.2f} | frequency {rows['frequency']['macro']:.2f} | random "
          f"{rp.mean():.2f} +- {sd:.2f} (min {rp.min():.2f}, max {rp.max():.2f}) | {time.time() - t0:.0f}s")
    out = toy_dir(a.dir) / f"evaluate_masks_{round(a.sparsity * 100)}.json"
    out.write_text(json.dumps({
        "sparsity": a.sparsity, "kept_per_layer": n_keep, "calib_tokens_per_domain": a.calib_tokens,
        "test_tokens_per_domain": a.test_tokens, "results": rows,
        "random_macro_mean": float(rp.mean()), "random_macro_sd": sd,
        "frequency_keep": freq_keep, "random_keep": rand_keeps,
        "routing_counts": {li: c.tolist() for li, c in counts.items()}, "seconds": time.time() - t0,
    }, indent=1))
    print("->", out)


if __name__ == "__main__":
    main()
