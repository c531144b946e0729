"""Calibration data: local formats, chat/pairs, packing and padding, errors, k-means representatives."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from moeprune.observe import (
    build_batches,
    load_calibration,
    load_texts,
    select_representatives,
)

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    """A 256-token byte-level tokenizer (no hub): ids fit the tiny models' vocabulary."""
    from moeprune.models import byte_tokenizer

    return byte_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_formats_and_row_kinds(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n\n\nthird")
    texts, kind = load_texts(str(tmp_path / "a.txt"))
    assert kind == "text" and texts == ["first paragraph\nstill first", "second one", "third"]

    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    texts, kind = load_texts(_jsonl(tmp_path / "c.jsonl", chat))
    assert kind == "chat" and texts == ["user: hi\n\nassistant: yo"]
    templated = tok.__class__(tokenizer_object=tok.backend_tokenizer)
    templated.chat_template = TEMPLATE
    texts, _ = load_texts(str(tmp_path / "c.jsonl"), tokenizer=templated)
    assert texts == ["<|user|>hi\n<|assistant|>yo\n"]

    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "2+2?", "response": "4"}, {"prompt": "", "response": ""}]))
    texts, kind = load_texts(str(tmp_path / "p.json"))
    assert kind == "pair" and texts[0] == "user: 2+2?\n\nassistant: 4" and len(texts) == 2

    pd.DataFrame({"body2": ["alpha beta", "", "gamma"], "id": [1, 2, 3]}).to_parquet(tmp_path / "d.parquet")
    texts, kind = load_texts(str(tmp_path / "d.parquet"), text_column="body2")
    assert kind == "column" and texts == ["alpha beta", "gamma"]
    with pytest.raises(ValueError, match=r"text_column='nope' is not a column; columns: \['body2', 'id'\]"):
        load_texts(str(tmp_path / "d.parquet"), text_column="nope")
    with pytest.raises(ValueError, match="cannot find text in columns"):
        load_texts(str(tmp_path / "d.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="share one supported type"):
        load_texts(str(tmp_path))  # txt + jsonl + json + parquet mixed


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Offline only cached hub datasets load"):
        load_texts("someone/not-cached-dataset")


def test_packing_is_a_seeded_token_stream(tok):
    texts = [f"text number {i} " * (i + 1) for i in range(6)]
    batches = build_batches(texts, tok, num_samples=3, seq_len=8, batch_size=2, seed=5)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (1, 8)]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    order = list(range(6))
    random.Random(5).shuffle(order)
    stream = [t for i in order for t in tok(texts[i])["input_ids"] + [tok.eos_token_id]]
    assert torch.cat([b["input_ids"] for b in batches]).reshape(-1).tolist() == stream[:24]
    with pytest.raises(ValueError, match=r"has \d+ tokens but num_samples=50 x seq_len=64"):
        build_batches(texts, tok, num_samples=50, seq_len=64)
    with pytest.raises(ValueError, match="seq_len=0 must be >= 1"):
        build_batches(texts, tok, num_samples=1, seq_len=0)


def test_unpacked_samples_are_truncated_and_padded(tok):
    texts = ["a", "bbbbbb", "cccccccccccc", "dd"]
    batches = build_batches(texts, tok, num_samples=3, seq_len=10, batch_size=3, packing=False, seed=1)
    (b,) = batches
    lengths = b["attention_mask"].sum(1).tolist()
    order = list(range(4))
    random.Random(1).shuffle(order)
    picked = [texts[i] for i in order[:3]]
    assert lengths == [min(len(t), 10) for t in picked]
    assert b["input_ids"].shape[1] == max(lengths)
    assert bool((b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all())
    with pytest.raises(ValueError, match="4 texts < num_samples=5"):
        build_batches(texts, tok, num_samples=5, seq_len=4, packing=False)


def test_calibration_meta_and_calibrate(tmp_path, tok, tiny_cache):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": f"sample {i} about experts and routers"} for i in range(20)])
    cal = load_calibration(path, tok, num_samples=4, seq_len=16, batch_size=2, seed=3)
    assert cal.meta["num_tokens"] == 64 and cal.meta["format"] == "text" and len(cal.batches) == 2
    assert load_calibration(path, tok, num_samples=4, seq_len=16, seed=3).meta["hash"] == cal.meta["hash"]
    assert load_calibration(path, tok, num_samples=4, seq_len=16, seed=4).meta["hash"] != cal.meta["hash"]
    from moeprune.observe import calibrate
    from moeprune.recipe import CalibrationConfig

    cfg = CalibrationConfig(dataset=str(path), num_samples=4, seq_len=16, batch_size=2, seed=3)
    stats = calibrate(tiny_cache("qwen3_moe"), tok, cfg, ("routed",), progress=False)
    assert stats.meta["data"]["hash"] == cal.meta["hash"] and stats.meta["num_tokens"] == 64
    assert float(stats[1]["count"].sum()) == 64 * 2


def test_select_representatives_picks_one_per_topic(tok):
    topics = [["apple banana cherry fruit"] * 3, ["car truck engine road"] * 3, ["sun moon star sky"] * 3]
    texts = []
    for t, group in enumerate(topics):
        texts += [f"{s} {w}" for s, w in zip(group, ["one", "two", "three"])]
    topic = [i // 3 for i in range(len(texts))]
    for tokenizer in (None, tok):
        groups = select_representatives(texts, 3, seed=0, tokenizer=tokenizer)
        assert len(groups) == 3 and all(len(g) == 1 for g in groups)
        assert sorted(topic[g[0]] for g in groups) == [0, 1, 2]
        assert select_representatives(texts, 3, seed=0, tokenizer=tokenizer) == groups
    pairs = select_representatives(texts, 3, n_per_cluster=2, seed=0)
    assert all(len(g) == 2 and topic[g[0]] == topic[g[1]] for g in pairs)
    with pytest.raises(ValueError, match="cannot form k=20 clusters"):
        select_representatives(texts, 20)
