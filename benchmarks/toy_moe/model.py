"""Toy Qwen3-MoE: config, loading, and the padding-free perplexity used by every toy-MoE benchmark."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.toy_moe.corpus import EOT, toy_dir

SEQ_LEN = 256


def toy_config(vocab_size: int, eot_id: int, hidden: int = 128, layers: int = 4, heads: int = 4,
               experts: int = 16, top_k: int = 2, expert_ffn: int = 256, seq_len: int = SEQ_LEN):
    """Qwen3MoeConfig of the recipe (7.09 M params, 1.58 M active per token at the defaults).

    transformers' own aux loss is off (coef 0): it pools router statistics over all layers, which leaves
    single layers free to keep dead experts; train.py adds a per-layer Switch loss instead."""
    from transformers import Qwen3MoeConfig

    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=hidden // heads, num_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=expert_ffn, intermediate_size=2 * expert_ffn, norm_topk_prob=True,
        decoder_sparse_step=1, max_position_embeddings=seq_len, tie_word_embeddings=True,
        router_aux_loss_coef=0.0, output_router_logits=False, rms_norm_eps=1e-6, initializer_range=0.02,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
    )


def wrap_tokenizer(tokenizer_object):
    """A ``PreTrainedTokenizerFast`` around a trained ``tokenizers.Tokenizer`` (EOT = bos = eos = pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT, unk_token=None)


def model_dir(root: str | os.PathLike | None = None) -> Path:
    return toy_dir(root) / "model"


def load_toy_model(root: str | os.PathLike | None = None, experts_implementation: str = "eager"):
    """(model in eval mode, tokenizer) from ``root/model``; eager experts are the fastest on CPU."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = model_dir(root)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy model in {path}; train it with: python -m benchmarks.toy_moe.train "
                                f"(MOEPRUNE_TOY_DIR={toy_dir(root)})")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 experts_implementation=experts_implementation)
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(path)


def pack_windows(ids: list[int] | torch.Tensor, seq_len: int = SEQ_LEN,
                 max_tokens: int | None = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows (the last one may be shorter); nothing is padded."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window needs a context and a target)")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    wins = list(ids.split(seq_len))
    return [w for w in wins if w.numel() >= 2]


@torch.inference_mode()
def windows_nll(model, windows: list[torch.Tensor], batch_size: int = 16) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens); float64 accumulation."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        full = [w for w in windows if w.numel() == windows[0].numel()] if windows else []
        rest = [w for w in windows if w.numel() != windows[0].numel()]
        batches = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
        batches += [w[None] for w in rest]
        dev = next(model.parameters()).device
        for x in batches:  # x: [B, L]
            x = x.to(dev)
            logits = model(input_ids=x).logits  # [B, L, V]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            total += float(nll.double())
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return total, count


def domain_perplexity(model, tokenizer, text: str, seq_len: int = SEQ_LEN, max_tokens: int | None = None,
                      batch_size: int = 16) -> float:
    """exp(mean next-token NLL) of ``text`` cut into packed ``seq_len`` windows (first ``max_tokens``)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = pack_windows(ids, seq_len, max_tokens)
    if not windows:
        raise ValueError(f"text gives {len(ids)} tokens; perplexity needs at least 2")
    total, count = windows_nll(model, windows, batch_size)
    return math.exp(total / count)
