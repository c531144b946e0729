"""Peers side by side: llm-compressor's REAPPruningModifier and moeprune's ``reap`` (one-shot and sequential)
on the toy MoE with the quality table's calibration windows.

llm-compressor 0.14.0.1 needs transformers 5.17, so it runs in its own venv (created once under
``~/.cache/moeprune/peers-venv`` from PyPI: ``llmcompressor==0.14.0.1``, ``torch==2.13.0``) on the windows
this script saves (``benchmarks/peers_llmcompressor.py``). Every run (llm-compressor; moeprune one-shot
observe + plan; moeprune sequential observe) is its own subprocess with 1 torch thread, so wall time and
peak RSS (``VmHWM``) are each run's own. Kept sets are compared per layer; held-out perplexity
(per domain, the quality table's) is computed here for every kept set by router masking of the same
model, and for llm-compressor also on its saved pruned checkpoint (a check that masking == its pruning).

    python benchmarks/bench_peers.py            # writes benchmarks/results/peers.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_quality import calibration, macro_ppl
from benchmarks.toy_moe.corpus import load_splits
from benchmarks.toy_moe.model import load_toy_model, model_dir

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.expanduser("~/.cache/moeprune/peers-venv")
LLMC, ONESHOT = "llm-compressor REAPPruningModifier", "moeprune reap (one-shot)"
PEER_PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")  # llmcompressor pulls transformers 5.17


def ensure_venv(venv: str = VENV) -> str:
    """The peers venv's python (created and installed once; the cached one is reused)."""
    py = os.path.join(venv, "bin", "python")
    ok = os.path.exists(py) and subprocess.run([py, "-c", "import llmcompressor"], check=False,
                                               capture_output=True).returncode == 0
    if not ok:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", *PEER_PINS], check=True)
    return py


def _child_env(threads: int) -> dict[str, str]:
    src = os.path.join(HERE, "..", "src")
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PEERS_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}


def _timed(cmd: list[str], threads: int) -> float:
    t = time.perf_counter()
    subprocess.run(["nice", "-n", "5", *cmd], check=True, env=_child_env(threads))
    return time.perf_counter() - t


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM; ``ru_maxrss`` would include the launching parent's,
    which Linux carries across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


# ---- moeprune worker (its own subprocess): observe + plan, seconds and peak RSS of this process
def worker(mode: str, calib: str, sparsity: float, out: str, threads: int) -> None:
    from safetensors.torch import load_file

    from moeprune.methods import Target, get_method
    from moeprune.observe import observe, observe_layerwise
    from moeprune.observe.sequential import sequential_plan

    torch.set_num_threads(threads)
    model, _ = load_toy_model()
    if mode.endswith("-noncausal"):  # diagnostic: attention without the causal mask (see the README)
        for mod in model.modules():
            if hasattr(mod, "is_causal"):
                mod.is_causal = False
    ids = load_file(calib)["input_ids"]
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])}
               for i in range(0, len(ids), 8)]
    method, target = get_method("reap"), Target(expert_sparsity=sparsity)
    t0 = time.perf_counter()
    if mode.startswith("sequential"):
        stats = observe_layerwise(model, batches, features=method.needs, progress=False, sequential=True,
                                  method=method, target=target)
        plan = sequential_plan(stats)
    else:
        plan = method.plan(observe(model, batches, features=method.needs, progress=False), target)
    seconds = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                   "keep": {str(k): v for k, v in plan.keep().items()}}, f)


def _run_moeprune(mode: str, calib: str, s: float, work: str, threads: int) -> dict:
    out = os.path.join(work, f"moeprune-{mode}-{s}.json")
    wall = _timed([sys.executable, os.path.abspath(__file__), "--worker", mode, "--calib", calib,
                   "--sparsity", str(s), "--worker-out", out, "--threads", str(threads)], threads)
    with open(out) as f:
        res = json.load(f)
    return {**res, "keep": {int(k): v for k, v in res["keep"].items()}, "process_seconds": wall}


