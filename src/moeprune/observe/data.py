"""Calibration data: text sources -> token batches, plus MoE Pathfinder's k-means sample selection.

Sources: a Hugging Face dataset name (works offline when it is cached), a local ``.txt``/``.md``/``.py`` (one
sample per blank-line separated paragraph) / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file or a folder
of them (searched recursively; parquet/csv read through ``datasets.load_dataset``), or a list of strings.
Row formats: a ``text_column``; chat ``messages`` lists (rendered with the tokenizer's chat template
when it has one); prompt/response pairs; else the first of ``text``/``content``/``document``.
``build_batches`` packs token streams into ``seq_len`` rows (default) or pads per sample with an
attention mask; ``load_calibration`` returns the batches and a description (source, hash, ...) that
``observe`` stores in ``ExpertStats.meta["data"]``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprune.recipe import CalibrationConfig

_CAL = {k: f.default for k, f in CalibrationConfig.model_fields.items()}  # the recipe's calibration defaults

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "output"), ("question", "answer"),
         ("query", "response"), ("input", "output"))
TEXT_COLUMNS = ("text", "content", "document", "body")
CHAT_COLUMNS = ("messages", "conversations", "conversation")


@dataclass
class Calibration:
    """Batches (dicts of ``input_ids`` / ``attention_mask`` ``[B, S]``) and their description."""

    batches: list[dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)


def _local_files(path: Path) -> tuple[str, list[str]]:
    """``(builder, files)`` of a file or a folder (searched recursively, hidden folders skipped)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS
                       and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no calibration files ({', '.join(sorted(BUILDERS))})")
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"calibration files must share one supported type ({', '.join(sorted(BUILDERS))}); "
                         f"got {sorted({p.suffix for p in files})}")
    return kinds.pop(), [str(p) for p in files]


