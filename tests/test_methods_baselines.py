"""random, EASY-EP and NAEE (enumeration equals a naive per-token brute force)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _stats_factory import make_stats

from moeprune.methods.baselines import EasyEP, Random
from moeprune.methods.naee import NAEE, keep_sets, n_keep_sets, reconstruction_loss_fn, route
from moeprune.methods.target import Target


def flat(E=16, L=3, top_k=2):
    return make_stats({li: {"count": [1.0] * E} for li in range(L)}, top_k=top_k)


def test_random_reproducible_and_seed_dependent():
    st, t = flat(), Target(expert_sparsity=0.5)
    a, b, c = Random(seed=3).plan(st, t), Random(seed=3).plan(st, t), Random(seed=4).plan(st, t)
    assert a.keep() == b.keep() and a.keep() != c.keep()
    assert a.kept_counts() == {0: 8, 1: 8, 2: 8}


def test_random_global_keeps_total_and_floors():
    st = flat()
    plan = Random(seed=0).plan(st, Target(expert_sparsity=0.75, allocation="global"))
    assert sum(plan.kept_counts().values()) == 12 and min(plan.kept_counts().values()) >= 2
    assert plan.meta["normalize"] == "none"
    plans = [Random(seed=s).plan(st, Target(expert_sparsity=0.75, allocation="global")) for s in range(5)]
    assert any(not p.is_uniform for p in plans)  # global random spreads unevenly across layers


def test_easyep_by_hand():
    st = make_stats({0: {"count": [1.0] * 4, "easyep_sum": [0.3, 0.1, 0.4, 0.2]}}, top_k=1)
    plan = EasyEP().plan(st, Target(expert_sparsity=0.5))
    assert plan.keep() == {0: [0, 2]} and plan.layers[0].scores == (0.3, 0.1, 0.4, 0.2)


# ---------------------------------------------------------------- router simulation
def test_easyep_groups_option_by_hand():
    # 8 experts in 4 groups of 2 (top 2 groups, top_k 2): the plain top-4 {0, 1, 2, 4} leaves groups of 2, 1, 1
    st = make_stats({0: {"count": [1.0] * 8, "easyep_sum": [9, 8, 7, 1, 6, 1.5, 0.5, 0.4]}}, top_k=2)
    st.meta["n_group"] = {"0": [4, 2]}
    assert EasyEP(groups="ignore").plan(st, Target(expert_sparsity=0.5)).keep() == {0: [0, 1, 2, 4]}
    assert EasyEP().plan(st, Target(expert_sparsity=0.5)).keep() == {0: [0, 1, 2, 3]}  # best two full groups (17, 8)
    with pytest.raises(ValueError, match="groups='bogus'"):
        EasyEP(groups="bogus")


def test_route_softmax_renormalised_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), math.log(4.0)]])  # probs 1:2:3:4
    keep = torch.tensor([True, True, True, False])
    w = route(logits, keep, 2, {"score": "softmax", "renormalize": True, "scale": 1.0})
    assert w[0].tolist() == pytest.approx([0, 2 / 5, 3 / 5, 0])
    w = route(logits, keep, 2, {"score": "softmax", "renormalize": False, "scale": 2.0})
    assert w[0].tolist() == pytest.approx([0, 2 * 2 / 6, 2 * 3 / 6, 0])  # softmax over the kept three
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # Gemma4-style probabilities: renormalised over kept
    w = route(p, keep, 1, {"score": "probs", "renormalize": False})
    assert w[0].tolist() == pytest.approx([0, 0, 0.5, 0])


def test_route_sigmoid_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0, 3.0]])
    keep = torch.tensor([True, True, True, False])
    w = route(logits, keep, 2, {"score": "sigmoid", "renormalize": False, "scale": 2.5})
    s = lambda x: 1 / (1 + math.exp(-x))
    assert w[0].tolist() == pytest.approx([2.5 * s(0), 2.5 * s(1), 0, 0])


# ---------------------------------------------------------------- NAEE
def naee_stats(E=6, T=12, H=3, top_k=2, router=None, seed=0, batches=1):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for li in range(2):
        logits = torch.randn(T, E, generator=g, dtype=torch.float64)
        out = torch.randn(T, E, H, generator=g, dtype=torch.float64)
        target = torch.randn(T, H, generator=g, dtype=torch.float64)
        layers[li] = {
            "count": [1.0] * E,
            "recon_logits": logits,
            "recon_expert_out": out,
            "recon_target": target,
            "recon_batch": [t * batches // T for t in range(T)],  # contiguous calibration batches
        }
    st = make_stats(layers, top_k=top_k, router=router)
    for d in st.layers.values():
        d["recon_batch"] = d["recon_batch"].long()
    return st


def brute_force(st, li, r, router):
    """Naive per-token loop: softmax over kept logits, sorted top-k, renormalise, scale, sum g*f; the loss is
    the sum over calibration batches of per-batch Frobenius norms (the reference's)."""
    logits, out, tgt = (st.get(li, n).tolist() for n in ("recon_logits", "recon_expert_out", "recon_target"))
    batch = st.get(li, "recon_batch").tolist()
    k, E = st.meta["top_k"][str(li)], len(logits[0])
    best = None
    for ks in itertools.combinations(range(E), r):
        err = dict.fromkeys(batch, 0.0)
        for t in range(len(logits)):
            if router["score"] == "softmax":
                z = sum(math.exp(logits[t][e]) for e in ks)
                p = {e: math.exp(logits[t][e]) / z for e in ks}
            else:
                p = {e: 1 / (1 + math.exp(-logits[t][e])) for e in ks}
            top = sorted(ks, key=lambda e: -p[e])[:k]
            tot = sum(p[e] for e in top) if router["renormalize"] else 1.0
            y = [sum(p[e] / tot * router["scale"] * out[t][e][h] for e in top) for h in range(len(tgt[t]))]
            err[batch[t]] += sum((tgt[t][h] - y[h]) ** 2 for h in range(len(y)))
        loss = sum(math.sqrt(v) for v in err.values())
        if best is None or loss < best[1] - 1e-12:
            best = (list(ks), loss)
    return best


@pytest.mark.parametrize(
    "router",
    [
        {"score": "softmax", "renormalize": True, "scale": 1.0},
        {"score": "softmax", "renormalize": False, "scale": 1.0},
        {"score": "sigmoid", "renormalize": True, "scale": 2.5},
    ],
)
@pytest.mark.parametrize("batches", [1, 3])
def test_naee_equals_brute_force(router, batches):
    st = naee_stats(router=router, batches=batches)
    plan = NAEE(progress=False).plan(st, Target(expert_sparsity=0.5))
    for li in (0, 1):
        keep, loss = brute_force(st, li, 3, router)
        assert plan.keep()[li] == keep
        assert plan.meta["recon_loss"][str(li)] == pytest.approx(loss, rel=1e-9)
        assert reconstruction_loss_fn(st, li)(keep) == pytest.approx(loss, rel=1e-9)
        assert max(plan.layers[li].scores) == pytest.approx(-loss)  # kept experts carry the best loss


def test_naee_full_keep_set_reconstructs_exactly():
    st = naee_stats()
    for li in (0, 1):  # a target made by the router itself is reproduced with nothing dropped
        w = route(st.get(li, "recon_logits"), torch.ones(6, dtype=torch.bool), 2, st.meta["router"][str(li)])
        st.layers[li]["recon_target"] = torch.einsum("te,teh->th", w, st.get(li, "recon_expert_out"))
        assert reconstruction_loss_fn(st, li)(range(6)) == pytest.approx(0.0, abs=1e-12)


def test_naee_limit_and_global_refused():
    st = naee_stats()
    with pytest.raises(ValueError, match=r"C\(6, 3\) = 20 reconstructions, above max_combinations=10"):
        NAEE(max_combinations=10, progress=False).plan(st, Target(expert_sparsity=0.5))
    with pytest.raises(ValueError, match="allocation='uniform'"):
        NAEE(progress=False).plan(st, Target(expert_sparsity=0.5, allocation="global"))


def test_naee_grouped_enumerates_balanced_sets_only():
    sets = list(keep_sets(8, 4, (4, 2), 2))
    assert len(sets) == n_keep_sets(8, 4, (4, 2), 2) == 6  # C(4 groups, 2), each group of 2 kept whole
    assert all(sorted({e // 2 for e in s}) == sorted(e // 2 for e in s[::2]) for s in sets)
    assert n_keep_sets(8, 4, None, 2) == math.comb(8, 4)
    st = naee_stats(E=8)
    st.meta["n_group"] = {"0": [4, 2], "1": [4, 2]}
    plan = NAEE(progress=False).plan(st, Target(expert_sparsity=0.5))
    for keep in plan.keep().values():
        assert tuple(keep) in sets


def test_route_group_limited_by_hand():
    logit = lambda p: math.log(p / (1 - p))
    lg = torch.tensor([[logit(0.9), logit(0.1), logit(0.6), logit(0.55)]])
    keep = torch.ones(4, dtype=torch.bool)
    sig = {"score": "sigmoid", "renormalize": False, "scale": 1.0}
    # DeepSeek-V3 style: group score = sum of top-2 -> {0,1}: 1.0, {2,3}: 1.15 -> only group 1 (topk_group=1)
    assert route(lg, keep, 2, sig, (2, 1))[0].tolist() == pytest.approx([0, 0, 0.6, 0.55])
    assert route(lg, keep, 2, sig)[0].tolist() == pytest.approx([0.9, 0, 0.6, 0])
    # DeepSeek-V2 style (softmax): group score = max prob -> group 0 (0.4 > 0.3)
    soft = torch.tensor([[4.0, 1.0, 3.0, 2.0]]).log()
    w = route(soft, keep, 2, {"score": "softmax", "renormalize": True, "scale": 1.0}, (2, 1))
    assert w[0].tolist() == pytest.approx([0.8, 0.2, 0, 0])


def test_route_extra_router_columns_and_gate_on_input():
    lg = torch.tensor([[3.0, 1.0, 2.0, 5.0]])  # 3 real experts + 1 zero expert column
    keep = torch.tensor([True, False, True])
    w = route(lg, keep, 2, {"score": "softmax", "renormalize": False, "scale": 1.0})
    p = torch.softmax(torch.tensor([3.0, float("-inf"), 2.0, 5.0]), -1)
    assert w.shape == (1, 4) and w[0].tolist() == pytest.approx([p[0].item(), 0, 0, p[3].item()])  # zero expert slot
    w = route(lg[:, :3], keep, 2, {"score": "sigmoid", "gate_on_input": True})
    assert w[0].tolist() == [1.0, 0.0, 1.0]
