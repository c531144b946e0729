"""Out-of-core recovery (layer-wise calibration + streaming apply + ``recovery``) vs the in-memory route.

Builds a random bf16 Qwen3-MoE checkpoint (per-expert keys on disk), runs ``oneshot`` twice in fresh
subprocesses on it with the same recipe and ``recovery: compensate``: once in memory (structural apply), once
out of core (``calibration.layerwise: true`` + ``apply.mode: streaming``), plus the out-of-core run without
recovery as a baseline, and prints each run's wall time and
peak RSS, the largest decoder layer's bytes, and how far the two pruned checkpoints' logits are apart.

    nice -n 5 python benchmarks/bench_recovery_ooc.py [--workdir /tmp/moeprune_bench_rooc] [--layers 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


def build(workdir: str, layers: int, experts: int, hidden: int, inter: int) -> str:
    import torch
    import transformers

    src = os.path.join(workdir, "src")
    if os.path.isfile(os.path.join(src, "config.json")):
        return src
    cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=hidden // 8, num_experts=experts, num_experts_per_tok=4,
                                      vocab_size=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(src, max_shard_size="100MB")
    from moeprune.models import byte_tokenizer

    byte_tokenizer().save_pretrained(src)
    return src


def child(src: str, out: str, mode: str) -> None:
    from moeprune import oneshot

    ooc = mode != "mem"

    recipe = {"model": src, "dtype": "bfloat16", "method": {"name": "reap"},
              "calibration": {"dataset": "builtin:stdlib", "num_samples": 16, "seq_len": 256, "batch_size": 4,
                              "layerwise": ooc},
              "eval": {"perplexity": None}, "report": False, **({"apply": {"mode": "streaming"}} if ooc else {})}
    t0 = time.time()
    oneshot(src, recipe=recipe, sparsity=0.5, recovery=None if mode == "ooc-none" else "compensate", output_dir=out, progress=False)
    print(json.dumps({"seconds": round(time.time() - t0, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def compare(a: str, b: str) -> dict:
    import torch

    from moeprune.apply import load_pruned

    ids = torch.randint(3, 8000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = (load_pruned(p).eval()(input_ids=ids).logits.float() for p in (a, b))
    return {"logits_bitwise_equal": bool(torch.equal(la, lb)), "max_abs_diff": float((la - lb).abs().max()),
            "max_abs_logit": float(la.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/moeprune_bench_rooc")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    os.makedirs(a.workdir, exist_ok=True)
    src = build(a.workdir, a.layers, a.experts, a.hidden, a.inter)
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    res = {"checkpoint_mib": round(size / 2**20)}
    for mode in ("mem", "ooc", "ooc-none"):  # ooc-none: the out-of-core run without recovery (baseline)
        out = os.path.join(a.workdir, mode)
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, __file__, "--child", src, out, mode], env=env, check=True,
                           capture_output=True, text=True)
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(compare(os.path.join(a.workdir, "mem", "model"), os.path.join(a.workdir, "ooc", "model")))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
