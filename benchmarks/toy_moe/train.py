"""Train the toy MoE (byte-level BPE tokenizer + Qwen3-MoE) on the 5-domain corpus, on CPU, from scratch.

Recipe (shared/reference/toy-moe): 4 layers, hidden 128, 16 experts top-2, expert FFN 256, vocab 4096;
AdamW lr 3e-3 (betas 0.9/0.95, wd 0.1 on matrices only), 5 % warm-up then cosine to 10 %, clip 1.0,
batch 16 x 256 tokens, 900 steps; each batch row is a random 256-token window of a uniformly drawn
domain; per-layer Switch load-balancing loss x 0.01. Writes a standard HF folder to
``$MOEPRUNE_TOY_DIR/model`` (skipped if present, unless --force) and logs test perplexity per domain.

    nohup python -m benchmarks.toy_moe.train > $MOEPRUNE_TOY_DIR/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.toy_moe.corpus import EOT, build_corpus, load_splits, split_documents, toy_dir
from benchmarks.toy_moe.model import (
    SEQ_LEN,
    domain_perplexity,
    model_dir,
    pack_windows,
    toy_config,
    windows_nll,
    wrap_tokenizer,
)

log = logging.getLogger("toy_moe.train")


def train_tokenizer(train_texts: dict[str, str], vocab_size: int = 4096, sample_chars: int = 2_000_000):
    """Byte-level BPE on a domain-balanced sample (first ``sample_chars`` of each train split's documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        for text in train_texts.values():
            n = 0
            for doc in split_documents(text):
                yield doc
                n += len(doc)
                if n >= sample_chars:
                    break

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample(), trainer)
    return tok


