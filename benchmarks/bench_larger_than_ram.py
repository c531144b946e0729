"""Larger than memory, end to end: ``moeprune run`` (layer-wise calibration + streaming apply) on a random bf16
checkpoint bigger than this machine's RAM, against the physical limit (read the checkpoint once + write the
pruned one once).

The checkpoint has Qwen3-30B-A3B's layer dimensions (hidden 2048, 128 experts top-8, moe_intermediate 768,
32 query / 4 kv heads of 128, vocab 151936; about 1.2 GB per decoder layer in bf16) at reduced depth. It is
written shard by shard (one shard per decoder layer, per-expert keys as on the hub, index + config.json +
a byte-level tokenizer) one tensor at a time, so writing it needs no memory. The run is a subprocess whose
peak RSS (``getrusage`` of the child, plus 0.2 s polling of ``/proc/PID/status`` for the anonymous vs
file-mapped split), bytes read/written (``/proc/PID/io``) and wall time are recorded. Before the run and
before the read baseline the checkpoint's pages are dropped from the page cache (``posix_fadvise
DONTNEED``: no root needed), so both read it cold.

    nice -n 5 python benchmarks/bench_larger_than_ram.py [--layers 24] [--workdir /tmp/moeprune_ltr] [--keep]
    python benchmarks/bench_larger_than_ram.py --smoke       # tiny dims: checks the script in a minute

Results: ``benchmarks/results/larger_than_ram.json`` (not written with ``--smoke``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

QWEN3_30B = {"hidden": 2048, "experts": 128, "top_k": 8, "moe_inter": 768, "heads": 32, "kv_heads": 4,
             "head_dim": 128, "vocab": 151936, "inter": 6144}
SMOKE = {"hidden": 128, "experts": 16, "top_k": 4, "moe_inter": 64, "heads": 4, "kv_heads": 2, "head_dim": 32,
         "vocab": 4096, "inter": 256}
RESULTS = Path(__file__).parent / "results" / "larger_than_ram.json"


@dataclass
class T:
    """What ``write_safetensors`` needs to know of a tensor before producing it."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    std: float = 0.02  # 0: a norm weight (ones)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def layer_tensors(i: int, d: dict) -> dict[str, T]:
    """The hub's on-disk keys of one qwen3_moe decoder layer (per-expert MLP keys)."""
    h, p = d["hidden"], f"model.layers.{i}."
    out = {p + "input_layernorm.weight": T((h,), std=0), p + "post_attention_layernorm.weight": T((h,), std=0),
           p + "self_attn.q_proj.weight": T((d["heads"] * d["head_dim"], h)),
           p + "self_attn.k_proj.weight": T((d["kv_heads"] * d["head_dim"], h)),
           p + "self_attn.v_proj.weight": T((d["kv_heads"] * d["head_dim"], h)),
           p + "self_attn.o_proj.weight": T((h, d["heads"] * d["head_dim"])),
           p + "self_attn.q_norm.weight": T((d["head_dim"],), std=0),
           p + "self_attn.k_norm.weight": T((d["head_dim"],), std=0),
           p + "mlp.gate.weight": T((d["experts"], h), std=0.1)}  # a spread router: distinct routing
    for e in range(d["experts"]):
        q = f"{p}mlp.experts.{e}."
        out |= {q + "gate_proj.weight": T((d["moe_inter"], h)), q + "up_proj.weight": T((d["moe_inter"], h)),
                q + "down_proj.weight": T((h, d["moe_inter"]))}
    return out


