"""evaluate/: perplexity and KL against hand computations; a real lm-eval run on the shipped task."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from moeprune.arch.tiny import tiny_model
from moeprune.evaluate import kl_divergence, perplexity, token_stream, windows
from moeprune.evaluate.perplexity import iter_batches
from moeprune.models import byte_tokenizer
from moeprune.plan import PruningPlan


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe")


def _ids(n, seed=0):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _manual_nll(model, ctx_and_target: list[tuple[torch.Tensor, int]]) -> float:
    """Sum of -log softmax(logits of the last context position)[target], float64, one forward each."""
    total = 0.0
    with torch.no_grad():
        for ctx, tgt in ctx_and_target:
            logits = model(input_ids=ctx[None]).logits[0, -1].double()
            total += -(logits - torch.logsumexp(logits, -1))[tgt].item()
    return total


def test_perplexity_matches_hand_computation_with_padding(model):
    ids = _ids(40)
    # windows [0,16) [16,32) [32,40): batch_size=3 puts all three in one right-padded batch
    res = perplexity(model, source=ids, seq_len=16, batch_size=3, progress=False)
    pairs = [(ids[b:t], int(ids[t])) for b, e in ((0, 16), (16, 32), (32, 40)) for t in range(b + 1, e)]
    ref = _manual_nll(model, pairs)
    assert res["tokens"] == len(pairs) == 37
    assert res["windows"] == 3
    assert res["nll_sum"] == pytest.approx(ref, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(ref / 37), rel=1e-5)
    # batching must not change the result (padding masked)
    res1 = perplexity(model, source=ids, seq_len=16, batch_size=1, progress=False)
    assert res1["nll_sum"] == pytest.approx(res["nll_sum"], rel=1e-5)


@pytest.mark.parametrize("stride", [1, 3])
def test_perplexity_sliding_window_context(model, stride):
    n, L = 20, 8
    ids = _ids(n, seed=stride)
    res = perplexity(model, source=ids, seq_len=L, stride=stride, batch_size=4, progress=False)
    pairs = []
    for i in range(1, n):  # token i is scored in the first window (begin = k*stride) that contains it
        begin = max(0, math.ceil((i - L + 1) / stride) * stride)
        pairs.append((ids[begin:i], int(ids[i])))
    assert res["tokens"] == n - 1
    assert res["nll_sum"] == pytest.approx(_manual_nll(model, pairs), rel=1e-5)


def test_windows_cover_each_token_once():
    for n, L, s in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (33, 8, 8)]:
        scored = []
        for w in windows(n, L, s):
            assert w.end - w.begin <= L
            scored += list(range(w.begin + w.first_scored, w.end))
        assert len(scored) == len(set(scored))
        if s < L:
            assert scored == list(range(1, n))


def test_text_sources_agree(model, tmp_path):
    tok = byte_tokenizer()
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]
    joined = "\n\n".join(texts)
    (tmp_path / "a.txt").write_text(joined)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ref = token_stream(joined, tok)
    assert ref.numel() == len(joined.encode())  # byte-level tokenizer: one token per byte
    for src in (texts, str(tmp_path / "a.txt"), tmp_path / "a.jsonl"):
        assert torch.equal(token_stream(src, tok), ref)
    r_text = perplexity(model, tok, joined, seq_len=32, progress=False)
    r_file = perplexity(model, tok, str(tmp_path / "a.txt"), seq_len=32, progress=False)
    assert r_text == r_file and r_text["tokens"] > 0


def test_perplexity_errors(model):
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, source=_ids(10), seq_len=1, progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, source=_ids(10), seq_len=4, stride=5, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, source="some text", progress=False)


def _batches():
    ids = _ids(60, seed=7)
    return list(iter_batches(ids, seq_len=16, batch_size=2))  # last batch right-padded


def test_kl_zero_for_identical_models(model):
    res = kl_divergence(model, _batches(), candidate=copy.deepcopy(model), progress=False)
    assert res["kl"] == 0.0 and res["kl_max"] == 0.0
    assert res["top1_agreement"] == 1.0
    assert res["tokens"] == 60


def test_kl_matches_hand_computation(model):
    other = tiny_model("qwen3_moe", seed=3)
    batches = _batches()
    res = kl_divergence(model, batches, candidate=other, progress=False)
    kl_sum, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            for row, mask in zip(b["input_ids"], b["attention_mask"]):
                x = row[mask.bool()][None]
                lp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
                lq = torch.log_softmax(other(input_ids=x).logits[0].double(), -1)
                kl_sum += float((lp.exp() * (lp - lq)).sum())
                agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                n += x.shape[1]
    assert res["tokens"] == n
    assert res["kl"] == pytest.approx(kl_sum / n, rel=1e-4)
    assert res["top1_agreement"] == pytest.approx(agree / n)
    assert res["kl"] > 0


def test_kl_under_masking_equals_pruned_model(model):
    from moeprune.apply import apply_plan, mask_experts

    plan = PruningPlan.from_keep({1: [0, 2, 3, 5], 2: [1, 4, 6, 7]}, 8)
    batches = _batches()
    masked = kl_divergence(model, batches, context=lambda: mask_experts(model, plan), progress=False)
    assert masked["kl"] > 1e-4 and masked["top1_agreement"] < 1.0
    pruned = apply_plan(copy.deepcopy(model), plan)
    sliced = kl_divergence(model, batches, candidate=pruned, progress=False)
    assert sliced["kl"] == pytest.approx(masked["kl"], rel=1e-3, abs=1e-6)
    # the context is exited after each batch: the reference model is unchanged afterwards
    again = kl_divergence(model, batches, candidate=copy.deepcopy(model), progress=False)
    assert again["kl"] == 0.0


def test_kl_errors(model):
    with pytest.raises(ValueError, match="nothing to compare"):
        kl_divergence(model, _batches(), progress=False)
    with pytest.raises(TypeError, match="factory"):
        kl_divergence(model, _batches(), context=torch.no_grad(), progress=False)


# ---------------------------------------------------------------- lm-eval (optional extra)
def _lm_eval_or_skip():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        reason = "lm-eval not installed (pip install 'moeprune[eval]'): skipping the real lm-eval run"
        print(reason)
        pytest.skip(reason)


def test_lm_eval_local_task_matches_hand_scoring(model):
    _lm_eval_or_skip()
    from moeprune.evaluate import run_lm_eval, shipped_task_dir

    tok = byte_tokenizer()
    res = run_lm_eval(model, tok, ["moeprune_tiny_mc"], batch_size=4)
    json.dumps(res)  # JSON-serialisable
    r = res["results"]["moeprune_tiny_mc"]
    # hand scoring: loglikelihood of " choice" after "Question: q\nAnswer:" (byte tokens: 1 per char)
    docs = [
        json.loads(line)
        for line in Path(shipped_task_dir(), "moeprune_tiny_mc.jsonl").read_text().splitlines()
    ]
    acc = acc_norm = 0
    hits = []
    with torch.no_grad():
        for d in docs:
            ctx = f"Question: {d['question']}\nAnswer:"
            lls, norms = [], []
            for c in d["choices"]:
                ids = torch.tensor(tok(ctx + " " + c, add_special_tokens=False)["input_ids"])
                n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
                ll = sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))
                lls.append(ll)
                norms.append(ll / len(" " + c))
            hits.append(int(max(range(len(lls)), key=lls.__getitem__) == d["label"]))
            acc += hits[-1]
            acc_norm += int(max(range(len(norms)), key=norms.__getitem__) == d["label"])
    assert res["n-samples"]["moeprune_tiny_mc"]["effective"] == len(docs) == 12
    assert r["acc,none"] == pytest.approx(acc / len(docs))
    assert r["acc_norm,none"] == pytest.approx(acc_norm / len(docs))
    mean = acc / len(docs)  # closed-form standard error of a mean (sample std / sqrt(n))
    se = math.sqrt(sum((h - mean) ** 2 for h in hits) / (len(hits) - 1) / len(hits))
    assert r["acc_stderr,none"] == pytest.approx(se)


def test_lm_eval_limit_and_unknown_task(model):
    _lm_eval_or_skip()
    from moeprune.evaluate import run_lm_eval

    res = run_lm_eval(model, byte_tokenizer(), "moeprune_tiny_mc", limit=5, batch_size=8)
    assert res["n-samples"]["moeprune_tiny_mc"]["effective"] == 5
    with pytest.raises(ValueError, match="not found"):
        run_lm_eval(model, byte_tokenizer(), ["no_such_task_xyz"], include_defaults=False)


def test_lm_eval_missing_names_the_extra(model, monkeypatch):
    import sys

    from moeprune.evaluate import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"moeprune\[eval\]"):
        run_lm_eval(model, byte_tokenizer(), ["moeprune_tiny_mc"])