def encode(tok, text: str) -> torch.Tensor:
    """Token ids of a split: each document's ids followed by the EOT id (same as encoding the EOT-joined
    text, since special tokens are split off before BPE), encoded in parallel."""
    eot = tok.token_to_id(EOT)
    docs = split_documents(text)
    ids = [i for k, enc in enumerate(tok.encode_batch(docs)) for i in enc.ids + ([eot] if k < len(docs) - 1 else [])]
    return torch.tensor(ids, dtype=torch.long)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e computed per layer, then averaged (1.0 = balanced).

    router_logits: one [tokens, E] tensor per MoE layer. f_e = share of top-k slots routed to e (no
    gradient), P_e = mean router probability of e."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        n_exp = probs.shape[-1]
        sel = probs.topk(top_k, dim=-1).indices  # [T, k]
        frac = torch.bincount(sel.flatten(), minlength=n_exp).float() / sel.numel()  # [E]
        losses.append(n_exp * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, peak: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from ``peak`` to ``floor * peak``."""
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, attention, experts, routers) only, not on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)


def train(a: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    root, out = toy_dir(a.dir), model_dir(a.dir)
    if (out / "config.json").exists() and not a.force:
        log.info("model exists in %s; nothing to do (use --force to retrain)", out)
        return
    t_start = time.time()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    build_corpus(root, fetch=a.fetch)
    splits = load_splits(root)
    domains = list(splits)
    t0 = time.time()
    tok = train_tokenizer({d: s["train"] for d, s in splits.items()}, a.vocab_size)
    log.info("tokenizer: vocab %d trained in %.1fs", tok.get_vocab_size(), time.time() - t0)
    train_ids = {d: encode(tok, s["train"]) for d, s in splits.items()}
    curve = {d: pack_windows(encode(tok, s["calib"]), a.seq_len, a.curve_windows * a.seq_len)
             for d, s in splits.items()}
    log.info("train tokens: %s", {d: f"{v.numel() / 1e6:.2f}M" for d, v in train_ids.items()})

    cfg = toy_config(tok.get_vocab_size(), tok.token_to_id(EOT), a.hidden, a.layers, a.heads, a.experts,
                     a.top_k, a.expert_ffn, a.seq_len)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager", attn_implementation="sdpa")
    n_par = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    log.info("qwen3_moe params %.2fM (experts %.2fM, active/token ~%.2fM)", n_par / 1e6, n_exp / 1e6,
             (n_par - n_exp + n_exp * a.top_k / a.experts) / 1e6)
    opt = make_optimizer(model, a.lr, a.wd)

    def batch() -> torch.Tensor:  # [batch, seq_len]
        rows = []
        for di in rng.integers(0, len(domains), size=a.batch):
            ids = train_ids[domains[di]]
            off = int(rng.integers(0, ids.numel() - a.seq_len))
            rows.append(ids[off:off + a.seq_len])
        return torch.stack(rows)

    history, tokens, train_s = [], 0, 0.0
    model.train()
    for step in tqdm(range(a.steps + 1), desc="train", disable=None):
        if step % a.eval_every == 0 or step == a.steps:
            ppl = {d: math.exp(np.divide(*windows_nll(model, w))) for d, w in curve.items()}
            macro = math.exp(np.mean([math.log(p) for p in ppl.values()]))
            history.append({"step": step, "tokens": tokens, "train_s": round(train_s, 1), "calib_ppl": ppl})
            log.info("step %4d tok %.2fM train %.0fs calib ppl %.2f | %s", step, tokens / 1e6, train_s, macro,
                     " ".join(f"{d}:{p:.1f}" for d, p in ppl.items()))
        if step == a.steps:
            break
        ts = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr)
        x = batch()
        res = model(input_ids=x, labels=x, output_router_logits=True)
        aux = per_layer_balance_loss(res.router_logits, a.top_k)
        (res.loss + a.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        train_s += time.time() - ts
        if step % 50 == 0:
            log.info("  step %4d loss %.3f balance %.3f lr %.2e %.0f tok/s", step, res.loss.item(), aux.item(),
                     lr_at(step, a.steps, a.lr), tokens / train_s)
    log.info("trained %.2fM tokens in %.0fs (%.0f tok/s)", tokens / 1e6, train_s, tokens / train_s)

    hf_tok = wrap_tokenizer(tok)
    test_ppl = {d: domain_perplexity(model, hf_tok, s["test"], a.seq_len, a.test_tokens) for d, s in splits.items()}
    macro = math.exp(np.mean([math.log(p) for p in test_ppl.values()]))
    log.info("TEST ppl (first %d tokens per domain): macro %.2f | %s", a.test_tokens, macro,
             " ".join(f"{d}:{p:.2f}" for d, p in test_ppl.items()))
    wall = time.time() - t_start
    tmp = root / f"model.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    hf_tok.save_pretrained(tmp)
    record = {"args": {k: v for k, v in vars(a).items() if k != "dir"}, "params": n_par, "tokens": tokens,
              "train_seconds": train_s, "wall_seconds": wall, "history": history,
              "test_tokens_per_domain": a.test_tokens, "test_ppl": test_ppl, "test_ppl_macro": macro,
              "corpus_meta": json.loads((root / "corpus" / "meta.json").read_text())}
    (tmp / "train_log.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("saved %s (wall %.0fs)", out, wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="cache root (default $MOEPRUNE_TOY_DIR or ~/.cache/moeprune/toy-moe)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")
    p.add_argument("--fetch", action="store_true", help="let the corpus build download missing .deb/sdist")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is the robust choice on a shared 2-core box (2 threads ran 10x "
                        "slower than 1 when other jobs held the cores)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=256)
    p.add_argument("--aux-coef", type=float, default=0.01, help="per-layer Switch load-balancing loss weight")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--curve-windows", type=int, default=8, help="calib windows per domain for the curve")
    p.add_argument("--test-tokens", type=int, default=64 * SEQ_LEN, help="test tokens per domain for the final ppl")
    a = p.parse_args()
    for name in ("steps", "batch", "seq_len", "eval_every", "test_tokens", "threads"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    train(a)


if __name__ == "__main__":
    main()
