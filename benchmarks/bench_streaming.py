"""Benchmark the out-of-core checkpoint rewrite (``apply.streaming.rewrite_checkpoint``).

Builds a random Qwen3-MoE checkpoint of a few hundred MB (per-expert keys on disk, as the hub
checkpoints), rewrites it at 50% expert sparsity, and compares with a plain copy of the same number
of bytes (the I/O floor). The rewrite runs in a fresh subprocess so its peak RSS (minus the RSS after
imports) can be compared with the largest tensor: the rewrite should hold about one tensor at a time.

    python benchmarks/bench_streaming.py [--workdir /tmp/moeprune_bench] [--experts 32] [--layers 4] [--fused]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def build(workdir: str, experts: int, layers: int, hidden: int, inter: int, fused: bool) -> str:
    import torch
    import transformers

    src = os.path.join(workdir, "src")
    if os.path.isfile(os.path.join(src, "config.json")):
        return src
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=inter,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        num_experts=experts,
        num_experts_per_tok=4,
        vocab_size=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(src, max_shard_size="100MB", save_original_format=not fused)
    return src


def rewrite_child(src: str, out: str, sparsity: float) -> None:
    """Runs in a subprocess: prints JSON with the timing and RSS numbers. The model family's modules
    are imported before the baseline (transformers imports them lazily, seconds and ~100 MB)."""
    import threading

    import transformers

    from moeprune.apply.streaming import _meta_model, rewrite_checkpoint
    from moeprune.plan import PruningPlan

    cfg = transformers.AutoConfig.from_pretrained(src)
    _meta_model(__import__("pathlib").Path(src), __import__("torch").float32)  # warm the lazy imports
    import transformers.core_model_loading

    n = cfg.num_experts
    keep = {
        li: list(range(0, n, 2)) if sparsity == 0.5 else list(range(int(n * (1 - sparsity))))
        for li in range(cfg.num_hidden_layers)
    }
    plan = PruningPlan.from_keep(keep, n, method="bench")
    base = _rss()
    peak = dict(base)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _rss().items():
                peak[k] = max(peak[k], v)
            done.wait(0.005)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    rewrite_checkpoint(src, plan, out, max_shard_size="100MB", progress=False, overwrite=True)
    dt = time.perf_counter() - t
    done.set()
    th.join()
    print(json.dumps({"seconds": dt, "base": base, "peak": peak}))


def _rss() -> dict[str, int]:
    """Resident anonymous memory (what the process allocated) and file-backed pages (the mmapped
    source shards: page cache the kernel can drop), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def folder_bytes(path: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(suffix))


def copy_bytes(src: str, dst: str, n: int) -> float:
    """Copy the first ``n`` bytes of the source shards into ``dst`` (one file per shard)."""
    os.makedirs(dst, exist_ok=True)
    t = time.perf_counter()
    left = n
    for name in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
        if left <= 0:
            break
        with open(os.path.join(src, name), "rb") as fi, open(os.path.join(dst, name), "wb") as fo:
            while left > 0:
                buf = fi.read(min(left, 16 << 20))
                if not buf:
                    break
                fo.write(buf)
                left -= len(buf)
    return time.perf_counter() - t


def largest_tensor(src: str) -> tuple[str, int]:
    from safetensors import safe_open

    best = ("", 0)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(src, name), "pt") as f:
                for k in f.keys():  # noqa: SIM118 (safetensors handle, not a dict)
                    sl = f.get_slice(k)
                    shape = sl.get_shape()
                    size = 1
                    for s in shape:
                        size *= s
                    size *= {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 4)
                    if size > best[1]:
                        best = (k, size)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/moeprune_bench")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--fused",
        action="store_true",
        help="store experts fused ([E, 2I, H], save_original_format=False) instead of per-expert keys",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rewrite_child(args.child[0], args.child[1], 0.5)
        return
    os.makedirs(args.workdir, exist_ok=True)
    src = build(args.workdir, args.experts, args.layers, args.hidden, args.inter, args.fused)
    out = os.path.join(args.workdir, "out")
    src_bytes = folder_bytes(src)
    name, big = largest_tensor(src)
    runs = []
    for _ in range(args.repeats):
        res = subprocess.run(
            [sys.executable, __file__, "--child", src, out], check=True, capture_output=True, text=True
        )
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    out_bytes = folder_bytes(out)
    copies = []
    for i in range(args.repeats):
        copies.append(copy_bytes(src, os.path.join(args.workdir, f"copy{i}"), out_bytes))
        shutil.rmtree(os.path.join(args.workdir, f"copy{i}"))
    best = min(runs, key=lambda r: r["seconds"])
    t_rw, t_cp = best["seconds"], min(copies)
    anon = max(r["peak"]["RssAnon"] - r["base"]["RssAnon"] for r in runs)
    mapped = max(r["peak"]["RssFile"] - r["base"]["RssFile"] for r in runs)
    print(
        f"checkpoint: {src_bytes / 2**20:.0f} MiB ({args.layers} MoE layers x {args.experts} experts, "
        f"{'fused' if args.fused else 'per-expert'} keys); "
        f"rewritten at 50% expert sparsity: {out_bytes / 2**20:.0f} MiB"
    )
    print(
        f"streaming rewrite: {t_rw:.2f} s (best of {args.repeats}); "
        f"plain copy of {out_bytes / 2**20:.0f} MiB: "
        f"{t_cp:.2f} s; ratio rewrite/copy = {t_rw / t_cp:.1f}x; rewrite throughput "
        f"{out_bytes / 2**20 / t_rw:.0f} MiB/s"
    )
    print(
        f"peak anonymous RSS above the post-import baseline: {anon / 2**20:.1f} MiB; "
        f"largest tensor ({name}): "
        f"{big / 2**20:.1f} MiB (ratio {anon / big:.2f}); checkpoint size / peak extra memory "
        f"{src_bytes / max(anon, 1):.0f}x"
    )
    print(
        f"(plus up to {mapped / 2**20:.0f} MiB of file-backed RSS: the mmapped source shards, "
        "reclaimable page cache, not allocations)"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
