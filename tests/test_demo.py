"""``moeprune demo``: the packaged trained toy MoE, and the sweep's numbers against direct evaluation."""
from __future__ import annotations

import functools
import inspect
import json
import math
import os

import pytest
import torch

import moeprune.apply.experts as experts_mod
import moeprune.methods.target as target_mod
from moeprune.apply import apply_plan
from moeprune.demo import DemoConfig, heldout_batches, reference, run_demo, score_model
from moeprune.evaluate.kl import kl_divergence
from moeprune.evaluate.perplexity import perplexity
from moeprune.models import load_model
from moeprune.plan import PruningPlan

TEXTS = {"target": inspect.getsource(target_mod), "experts": inspect.getsource(experts_mod)}
CFG = DemoConfig(model="tiny:qwen3_moe", methods=("frequency", "reap"), sparsities=(0.25, 0.5),
                 random_seeds=(0,), calib_samples=4, seq_len=32, eval_tokens_per_domain=96, batch_size=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy shared CPU extra threads only wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def _base(spec: str, dtype: torch.dtype):
    return load_model(spec, dtype=dtype)[0]


def _direct(model, tok, cfg: DemoConfig) -> tuple[float, float]:
    """Pooled perplexity (per-domain ``perplexity`` NLL sums) and KL by ``kl_divergence`` of ``model``
    against a freshly loaded unpruned model: the oracle for the demo's cached-reference scoring."""
    base = _base(cfg.model, model.dtype)
    nll, n = 0.0, 0
    for text in TEXTS.values():
        r = perplexity(model, tok, text, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens_per_domain,
                       batch_size=cfg.batch_size, progress=False)
        nll, n = nll + r["nll_sum"], n + r["tokens"]
    batches, _ = heldout_batches(tok, TEXTS, cfg.eval_tokens_per_domain, cfg.seq_len, cfg.batch_size)
    kl = kl_divergence(base, batches, candidate=model, progress=False)["kl"]
    return math.exp(nll / n), kl


def test_demo_rows_equal_direct_evaluation(tmp_path):
    res = run_demo(tmp_path, CFG, calib_texts=list(TEXTS.values()), heldout=TEXTS, progress=False)
    rows = res["rows"]
    assert [r["method"] for r in rows].count("random") == 2 and len(rows) == 1 + 2 * 3
    model, tok = load_model(CFG.model)
    with open(res["report"]) as f:
        report = f.read()
    H, inter = model.config.hidden_size, model.config.moe_intermediate_size
    for r in rows[1:]:
        tag = r["method"] + ("" if r["seed"] is None else str(r["seed"]))
        plan = PruningPlan.load(os.path.join(tmp_path, "plans", f"{tag}_{round(100 * r['sparsity'])}.json"))
        pruned = apply_plan(load_model(CFG.model)[0], plan)
        ppl, kl = _direct(pruned, tok, CFG)
        # same float32 ops on the same logits, summed in another order: 1e-6 relative
        assert r["ppl"] == pytest.approx(ppl, rel=1e-6) and r["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-9)
        removed = sum(lp.num_experts - len(lp.keep) for lp in plan.layers.values())
        assert removed == sum(int(r["sparsity"] * lp.num_experts) for lp in plan.layers.values())
        # per removed expert: gate_up [2I, H] + down [H, I] + one router row [H], float32
        assert r["bytes_saved"] == removed * (3 * inter * H + H) * 4
        if r["method"] != "random":
            assert f"| {r['method']} | {r['sparsity']:.0%} | {r['ppl']:.2f} |" in report
    base_ppl, _ = _direct(model, tok, CFG)
    assert rows[0]["ppl"] == pytest.approx(base_ppl, rel=1e-6) and rows[0]["kl"] == pytest.approx(0, abs=1e-6)
    for png in ("sweep.png", "retention.png"):
        assert os.path.getsize(os.path.join(tmp_path, "report", png)) > 10_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_score_model_matches_evaluators(dtype):
    """The cached-reference scorer equals ``perplexity`` + ``kl_divergence`` in float32 and bfloat16."""
    cfg = DemoConfig(model="tiny:qwen3_moe", seq_len=32, eval_tokens_per_domain=80, batch_size=2)
    model, tok = load_model(cfg.model, dtype=dtype)
    ref = reference(model, *heldout_batches(tok, TEXTS, 80, 32, 2))
    plan = PruningPlan.from_keep({li: [0, 2, 5, 7] for li in (1, 2)}, 8)
    pruned = apply_plan(load_model(cfg.model, dtype=dtype)[0], plan)
    got = score_model(pruned, ref)
    ppl, kl = _direct(pruned, tok, cfg)
    # logits are computed once per model in both paths; only float64 summation order differs
    assert got["ppl"] == pytest.approx(ppl, rel=1e-6) and got["kl"] == pytest.approx(kl, rel=1e-5)
    assert got["ppl_by_domain"].keys() == TEXTS.keys()


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sparsity 1.0 must be in"):
        DemoConfig(sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="eval_tokens_per_domain=10 must be >= seq_len"):
        DemoConfig(eval_tokens_per_domain=10)


def test_packaged_toy_moe_has_recorded_test_perplexity():
    """``builtin:toy-moe`` loads, and its bf16 weights score the perplexity its model card records."""
    from moeprune.builtin_text import toy_moe_dir, toy_moe_texts

    with open(os.path.join(toy_moe_dir(), "toy_moe.json")) as f:
        rec = json.load(f)
    model, tok = load_model("builtin:toy-moe")
    assert model.config.num_experts == 16 and tok.vocab_size == 4096
    texts = toy_moe_texts("heldout")
    assert set(texts) == set(rec["test_ppl_bf16"]) and set(toy_moe_texts("calib")) == set(texts)

    def ppl(d: str, n: int) -> float:
        got = perplexity(model, tok, texts[d], seq_len=rec["seq_len"], max_tokens=n, batch_size=8, progress=False)
        assert got["tokens"] == n // rec["seq_len"] * (rec["seq_len"] - 1)
        return got["ppl"]

    for d, want in rec["quick_ppl_bf16"].items():
        # same weights and tokens, another CPU's BLAS: float32 logits agree to ~1e-5 relative
        assert ppl(d, rec["quick_tokens_per_domain"]) == pytest.approx(want, rel=1e-3), d
    # one domain on the whole protocol of the training run (train.py: first 16384 test tokens): the card's
    # test perplexity came from the float32 weights; bf16 rounding moves it by well under 2 %
    assert ppl("kjv", rec["test_tokens_per_domain"]) == pytest.approx(rec["test_ppl_fp32"]["kjv"], rel=0.02)
