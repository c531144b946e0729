"""Perplexity on held-out text: the first number to look at after pruning.

Text (a string, a file, a list of texts) is tokenised into one stream, cut into windows of
``seq_len`` tokens that start every ``stride`` tokens, and each token is scored once: with
``stride < seq_len`` the first ``seq_len - stride`` tokens of a window are context only (the
sliding-window evaluation of the transformers docs). The first token of a window has no context in
it and is never scored, so with non-overlapping windows (``stride = seq_len``) every window scores
``len - 1`` tokens. NLL sums are accumulated in float64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.models import input_device

TextSource = str | os.PathLike | Sequence[str] | Sequence[int] | torch.Tensor


def read_texts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """Texts of a local file or folder, by the same rule as calibration data (``observe.data.load_texts``):
    ``.txt``/``.md``/``.py`` one text per blank-line separated paragraph (joined back with ``"\n\n"`` this is
    the file), ``.jsonl``/``.json`` the ``field`` of each row, parquet/csv columns."""
    from moeprune.observe.data import load_texts

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file {path!r} does not exist (current folder {os.getcwd()})")
    texts, _ = load_texts(path, text_column=field)
    return texts


def token_stream(
    source: TextSource,
    tokenizer=None,
    *,
    add_bos: bool = False,
    max_tokens: int | None = None,
    sep: str = "\n\n",
) -> torch.Tensor:
    """One ``[N]`` LongTensor of token ids from a text, a file path, a list of texts (joined with
    ``sep``) or ids. A ``str`` naming an existing file is read as that file."""
    if isinstance(source, torch.Tensor):
        ids = source.reshape(-1).long()
    elif isinstance(source, (list, tuple)) and source and all(isinstance(t, int) for t in source):
        ids = torch.tensor(source, dtype=torch.long)
    else:
        if isinstance(source, os.PathLike) or (
            isinstance(source, str) and len(source) < 4096 and os.path.exists(source)
        ):
            texts = read_texts(source)
        elif isinstance(source, str):
            texts = [source]
        elif isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
            texts = list(source)
        else:
            raise TypeError(
                f"cannot read text from {type(source).__name__}: pass a str, a path, a list of str "
                "or token ids"
            )
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate text; pass tokenizer=... (or token ids)")
        text = sep.join(texts)
        if not text:
            raise ValueError("the text to evaluate is empty")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if add_bos:
            if tokenizer.bos_token_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
            ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to compute perplexity, got {ids.numel()}")
    return ids


@dataclass(frozen=True)
class Window:
    """Tokens ``ids[begin:end]``; positions ``>= first_scored`` (window-relative) are scored."""

    begin: int
    end: int
    first_scored: int


def windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """Windows covering ``n_tokens`` so that every token but the first is scored exactly once when
    ``stride < seq_len`` (with ``stride == seq_len`` each window's first token is unscored)."""
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride={stride} must be in [1, seq_len={seq_len}]")
    out, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + seq_len, n_tokens)
        if end - begin < 2 and out:  # a 1-token tail window scores nothing
            break
        out.append(Window(begin, end, max(prev_end - begin, 1)))
        prev_end = end
        begin += stride
    return out


def iter_batches(
    ids: torch.Tensor, seq_len: int, stride: int | None = None, batch_size: int = 4, pad_id: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches: ``input_ids``/``attention_mask`` ``[B, L]`` and ``score_mask`` ``[B, L]``
    (True where the token is a scored target)."""
    ws = windows(ids.numel(), seq_len, stride)
    for i in range(0, len(ws), batch_size):
        chunk = ws[i : i + batch_size]
        L = max(w.end - w.begin for w in chunk)
        inp = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        att = torch.zeros(len(chunk), L, dtype=torch.long)
        score = torch.zeros(len(chunk), L, dtype=torch.bool)
        for b, w in enumerate(chunk):
            n = w.end - w.begin
            inp[b, :n] = ids[w.begin : w.end]
            att[b, :n] = 1
            score[b, w.first_scored : n] = True
        yield {"input_ids": inp, "attention_mask": att, "score_mask": score}


@torch.no_grad()
def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L]`` float32 NLL of each token given its prefix (position 0 gets 0): row by row so the
    float32 copy of the logits is ``[L, V]`` at most."""
    dev = input_device(model)
    inp, att = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    logits = model(input_ids=inp, attention_mask=att, use_cache=False).logits  # [B, L, V]
    out = torch.zeros(inp.shape, dtype=torch.float32, device=dev)
    for b in range(inp.shape[0]):
        out[b, 1:] = F.cross_entropy(logits[b, :-1].float(), inp[b, 1:], reduction="none")
    return out.cpu()


def perplexity(
    model: torch.nn.Module,
    tokenizer=None,
    source: TextSource | None = None,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    add_bos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``source`` (text, file, list of texts or token ids).

    Returns ``{"ppl", "nll" (mean per scored token), "nll_sum", "tokens" (scored), "windows",
    "seq_len", "stride"}``."""
    if source is None:
        raise ValueError("pass the held-out text as source=... (a string, a file path or a list of texts)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    ids = token_stream(source, tokenizer, add_bos=add_bos, max_tokens=max_tokens)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    n_win = len(windows(ids.numel(), seq_len, stride))
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    try:
        bar = tqdm(total=n_win, desc="perplexity", unit="win", disable=not progress)
        for batch in iter_batches(ids, seq_len, stride, batch_size, pad_id=pad or 0):
            nll = token_nll(model, batch)
            mask = batch["score_mask"]
            nll_sum += float(nll[mask].double().sum())
            count += int(mask.sum())
            bar.update(batch["input_ids"].shape[0])
        bar.close()
    finally:
        model.train(was_training)
    mean = nll_sum / max(count, 1)
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "nll_sum": nll_sum,
        "tokens": count,
        "windows": n_win,
        "seq_len": seq_len,
        "stride": seq_len if stride is None else stride,
    }