def write_checkpoint(src: Path, layers: int, d: dict, seed: int = 0) -> int:
    """Write the random checkpoint one tensor at a time; returns its weight bytes."""
    import transformers

    from moeprune.apply.shards import INDEX_FILE, write_safetensors
    from moeprune.models import byte_tokenizer

    src.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def produce(t: T):
        yield (torch.randn(t.shape, generator=g, dtype=torch.bfloat16) * t.std if t.std
               else torch.ones(t.shape, dtype=torch.bfloat16))

    shards = [{"model.embed_tokens.weight": T((d["vocab"], d["hidden"])), "model.norm.weight": T((d["hidden"],), std=0),
               "lm_head.weight": T((d["vocab"], d["hidden"]))}] + [layer_tensors(i, d) for i in range(layers)]
    n, weight_map, total = len(shards), {}, 0
    for s, tensors in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(src / name, sorted(tensors.items()), produce)
        weight_map |= {k: name for k in tensors}
        total += sum(t.nbytes for t in tensors.values())
        print(f"  wrote {name} ({sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB)", flush=True)
    (src / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    transformers.Qwen3MoeConfig(
        hidden_size=d["hidden"], intermediate_size=d["inter"], moe_intermediate_size=d["moe_inter"],
        num_hidden_layers=layers, num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
        head_dim=d["head_dim"], num_experts=d["experts"], num_experts_per_tok=d["top_k"], vocab_size=d["vocab"],
        norm_topk_prob=True, tie_word_embeddings=False, dtype="bfloat16", max_position_embeddings=4096,
    ).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    return total


def drop_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (fsync first: only clean pages can be dropped)."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_once(folder: Path) -> tuple[float, int]:
    """Seconds to read every weight file of ``folder`` once (cold), and the bytes read."""
    buf, n, t0 = bytearray(64 << 20), 0, time.time()
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)) > 0:
                n += k
    return time.time() - t0, n