def _run_llmcompressor(py: str, calib: str, s: float, work: str, threads: int, pipeline: str) -> dict:
    out = os.path.join(work, f"llmcompressor-{pipeline}-{s}")
    wall = _timed([py, os.path.join(HERE, "peers_llmcompressor.py"), str(model_dir()), calib, str(s), out, pipeline],
                  threads)
    with open(os.path.join(out, "run.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "retained.json")) as f:  # "model.layers.3.mlp" -> retained ids
        keep = {int(name.split(".")[2]): sorted(v) for name, v in json.load(f).items()}
    return {**res, "keep": keep, "process_seconds": wall, "checkpoint": os.path.join(out, "model")}


def _eval(model, tok, splits, keep: dict[int, list[int]], test_tokens: int) -> dict[str, float]:
    from moeprune.apply import mask_experts

    with mask_experts(model, keep):
        return macro_ppl(model, tok, splits, test_tokens)


def _checkpoint_ppl(path: str, splits, test_tokens: int) -> dict[str, float] | str:
    """Perplexity of llm-compressor's saved pruned checkpoint, loaded by moeprune's transformers."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 (report why it cannot be read back, keep the masked numbers)
        return f"{type(e).__name__}: {e}"
    return macro_ppl(m, tok, splits, test_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--per-domain", type=int, default=16, help="calibration rows per domain (quality table)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--test-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=os.path.expanduser("~/.cache/moeprune/peers-work"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "peers"))
    p.add_argument("--worker", choices=["oneshot", "sequential", "sequential-noncausal"], help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--sparsity", type=float, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.calib, a.sparsity, a.worker_out, a.threads)
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    py = ensure_venv()
    splits = load_splits(build=False)
    model, tok = load_toy_model()
    from safetensors.torch import save_file

    batches = calibration(splits, tok, a.per_domain, a.seq_len)
    calib = os.path.join(a.work, "calib.safetensors")
    save_file({"input_ids": torch.cat([b["input_ids"] for b in batches]).contiguous()}, calib)
    rows = [{"run": "unpruned", "sparsity": 0.0, "ppl": macro_ppl(model, tok, splits, a.test_tokens)}]
    for s in a.sparsities:
        runs = {LLMC: _run_llmcompressor(py, calib, s, a.work, a.threads, "sequential"),
                "llm-compressor, pipeline=basic (one pass)": _run_llmcompressor(py, calib, s, a.work, a.threads,
                                                                               "basic"),
                ONESHOT: _run_moeprune("oneshot", calib, s, a.work, a.threads),
                "moeprune reap sequential": _run_moeprune("sequential", calib, s, a.work, a.threads),
                "moeprune reap sequential, non-causal attention (diagnostic)":
                    _run_moeprune("sequential-noncausal", calib, s, a.work, a.threads)}
        ref, one = runs[LLMC]["keep"], runs[ONESHOT]["keep"]
        for name, r in runs.items():
            row = {"run": name, "sparsity": s, "seconds": round(r["seconds"], 2),
                   "process_seconds": round(r["process_seconds"], 2), "peak_rss_mb": round(r["peak_rss_mb"]),
                   "keep": r["keep"], "same_as_llmcompressor": {li: r["keep"][li] == ref[li] for li in ref},
                   "overlap_with_llmcompressor": {li: len(set(r["keep"][li]) & set(ref[li])) for li in ref},
                   "same_as_moeprune_oneshot": {li: r["keep"][li] == one[li] for li in one},
                   "ppl": _eval(model, tok, splits, r["keep"], a.test_tokens)}
            if "checkpoint" in r:
                row["checkpoint_ppl"] = _checkpoint_ppl(r["checkpoint"], splits, a.test_tokens)
                row["versions"] = {k: r[k] for k in ("llmcompressor", "transformers", "torch")}
            rows.append(row)
            print(f"s={s:.2f} {name:36s} {row['seconds']:7.2f}s {row['peak_rss_mb']:5d} MB  "
                  f"agree {sum(row['same_as_llmcompressor'].values())}/{len(ref)}  ppl {row['ppl']['macro']:.2f}")
    meta = {"calibration": {"windows": sum(int(b["input_ids"].shape[0]) for b in batches), "seq_len": a.seq_len},
            "threads": a.threads, "test_tokens_per_domain": a.test_tokens}
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = to_markdown(rows, sorted(splits), meta)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print("\n" + md)


def to_markdown(rows: list[dict], domains: list[str], meta: dict) -> str:
    cal = meta["calibration"]
    head = (f"Toy MoE (4 MoE layers x 16 experts, top-2), {cal['windows']} x {cal['seq_len']} calibration tokens, "
            f"{meta['threads']} torch thread; perplexity on {meta['test_tokens_per_domain']} held-out tokens per "
            "domain (router masking of the same model; llm-compressor's saved checkpoint in brackets).")
    out = [head, "",
           "| run | sparsity | seconds | process s | peak RSS MB | kept = llm-compressor (layers) | overlap "
           "| kept = moeprune one-shot | macro ppl | " + " | ".join(domains) + " |",
           "|---|---|---|---|---|---|---|---|---|" + "---|" * len(domains)]
    for r in rows:
        ppl = r["ppl"]
        macro = f"{ppl['macro']:.2f}"
        if isinstance(r.get("checkpoint_ppl"), dict):
            macro += f" ({r['checkpoint_ppl']['macro']:.2f})"
        if r["run"] == "unpruned":
            out.append(f"| unpruned | 0% | | | | | | | {macro} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains)
                       + " |")
            continue
        same = r["same_as_llmcompressor"]
        ov = r["overlap_with_llmcompressor"]
        k = len(next(iter(r["keep"].values())))
        out.append(f"| {r['run']} | {r['sparsity']:.0%} | {r['seconds']:.2f} | {r['process_seconds']:.1f} | "
                   f"{r['peak_rss_mb']} | {sum(same.values())}/{len(same)} | "
                   f"{'/'.join(str(v) for v in ov.values())} of {k} | "
                   f"{sum(r['same_as_moeprune_oneshot'].values())}/{len(same)} | {macro} | "
                   + " | ".join(f"{ppl[d]:.2f}" for d in domains) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
