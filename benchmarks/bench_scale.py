"""Cost of observe on real-size MoE layers: random bf16 models with the per-layer dimensions of public MoEs.

Each model (a few decoder layers, every one a MoE layer, vocabulary cut to ``--vocab``: embeddings and head
are not per-layer and only the last position's logits are computed) runs in its own child process, so peak
RSS is per model. Per feature group (``routed`` alone, or ``routed`` + the group):

* time (a child process with the default allocator): observe vs a plain forward on the same batches, a
  warm-up run each, then interleaved repeats; the ratio of medians (wall time, and process CPU time: with 1
  torch thread the CPU time moves less with other load on a shared machine). The plain forward uses the
  experts implementation transformers picks (reported); observe runs that same implementation
  (``observe/native.py``). The first observe of the process (it runs the one-off bitwise check) is timed
  apart.
* peak RSS (a second child, glibc's mmap threshold pinned so freed buffers leave RSS) during the group's
  first run, and its increase over the resident model.
* statistics bytes per MoE layer: the accumulators' ``state_dict`` after ``n/2`` and ``n`` batches of
  ``S`` tokens and ``n/2`` batches of ``S/2`` tokens, fitted exactly as ``a + b * samples + c * tokens``.

Extrapolation to the model's real depth and a production calibration set (1,024 samples x 2,048 tokens,
one sample per batch): statistics from the fit; time per layer-token times layers x tokens (attention's
quadratic term ignored); the NAEE cache also at the product's ``recon_max_gb`` cap.

    python benchmarks/bench_scale.py --models qwen3_30b_a3b,mixtral_8x7b --layers 2 --batches 4 \\
        --tokens 256 --groups routed,direction,neurons,transitions,paths,cluster,reconstruction --threads 1

Results: ``benchmarks/results/scale.{json,md}`` (``--out``; ``--append`` merges a run into them). Duration: every
model and group (the default) does not fit 25 minutes on a shared 2-core machine (Qwen3-30B-A3B's layers
alone took 17 minutes under load 5-10; ``paths``, ``neurons`` and ``reconstruction`` dominate): run subsets
(``--groups routed`` over all models takes about 10 minutes) and merge them with ``--append``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from moeprune.observe.recon_cache import DEFAULT_MAX_GB
from moeprune.observe.runner import forward_kwargs, recon_observer, run_batches

transformers.logging.set_verbosity_error()
PAGE = os.sysconf("SC_PAGE_SIZE")
GROUPS = ("routed", "direction", "neurons", "transitions", "paths", "cluster", "reconstruction")
PROD_SAMPLES, PROD_TOKENS = 1024, 2048


@dataclass(frozen=True)
class Spec:
    """A public MoE's per-layer dimensions (from its released config.json) and its real depth."""

    family: str  # transformers config class name
    kw: dict
    layers: int  # real num_hidden_layers
    moe_layers: int  # real MoE layers (DeepSeek-V2-Lite: the first is dense)
    tokens: int  # default tokens per sample here (Mixtral: fewer, for the time budget)
    note: str = ""


def _attn(heads: int, kv: int, head_dim: int | None = None) -> dict:
    return {"num_attention_heads": heads, "num_key_value_heads": kv, **({"head_dim": head_dim} if head_dim else {})}


