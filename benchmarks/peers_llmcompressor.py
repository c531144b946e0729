"""llm-compressor's REAPPruningModifier on a checkpoint and saved calibration windows (run inside the peers
venv by ``bench_peers.py``; imports nothing from moeprune).

    python peers_llmcompressor.py MODEL_DIR CALIB.safetensors SPARSITY OUT_DIR [PIPELINE]

``PIPELINE``: llm-compressor's calibration pipeline, ``sequential`` (default: REAP prunes each layer at the
end of its sequential epoch) or ``basic`` (one full-model pass; every layer pruned at the end).

Writes ``OUT_DIR/retained.json`` (llm-compressor's own report: MoE block name -> retained expert ids, in
its new order), ``OUT_DIR/model`` (the pruned checkpoint, as llm-compressor saves it) and
``OUT_DIR/run.json`` (versions, seconds of the ``oneshot`` call, peak RSS of this process).
"""
from __future__ import annotations

import json
import os
import sys
import time


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM; ``ru_maxrss`` would include the launching parent's,
    which Linux carries across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main() -> None:
    model_dir, calib, sparsity, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    pipeline = sys.argv[5] if len(sys.argv) > 5 else "sequential"
    threads = int(os.environ.get("PEERS_THREADS", "1"))
    import torch

    torch.set_num_threads(threads)
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(calib)["input_ids"]  # [N, S]: the windows moeprune calibrates on
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "retained.json")
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=REAPPruningModifier(sparsity=sparsity, report_path=report),
            num_calibration_samples=int(ids.shape[0]), max_seq_length=int(ids.shape[1]),
            shuffle_calibration_samples=False, pipeline=pipeline, moe_calibrate_all_experts=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                   "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "threads": threads, "pipeline": pipeline, "samples": int(ids.shape[0]),
                   "seq_len": int(ids.shape[1])}, f, indent=1)


if __name__ == "__main__":
    main()