def write_once(path: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write ``nbytes`` once (buffered, like the rewrite), and including the final fsync."""
    buf, left, t0 = bytes(64 << 20), nbytes, time.time()
    with open(path, "wb") as f:
        while left > 0:
            left -= f.write(buf[: min(left, len(buf))])
        t_buffered = time.time() - t0
        f.flush()
        os.fsync(f.fileno())
    t_sync = time.time() - t0
    path.unlink()
    return t_buffered, t_sync


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("read_bytes", "write_bytes", "rchar", "wchar"):
                out[k] = int(v)
    return out


LAZY_READ = """
import sys, time, torch
from moeprune.models import load_layerwise_model
from moeprune.observe.lazy import lazy_layers
t0 = time.time()
lazy = lazy_layers(load_layerwise_model(sys.argv[1], dtype=torch.bfloat16)[0])
for i in range(len(lazy.layers)):
    with lazy.held(i):
        pass
print(f"lazy read of every layer: {time.time() - t0:.1f} s")
"""


def run_moeprune(src: Path, out: Path, args, cmd: list[str] | None = None) -> dict:
    """``moeprune run`` (or ``cmd``) in a subprocess, polled every 0.2 s; peak RSS also from ``getrusage``
    (the maximum over this process's children so far: the run is the first child, the probe the second)."""
    sets = {"model": str(src), "dtype": "bfloat16", "method.name": args.method,
            "target.expert_sparsity": "0.5", "calibration.layerwise": "true", "apply.mode": "streaming",
            "calibration.num_samples": str(args.samples), "calibration.seq_len": str(args.seq_len),
            "calibration.batch_size": str(args.batch_size), "eval.perplexity": "null", "eval.kl": "false",
            "report": "false"}
    if cmd is None:
        cmd = [sys.executable, "-m", "moeprune.cli", "run", str(out), "--quiet"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: dict[str, int] = {}
    last: dict[str, int] = {}
    timeline: list[tuple[float, int, int]] = []
    phases: dict[str, float] = {}

    def poll():
        while proc.poll() is None:
            try:
                s = _status(proc.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                break
            last.update(s)
            for k, v in s.items():
                peak[k] = max(peak.get(k, 0), v)
            t = time.time() - t0
            if not timeline or t - timeline[-1][0] >= 5:
                timeline.append((round(t, 1), s.get("RssAnon", 0), s.get("RssFile", 0)))
            for name, pattern in (("plan", "plan.json"), ("apply", "*model*/*.safetensors")):
                if name not in phases and any(out.parent.glob(f".{out.name}*/{pattern}")):
                    phases[name] = round(t, 1)
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    log = proc.communicate()[0]
    wall = time.time() - t0
    th.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"moeprune run failed ({proc.returncode}):\n{log[-4000:]}")
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_getrusage": ru.ru_maxrss * 1024,
            "peak_rss_anon_polled": peak.get("RssAnon"), "peak_rss_file_polled": peak.get("RssFile"),
            "peak_rss_polled": peak.get("VmRSS"), "blocks_written_bytes": (ru.ru_oublock - before.ru_oublock) * 512,
            "io_read_bytes": last.get("read_bytes"), "io_write_bytes": last.get("write_bytes"),
            "io_rchar": last.get("rchar"), "io_wchar": last.get("wchar"), "phases_s": phases,
            "rss_timeline_s_anon_file": timeline, "log_tail": log[-1500:]}


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24: about 30 GB on disk)")
    ap.add_argument("--workdir", default="/tmp/moeprune_ltr")
    ap.add_argument("--method", default="frequency")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny dimensions, results not stored")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    args = ap.parse_args()
    dims = SMOKE if args.smoke else QWEN3_30B
    work = Path(args.workdir)
    src, out = work / "src", work / "run"
    shutil.rmtree(out, ignore_errors=True)
    res: dict = {"dims": dims, "layers": args.layers, "machine": {
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpus": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__}}
    need = int(args.layers * 1.25e9 * 1.6) if not args.smoke else 0  # checkpoint + pruned output
    if not (src / "config.json").is_file() and shutil.disk_usage(work.parent).free < need:
        sys.exit(f"about {need / 1e9:.0f} GB of free disk needed in {work.parent}; use fewer --layers")
    res["loadavg_start"] = os.getloadavg()
    try:
        t0 = time.time()
        if not (src / "config.json").is_file():
            print(f"writing the random checkpoint ({args.layers} layers) to {src}", flush=True)
            write_checkpoint(src, args.layers, dims)
        res["write_checkpoint_s"] = round(time.time() - t0, 1)
        res["checkpoint_bytes"] = folder_bytes(src)
        print(f"checkpoint: {res['checkpoint_bytes'] / 1e9:.2f} GB", flush=True)
        drop_cache(src)
        print("moeprune run (layer-wise calibration, streaming apply) ...", flush=True)
        res["run"] = run_moeprune(src, out, args)
        res["output_bytes"] = folder_bytes(out)
        res["output_files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        pruned = folder_bytes(out / "model")
        drop_cache(src)  # the loader alone, cold: every layer read + converted + released, no compute
        lazy = run_moeprune(src, out, args, [sys.executable, "-c", LAZY_READ, str(src)])
        res["lazy_read"] = {k: lazy[k] for k in ("wall_s", "peak_rss_polled", "peak_rss_anon_polled",
                                                 "peak_rss_file_polled", "io_read_bytes", "log_tail")}
        if not args.keep:  # the write probe needs the disk space of the pruned model
            shutil.rmtree(out)
        drop_cache(src)
        t_read, n = read_once(src)
        t_buf, t_sync = write_once(work / "write_probe", pruned)
        res["limit"] = {"read_s": round(t_read, 1), "read_bytes": n, "write_s": round(t_buf, 1),
                        "write_fsync_s": round(t_sync, 1), "total_s": round(t_read + t_buf, 1)}
        res["ratio_to_limit"] = round(res["run"]["wall_s"] / (t_read + t_buf), 2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    r = res["run"]
    print(json.dumps({k: v for k, v in res.items() if k != "run"}, indent=1))
    print(f"peak RSS {r['peak_rss_getrusage'] / 2**30:.2f} GiB (anon {r['peak_rss_anon_polled'] / 2**30:.2f}, "
          f"file-mapped {r['peak_rss_file_polled'] / 2**30:.2f}); written {r['io_write_bytes'] / 1e9:.2f} GB "
          f"(output {res['output_bytes'] / 1e9:.2f} GB); run {r['wall_s']} s vs limit {res['limit']['total_s']} s "
          f"(x{res['ratio_to_limit']}); {res['lazy_read']['log_tail'].strip()}")
    if not args.smoke:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