SPECS = {
    "qwen3_30b_a3b": Spec("Qwen3MoeConfig", dict(hidden_size=2048, **_attn(32, 4, 128), intermediate_size=6144,
                                                   moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                                   norm_topk_prob=True, mlp_only_layers=[]), 48, 48, 256),
    "mixtral_8x7b": Spec("MixtralConfig", dict(hidden_size=4096, **_attn(32, 8), intermediate_size=14336,
                                                 num_local_experts=8, num_experts_per_tok=2), 32, 32, 128,
                         "128 tokens per sample (time budget)"),
    "olmoe_1b_7b": Spec("OlmoeConfig", dict(hidden_size=2048, **_attn(16, 16), intermediate_size=1024,
                                              num_experts=64, num_experts_per_tok=8, norm_topk_prob=False), 16, 16, 256),
    "deepseek_v2_lite": Spec("DeepseekV2Config", dict(
        hidden_size=2048, **_attn(16, 16), kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy", n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, first_k_dense_replace=0), 27, 26, 256,
        "2 shared experts; the real first layer is dense (here every layer is MoE)"),
    "gpt_oss_20b": Spec("GptOssConfig", dict(hidden_size=2880, **_attn(64, 8, 64), intermediate_size=2880,
                                               num_local_experts=32, num_experts_per_tok=4, sliding_window=128),
                        24, 24, 256, "bf16 experts (the release stores MXFP4)"),
}


def config(name: str, layers: int, vocab: int):
    s = SPECS[name]
    kw = {**s.kw, "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 4096,
          "tie_word_embeddings": False}
    if s.family == "GptOssConfig":
        kw["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    return getattr(transformers, s.family)(**kw)


def real_param_bytes(name: str) -> tuple[int, int]:
    """(bytes of one decoder layer, bytes of the whole real-depth model without embeddings/head), bf16."""
    s = SPECS[name]
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(config(name, 2, 8))
    per = sum(p.numel() for n, p in m.named_parameters() if ".layers.1." in n) * 2
    return per, per * s.layers


def build(name: str, layers: int, vocab: int) -> torch.nn.Module:
    """Random init directly in bf16 (HF's own initialisers, seeded); every layer a MoE layer."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config(name, layers, vocab), dtype=torch.bfloat16).eval()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Peak RSS while inside, sampled every 2 ms by a thread (only around untimed runs)."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss())


def feats(group: str) -> tuple[str, ...]:
    return ("routed",) if group == "routed" else ("routed", group)


def state_bytes(obs, group: str) -> float:
    """Bytes per MoE layer of ``group``'s accumulator state (``state_dict``: totals, per-sample rows, per-batch
    partials, NAEE cache); transitions: its layer pairs' total over the MoE layers."""
    def nbytes(sd) -> int:
        return sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, torch.Tensor))
    if group == "transitions":
        return sum(nbytes(a.state_dict()) for a in obs.trans.values()) / len(obs.layers)
    return sum(nbytes(d[group].state_dict()) for d in obs.acc.values()) / len(obs.layers)


def fit(points: list[tuple[int, int, float]]) -> list[float]:
    """Exact ``bytes = a + b * samples + c * tokens`` through three (samples, tokens, bytes) points."""
    a = torch.tensor([[1.0, s, t] for s, t, _ in points], dtype=torch.float64)
    y = torch.tensor([b for _, _, b in points], dtype=torch.float64)
    return torch.linalg.solve(a, y).tolist()