def _read_utf8(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8 {path}`") from None


def _paragraphs(files: list[str]) -> list[dict]:
    """The one rule for plain-text files (calibration and perplexity alike): one row per blank-line
    separated paragraph (``"\n\n"``), empty ones dropped, so joining rows with ``"\n\n"`` gives the text back."""
    return [{"text": p} for f in files for p in _read_utf8(f).split("\n\n") if p]


def _json_rows(files: list[str]) -> list[dict]:
    rows: list = []
    for f in files:
        text = _read_utf8(f)
        if f.endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    rows.append(_parse_json(line, f"{f} line {n}"))
        else:
            data = _parse_json(text, f)
            if not isinstance(data, list):
                raise ValueError(f"{f}: expected a JSON list of strings or objects, got {type(data).__name__}")
            rows += data
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, (dict, str))), None)
    if bad is not None:
        raise ValueError(f"row {bad} of {files[0]}... is a {type(rows[bad]).__name__}; rows must be strings or objects")
    return [{"text": r} if isinstance(r, str) else r for r in rows]


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def load_rows(source: str, *, split: str = "train", name: str | None = None):
    """A ``datasets.Dataset`` from a hub name (cached) or local file(s) / a folder of them."""
    import datasets

    from moeprune.models import looks_like_local_path

    path = Path(source).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        if builder in ("text", "json"):
            rows = _paragraphs(files) if builder == "text" else _json_rows(files)
            if not rows:
                raise ValueError(f"{source} holds no text (empty file(s)); add text or choose another source")
            return datasets.Dataset.from_list(rows)
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as e:  # noqa: BLE001 (pyarrow / pandas parse errors of a damaged file)
            raise ValueError(f"could not read {source} as {builder} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if path.suffix in BUILDERS or looks_like_local_path(source):
        raise FileNotFoundError(f"calibration file {source} does not exist (current folder {os.getcwd()})")
    try:
        return datasets.load_dataset(source, name, split=split)
    except Exception as e:  # datasets raises many types (offline, missing config, bad split)
        raise ValueError(f"could not load dataset {source!r} (config={name!r}, split={split!r}): {e}. Offline only "
                         "cached hub datasets load; a local .txt/.jsonl/.json/.parquet file always works") from e


def _chat_text(messages: list, tokenizer) -> str:
    msgs = [{"role": m.get("role", m.get("from", "user")), "content": m.get("content", m.get("value", ""))}
            for m in messages]
    msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(m["role"], m["role"]), "content": m["content"]}
            for m in msgs]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def row_formatter(columns: Sequence[str], text_column: str | None = None,
                  tokenizer=None) -> tuple[Callable[[dict], str], str]:
    """``(row -> text, format name)`` for a dataset with ``columns``."""
    cols = list(columns)
    if text_column is not None:
        if text_column not in cols:
            raise ValueError(f"text_column={text_column!r} is not a column; columns: {cols}")
        return (lambda r: _chat_text(r[text_column], tokenizer) if isinstance(r[text_column], list)
                else str(r[text_column] or "")), "column"
    chat = next((c for c in CHAT_COLUMNS if c in cols), None)
    if chat:
        return (lambda r: _chat_text(r[chat] or [], tokenizer)), "chat"
    pair = next(((a, b) for a, b in PAIRS if a in cols and b in cols), None)
    if pair:
        a, b = pair
        return (lambda r: _chat_text([{"role": "user", "content": r[a] or ""},
                                      {"role": "assistant", "content": r[b] or ""}], tokenizer)), "pair"
    col = next((c for c in TEXT_COLUMNS if c in cols), None)
    if col:
        return (lambda r: str(r[col] or "").strip("\n")), "text"  # text files: paragraph separators
    raise ValueError(f"cannot find text in columns {cols}; pass text_column= (or use messages / prompt+response)")


def load_texts(source: str | Sequence[str], *, split: str = "train", name: str | None = None,
               text_column: str | None = None, tokenizer=None) -> tuple[list[str], str]:
    """Non-empty texts of ``source`` and the row format used (``list``/``column``/``chat``/``pair``/``text``)."""
    if not isinstance(source, str):
        texts = [str(t) for t in source if str(t).strip()]
        return texts, "list"
    ds = load_rows(source, split=split, name=name)
    fmt, kind = row_formatter(ds.column_names, text_column, tokenizer)
    texts = [t for t in (fmt(r) for r in ds) if t.strip()]
    if not texts:
        raise ValueError(f"{source} holds no non-empty text (format {kind!r}, columns {ds.column_names})")
    return texts, kind


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def build_batches(texts: Sequence[str], tokenizer, *, num_samples: int, seq_len: int, batch_size: int = 1,
                  packing: bool = True, seed: int = 42, add_special_tokens: bool = True) -> list[dict[str, torch.Tensor]]:
    """Token batches: ``packing`` concatenates seeded-shuffled texts (EOS-separated) and cuts
    ``num_samples`` full rows of ``seq_len``; otherwise ``num_samples`` seeded texts, each truncated to
    ``seq_len`` and right-padded per batch with ``attention_mask`` 0 on padding."""
    for k, v in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if int(v) < 1:
            raise ValueError(f"{k}={v} must be >= 1")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    if packing:
        need, ids = num_samples * seq_len, []
        eos = tokenizer.eos_token_id
        for s in range(0, len(order), 256):
            for seq in _encode(tokenizer, [texts[i] for i in order[s:s + 256]], add_special_tokens):
                ids.extend(seq + ([eos] if eos is not None else []))
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise ValueError(f"calibration text has {len(ids)} tokens but num_samples={num_samples} x seq_len="
                             f"{seq_len} = {need} are needed; add text or lower num_samples/seq_len")
        rows = torch.tensor(ids[:need], dtype=torch.long).view(num_samples, seq_len)
        return [{"input_ids": rows[s:s + batch_size], "attention_mask": torch.ones_like(rows[s:s + batch_size])}
                for s in range(0, num_samples, batch_size)]
    if len(texts) < num_samples:
        raise ValueError(f"packing=False needs one text per sample: {len(texts)} texts < num_samples={num_samples}; "
                         "add text, lower num_samples or use packing=True")
    seqs = [s[:seq_len] for s in _encode(tokenizer, [texts[i] for i in order[:num_samples]], add_special_tokens)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for s in range(0, num_samples, batch_size):
        group = seqs[s:s + batch_size]
        width = max(len(q) for q in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, q in enumerate(group):
            ids[r, :len(q)] = torch.tensor(q, dtype=torch.long)
            mask[r, :len(q)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def batches_hash(batches: Sequence[Any]) -> str:
    """Short sha256 of the samples' valid token ids in order (independent of batching and padding):
    identifies the calibration set in saved stats."""
    h = hashlib.sha256()
    for b in batches:
        ids = b if isinstance(b, torch.Tensor) else b.get("input_ids")
        if ids is None:  # embeddings given directly: hash their bytes
            h.update(b["inputs_embeds"].detach().float().cpu().contiguous().numpy().tobytes())
            continue
        ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.reshape(1, -1)
        mask = None if isinstance(b, torch.Tensor) else b.get("attention_mask")
        for r in range(ids.shape[0]):
            row = ids[r] if mask is None else ids[r][mask[r].bool()]
            h.update(row.to(torch.int64).contiguous().numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def load_calibration(source: str | Sequence[str], tokenizer, *, num_samples: int = _CAL["num_samples"],
                     seq_len: int = _CAL["seq_len"], batch_size: int = _CAL["batch_size"], split: str = "train",
                     name: str | None = None, text_column: str | None = None, packing: bool = True,
                     seed: int = _CAL["seed"]) -> Calibration:
    """Texts of ``source`` -> ``build_batches`` -> ``Calibration(batches, meta)``; defaults are the recipe's
    (``CalibrationConfig``), the one place they are defined."""
    texts, kind = load_texts(source, split=split, name=name, text_column=text_column, tokenizer=tokenizer)
    templated = kind in ("chat", "pair") and bool(getattr(tokenizer, "chat_template", None))
    batches = build_batches(texts, tokenizer, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size,
                            packing=packing, seed=seed, add_special_tokens=not templated)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    meta = {"source": source if isinstance(source, str) else f"<{len(texts)} texts>", "split": split,
            "config": name, "format": kind, "text_column": text_column, "num_samples": num_samples,
            "seq_len": seq_len, "batch_size": batch_size, "packing": packing, "seed": seed,
            "num_tokens": tokens, "hash": batches_hash(batches)}
    return Calibration(batches, meta)


def _features(texts: Sequence[str], dim: int, tokenizer=None) -> np.ndarray:
    """Hashed bag-of-words ``[N, dim]``: token id mod dim (or crc32 of lower-cased words), L2-normalised."""
    feats = np.zeros((len(texts), dim), dtype=np.float64)
    if tokenizer is not None:
        ids = _encode(tokenizer, list(texts), add_special_tokens=False)
    else:
        ids = [[zlib.crc32(w.encode()) for w in t.lower().split()] for t in texts]
    for r, seq in enumerate(ids):
        np.add.at(feats[r], np.asarray(seq, dtype=np.int64) % dim, 1.0)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.where(norms > 0, norms, 1.0)


def select_representatives(texts: Sequence[str], k: int, n_per_cluster: int = 1, seed: int = 42, *,
                           tokenizer=None, dim: int = 1024, max_candidates: int | None = None) -> list[list[int]]:
    """MoE Pathfinder's calibration selection: k-means (k-means++, seed) over hashed bag-of-words
    features and, per cluster, the ``n_per_cluster`` texts nearest to its centroid.

    Returns ``k`` lists of indices into ``texts`` (nearest first). Candidates are first capped to
    ``max_candidates`` (default ``4 * k * n_per_cluster``) by a seeded random subset, as in the paper's code."""
    from sklearn.cluster import KMeans

    if k < 1 or n_per_cluster < 1:
        raise ValueError(f"k={k} and n_per_cluster={n_per_cluster} must be >= 1")
    if len(texts) < k:
        raise ValueError(f"{len(texts)} texts cannot form k={k} clusters; lower k or add texts")
    cap = max_candidates or 4 * k * n_per_cluster
    cand = list(range(len(texts)))
    if len(cand) > cap:
        cand = sorted(random.Random(seed).sample(cand, cap))
    x = _features([texts[i] for i in cand], dim, tokenizer)
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=100, tol=1e-4, random_state=seed).fit(x)
    dist = km.transform(x)  # [N, k] distance to every centroid
    out = []
    for c in range(k):
        members = np.nonzero(km.labels_ == c)[0]
        members = members[np.argsort(dist[members, c], kind="stable")][:n_per_cluster]
        out.append([cand[i] for i in members])
    return out
