"""Cost of calibration: instrumented ``observe`` vs a plain forward, same model and data, one run.

A random Qwen3-MoE (default hidden 512, 8 layers, 32 experts, top-4, expert width 256, seq 512) runs the
same batches (1) plainly, (2) under ``observe`` with routed statistics only, (3) with each heavier
feature group added to ``routed``. Repetitions are interleaved and the median wall time is reported as
a ratio to the plain forward. On CPU the time is the process CPU time with 1 torch thread (default), which
other load on a shared machine barely changes; the minimum over reps is the ratio's basis (medians are
printed too). Peak memory is measured per variant in a fresh child process (CPU: RSS sampled every 0.5 ms
with glibc's mmap threshold pinned so freed buffers leave RSS; GPU: ``torch.cuda.max_memory_allocated``),
as the peak increase over the resident model and as total peak over the plain forward's total peak.

    python benchmarks/bench_observe.py [--device cpu|cuda] [--impl eager|grouped_mm] [--reps 3]
Target: routed-only <= 1.15x the plain forward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import transformers

from moeprune.observe import observe
from moeprune.observe.runner import forward_kwargs

transformers.logging.set_verbosity_error()
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak bytes above the level at entry: CUDA allocator stats, or RSS sampled every 0.5 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.peak, self.stop = rss(), rss(), False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.peak, rss())
        self.delta = self.peak - self.base


def build(args) -> torch.nn.Module:
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=args.hidden // 8, intermediate_size=2 * args.hidden, moe_intermediate_size=args.inter,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True, vocab_size=4096,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().to(args.device)
    model.set_experts_implementation(args.impl)
    return model


def variants(args, model, batches) -> tuple[dict, list[str]]:
    """Name -> callable for every measured variant, and the experts implementations timed."""
    impls = args.impls.split(",")
    extra = forward_kwargs(model)

    def plain(impl):
        def run():
            model.set_experts_implementation(impl)
            with torch.no_grad():
                for b in batches:
                    model(**b, **extra)
        return run

    def obs(impl, feats=("routed",)):
        def run():
            model.set_experts_implementation(impl)
            observe(model, batches, features=feats, progress=False)
        return run

    out = {}
    for impl in impls:
        out[f"plain forward [{impl}]"] = plain(impl)
        out[f"observe routed [{impl}]"] = obs(impl)
        for g in [g for g in args.groups.split(",") if g]:
            out[f"observe routed+{g} [{impl}]"] = obs(impl, ("routed", g))
    return out, impls


def setup(args):
    model = build(args)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 4096, (args.batch, args.seq), generator=gen).to(args.device)}
               for _ in range(args.batches)]
    return model, batches


def memory_child(args) -> None:
    """Run one variant (after a warm-up run) and print its peak memory as JSON."""
    model, batches = setup(args)
    fn = variants(args, model, batches)[0][args.memory]
    fn()
    with PeakMemory(args.device) as pm:
        fn()
    print(json.dumps({"base": pm.base, "peak": pm.peak, "delta": pm.delta}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", default="eager,grouped_mm",
                    help="experts implementations timed for the plain forward; the fastest is the baseline and "
                         "the model setting for the heavier feature groups")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on CPU (1: process CPU time is then a load-independent cost measure)")
    ap.add_argument("--groups", default="direction,neurons,transitions,paths,cluster,reconstruction")
    ap.add_argument("--memory", default=None, help=argparse.SUPPRESS)  # child mode: one variant's peak memory
    args = ap.parse_args()
    args.device = torch.device(args.device)
    args.impl = args.impls.split(",")[0]
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory:
        return memory_child(args)
    model, batches = setup(args)
    allv, impls = variants(args, model, batches)

    def sync():
        if args.device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.process_time if args.device.type == "cpu" else time.perf_counter

    def timed(names, reps):
        times = {k: [] for k in names}
        for fn in (allv[k] for k in names):  # warm-up
            fn()
        for _ in range(reps):
            for name in names:
                sync()
                t0 = clock()
                allv[name]()
                sync()
                times[name].append(clock() - t0)
        return times

    # stage 1: the plain forward and routed-only observe under each implementation (interleaved)
    s1 = [n for i in impls for n in (f"plain forward [{i}]", f"observe routed [{i}]")]
    times = timed(s1, args.reps)
    best = min(impls, key=lambda i: min(times[f"plain forward [{i}]"]))
    # stage 2: heavier feature groups on the fastest implementation, with a fresh baseline in the same loop
    s2 = [f"plain forward [{best}]", f"observe routed [{best}]"] + [
        n for n in allv if n.endswith(f"[{best}]") and "+" in n]
    times2 = timed(s2, max(3, args.reps // 2))
    mems = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    argv = [a for a in sys.argv[1:]]
    for name in dict.fromkeys(s1 + s2):
        out = subprocess.run([sys.executable, __file__, *argv, "--memory", name], env=env, check=True,
                             capture_output=True, text=True).stdout
        mems[name] = json.loads(out.strip().splitlines()[-1])

    print(f"model: random qwen3_moe hidden={args.hidden} layers={args.layers} experts={args.experts} "
          f"top_k={args.top_k} expert_inter={args.inter}; data: {args.batches} x [{args.batch}, {args.seq}] tokens; "
          f"device={args.device} ({torch.get_num_threads()} threads)")
    print("observe runs the model's own experts implementation once on (token, slot) rows and replays its "
          f"combine in the model dtype (the forward stays bitwise the model's). Fastest plain forward: {best}")
    what = "process CPU time" if args.device.type == "cpu" else "wall time"
    print(f"time: {what} in s; time x = min over interleaved reps / min of the plain forward; memory: peak "
          f"increase over the resident model ({mems[s1[0]]['base'] / 2**20:.0f} MiB), measured in child processes")
    for title, tms in (("stage 1: implementations", times), ("stage 2: feature groups", times2)):
        base = min(tms[f"plain forward [{best}]"])
        mbase = mems[f"plain forward [{best}]"]
        print(f"\n{title}\n{'variant':42s} {'min s':>7s} {'median s':>9s} {'time x':>7s} {'peak +MiB':>10s} "
              f"{'peak+ x':>8s} {'total x':>8s}")
        for name, ts in tms.items():
            m = mems[name]
            print(f"{name:42s} {min(ts):7.3f} {statistics.median(ts):9.3f} {min(ts) / base:7.3f} "
                  f"{m['delta'] / 2**20:10.1f} {m['delta'] / max(mbase['delta'], 1):8.2f} {m['peak'] / mbase['peak']:8.3f}")


if __name__ == "__main__":
    main()