def child(args) -> dict:
    """One model, one part: ``memory`` (peak RSS and state sizes, untimed; run with glibc's mmap threshold
    pinned so freed buffers leave RSS) or ``time`` (a warm-up run of each variant, then interleaved repeats;
    default allocator, as users run it)."""
    name, n, s = args.child, args.batches, args.tokens or SPECS[args.child].tokens
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build(name, args.layers, args.vocab)
    if args.impl:
        model.set_experts_implementation(args.impl)
    init_s, resident = time.perf_counter() - t0, rss()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, args.vocab, (1, s), generator=gen) for _ in range(n)]
    extra, groups = forward_kwargs(model), args.groups.split(",")
    ropts = {"seed": 0, "recon_tokens": args.recon_tokens, "recon_max_gb": args.recon_max_gb}

    def plain():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, **extra)

    def observed(g):
        def run():
            obs, bs = recon_observer(model, batches, feats(g), **ropts)
            run_batches(model, bs, obs, progress=False)
        return run

    runs = {"plain": plain, **{g: observed(g) for g in groups}}
    out = {"model": name, "impl": model.config._experts_implementation, "layers": args.layers, "batches": n,
           "tokens": s, "threads": torch.get_num_threads(), "init_s": init_s, "resident": resident}
    t0 = time.perf_counter()
    observed("routed")()  # the first observe in the process also runs the one-off bitwise check of the tap
    out["first_observe_s"] = time.perf_counter() - t0
    if args.part == "time":
        return {**out, **timed(runs, args.reps)}
    with PeakRss() as pm:
        plain()
    out["plain_peak"], out["groups"] = pm.peak, {}
    for g in groups:
        out["groups"][g] = memory_and_state(model, batches, g, ropts)
        print(f"{name}: {g} memory and state done", file=sys.stderr, flush=True)
    out["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def timed(runs: dict, reps: int) -> dict:
    """A warm-up run of each variant, then ``reps`` interleaved rounds: wall and process CPU seconds."""
    for fn in runs.values():
        fn()
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def memory_and_state(model, batches: list, g: str, ropts: dict) -> dict:
    """Peak RSS of one observe run with group ``g``, and its state bytes per layer after n/2 and n batches
    and after n/2 half-length batches (the three points of ``fit``)."""
    n, s = len(batches), batches[0].shape[1]
    obs, bs = recon_observer(model, batches, feats(g), **ropts)
    with PeakRss() as pm:
        run_batches(model, bs[: n // 2], obs, progress=False)
        p1 = state_bytes(obs, g)
        run_batches(model, bs[n // 2:], obs, progress=False, batch_offset=n // 2)
        p2 = state_bytes(obs, g)
    recon = obs.recon.meta() if g == "reconstruction" and obs.recon else None
    del obs, bs
    obs, bs = recon_observer(model, [b[:, : s // 2] for b in batches[: n // 2]], feats(g), **ropts)
    run_batches(model, bs, obs, progress=False)
    pts = [(n // 2, n // 2 * s, p1), (n, n * s, p2), (n // 2, n // 2 * (s // 2), state_bytes(obs, g))]
    return {"peak": pm.peak, "peak_increase": pm.peak - pm.base, "state_bytes": p2, "state_points": pts,
            "fit": fit(pts), "recon": recon}


def extrapolate(r: dict, recon_max_gb: float | None) -> dict:
    """Full depth and 1,024 x 2,048 tokens from the measured per-layer-token time and the state fits."""
    spec = SPECS[r["model"]]
    layer_bytes, model_bytes = real_param_bytes(r["model"])
    tok = r["layers"] * r["batches"] * r["tokens"]  # layer-tokens timed
    prod_tok = spec.layers * PROD_SAMPLES * PROD_TOKENS
    med = {k: statistics.median(v) for k, v in r["wall"].items()}
    e = {"layer_bytes": layer_bytes, "model_bytes": model_bytes, "plain_h": med["plain"] / tok * prod_tok / 3600,
         "groups": {}}
    for g, d in r["groups"].items():
        a, b, c = d["fit"]
        per_layer = max(0.0, a + b * PROD_SAMPLES + c * PROD_SAMPLES * PROD_TOKENS)
        row = {"state_per_layer": per_layer, "state_total": per_layer * spec.moe_layers,
               "observe_h": med[g] / tok * prod_tok / 3600,
               "grows_with": "tokens" if abs(c) * PROD_TOKENS > abs(b) else ("samples" if abs(b) > 1 else "-")}
        if g == "reconstruction" and recon_max_gb is not None:
            row["state_total_capped"] = min(row["state_total"], recon_max_gb * 1e9)
        e["groups"][g] = row
    return e


def with_ratios(r: dict) -> dict:
    """Each group's time ratios against the plain forward of ITS run (results of several runs can merge)."""
    mw, mc = (statistics.median(r[k]["plain"]) for k in ("wall", "cpu"))
    for g, d in r["groups"].items():
        if g in r["wall"] and "time_x_wall" not in d:
            d["time_x_wall"] = statistics.median(r["wall"][g]) / mw
            d["time_x_cpu"] = statistics.median(r["cpu"][g]) / mc
            d["plain_median_s"] = {"wall": mw, "cpu": mc}
    return r


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``--append``: a model measured again with the same layers / batches / tokens gains the new groups (and
    the new run's plain forward); otherwise the new result replaces the old one."""
    by = {r["model"]: r for r in old}
    same = ("layers", "batches", "tokens", "impl", "threads")
    for r in new:
        p = by.get(r["model"])
        if p is not None and all(p[k] == r[k] for k in same):
            p["groups"].update(r["groups"])
            p["extrapolated"]["groups"].update(r["extrapolated"]["groups"])
            for k in ("wall", "cpu"):  # raw repeats of the new run's variants (its plain forward included)
                p[k].update(r[k])
            p["first_observe_s"] = r["first_observe_s"]
            p["plain_peak"], p["resident"] = r["plain_peak"], r["resident"]
            p["extrapolated"]["plain_h"] = r["extrapolated"]["plain_h"]
            p["seconds"] = p.get("seconds", 0) + r["seconds"]
        else:
            by[r["model"]] = r
    return list(by.values())


def fmt_bytes(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n:.0f} B"


def markdown(results: list[dict], args) -> str:
    lines = [("| model | impl | group | time x (wall) | time x (CPU) | peak RSS | peak + over model | stats / layer "
              "(run) | stats / layer (1024x2048) | grows with | stats full depth | observe h, full (1 thread) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e = r["extrapolated"]
        mw = statistics.median(r["wall"]["plain"])
        lines.append(f"| {r['model']} | {r['impl']} | plain forward ({r['layers']} layers, {r['batches']} x "
                     f"{r['tokens']} tokens: {mw:.2f} s) | 1 | 1 | {fmt_bytes(r['plain_peak'])} | "
                     f"{fmt_bytes(r['plain_peak'] - r['resident'])} | | | | | {e['plain_h']:.3g} |")
        for g, d in r["groups"].items():
            x = e["groups"][g]
            full = fmt_bytes(x["state_total"])
            if "state_total_capped" in x:
                full += f" (cap {fmt_bytes(x['state_total_capped'])})"
            lines.append(f"| | | {g} | {d['time_x_wall']:.3f} | {d['time_x_cpu']:.3f} | {fmt_bytes(d['peak'])} | "
                         f"{fmt_bytes(d['peak'] - r['resident'])} | {fmt_bytes(d['state_bytes'])} | "
                         f"{fmt_bytes(x['state_per_layer'])} | {x['grows_with']} | {full} | {x['observe_h']:.3g} |")
    note = ("\nTime x: median of the repeats over the median plain forward of the SAME run (``--append`` merges runs: "
            "each group keeps its own baseline, ``plain_median_s`` in the json); the plain rows show the latest run.\n")
    return "\n".join(lines) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SPECS), help=f"comma list of {list(SPECS)}")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built (all MoE)")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of one sample (even, >= 2)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the model's, 256; "
                    "Mixtral 128)")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--impl", default=None, help="experts implementation (default: the one transformers picks)")
    ap.add_argument("--recon-tokens", type=int, default=None)
    ap.add_argument("--recon-max-gb", type=float, default=DEFAULT_MAX_GB)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale"))
    ap.add_argument("--append", action="store_true", help="merge into an existing --out (same model and sizes: "
                    "groups added; else replaced)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default="memory", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batches < 2 or args.batches % 2:
        ap.error(f"--batches {args.batches}: needs an even number >= 2 (state sizes at n/2 and n batches)")
    bad = [g for g in args.groups.split(",") if g not in GROUPS]
    if bad:
        ap.error(f"--groups: unknown {bad}; choose from {list(GROUPS)}")
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    mem_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

    def run_child(name: str, part: str, env: dict) -> dict:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", name, "--part", part], env=env,
                              check=False, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} ({part}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for name in args.models.split(","):
        if name not in SPECS:
            ap.error(f"--models: unknown {name!r}; choose from {list(SPECS)}")
        t0 = time.perf_counter()
        r = run_child(name, "memory", mem_env)
        r.update({k: v for k, v in run_child(name, "time", env).items() if k in ("wall", "cpu", "first_observe_s")})
        r["extrapolated"] = extrapolate(r, args.recon_max_gb)
        r["seconds"] = time.perf_counter() - t0
        print(markdown([with_ratios(r)], args), flush=True)
        save([r], args, append=args.append or name != args.models.split(",")[0])  # a later failure loses nothing


def save(results: list[dict], args, append: bool) -> None:
    """``--out``.json (raw; merged into the existing file when ``append``) and .md (the table)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"argv": [sys.argv[1:]], "torch": torch.__version__, "transformers": transformers.__version__,
            "prod": [PROD_SAMPLES, PROD_TOKENS], "notes": {k: s.note for k, s in SPECS.items() if s.note}}
    if append and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        prev = old["meta"]["argv"]
        prev = prev if prev and isinstance(prev[0], list) else [prev]
        meta["argv"] = prev + [a for a in meta["argv"] if a != prev[-1]]
        results = merge([with_ratios(r) for r in old["results"]], results)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, args))


if __name__ == "__main__":
    main()
