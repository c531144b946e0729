"""Package the trained toy MoE into ``src/moeprune/data/toy-moe`` (``builtin:toy-moe``): bf16 weights,
tokenizer, a held-out and a calibration slice per domain, and a model card with the training record.

    python -m benchmarks.toy_moe.package [--model ~/.cache/moeprune/toy-moe/model]

The held-out slice is the start of each domain's test split, long enough for the ``test_tokens`` tokens
that ``train.py`` scored, so the card's test perplexity can be re-measured on the packaged files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch

from benchmarks.toy_moe.corpus import load_splits, toy_dir

DEST = Path(__file__).resolve().parents[2] / "src" / "moeprune" / "data" / "toy-moe"
CALIB_CHARS = 20_000
QUICK_TOKENS = 2048  # the unit test re-measures this prefix of every domain


def prefix_with_tokens(text: str, tok, n_tokens: int) -> str:
    """The shortest line-ended prefix of ``text`` whose first ``n_tokens`` tokens equal the full text's."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    full = enc["input_ids"][:n_tokens]
    end = enc["offset_mapping"][len(full) - 1][1]
    while True:
        end = text.find("\n", end)
        end = len(text) if end < 0 else end + 1
        if tok(text[:end], add_special_tokens=False)["input_ids"][:n_tokens] == full or end >= len(text):
            return text[:end]


def line_prefix(text: str, n_chars: int) -> str:
    end = text.find("\n", n_chars)
    return text if end < 0 else text[: end + 1]


def package(src: Path, dest: Path) -> dict:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from moeprune.evaluate.perplexity import perplexity

    log = json.loads((src / "train_log.json").read_text())
    n_tok, seq_len = log["test_tokens_per_domain"], log["args"]["seq_len"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager")
    tok = PreTrainedTokenizerFast.from_pretrained(src)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "text").mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(dest)
    tok.save_pretrained(dest)
    slice_ppl, quick_ppl = {}, {}
    bf16 = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32, experts_implementation="eager").eval()
    for d, s in load_splits(src.parent).items():
        held = prefix_with_tokens(s["test"], tok, n_tok)
        (dest / "text" / f"{d}.heldout.txt").write_text(held, encoding="utf-8")
        (dest / "text" / f"{d}.calib.txt").write_text(line_prefix(s["calib"], CALIB_CHARS), encoding="utf-8")
        slice_ppl[d] = perplexity(bf16, tok, held, seq_len=seq_len, max_tokens=n_tok, batch_size=16,
                                  progress=False)["ppl"]
        quick_ppl[d] = perplexity(bf16, tok, held, seq_len=seq_len, max_tokens=QUICK_TOKENS, batch_size=16,
                                  progress=False)["ppl"]
    macro = math.exp(sum(math.log(p) for p in slice_ppl.values()) / len(slice_ppl))
    record = {"steps": log["args"]["steps"], "seed": log["args"]["seed"], "params": log["params"],
              "train_tokens": log["tokens"], "train_seconds": round(log["train_seconds"]),
              "seq_len": seq_len, "test_tokens_per_domain": n_tok,
              "test_ppl_fp32": log["test_ppl"], "test_ppl_macro_fp32": log["test_ppl_macro"],
              "test_ppl_bf16": slice_ppl, "test_ppl_macro_bf16": macro,
              "quick_tokens_per_domain": QUICK_TOKENS, "quick_ppl_bf16": quick_ppl,
              "corpus": {d: {k: v["chars"] for k, v in m.items()} for d, m in log["corpus_meta"]["domains"].items()}}
    (dest / "toy_moe.json").write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="trained model folder (default $MOEPRUNE_TOY_DIR/model)")
    a = p.parse_args()
    torch.set_num_threads(1)
    src = Path(os.path.expanduser(a.model)) if a.model else toy_dir(None) / "model"
    rec = package(src, DEST)
    print(json.dumps({k: rec[k] for k in ("test_ppl_macro_fp32", "test_ppl_macro_bf16")}, indent=1))
    print(f"packaged into {DEST}; now write/update {DEST / 'README.md'} (model card)")


if __name__ == "__main__":
    main()
