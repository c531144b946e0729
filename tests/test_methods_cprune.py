"""C-Prune (released-code algorithm): coefficient, a hand-built clustering case, two stages, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from _stats_factory import make_stats

from moeprune.methods.cprune import CPrune, coefficient
from moeprune.methods.target import Target


def test_coefficient_values():
    assert coefficient(4, 8) == pytest.approx(0.8)  # p = 0.5: 0.6 * (1 - 1/2) + 0.5
    p = 1 / 64  # the code's precedence: exp(.5-p) - [exp(p-.5) / (exp(p-.5) + exp(.5-p))]
    assert coefficient(1, 64) == pytest.approx(
        0.6 * (1.62308 - 0.61611 / (0.61611 + 1.62308)) + 0.5, abs=1e-4
    )
    assert math.isclose(math.exp(0.5 - p), 1.62308, abs_tol=1e-4)


def hand_stats(N=8):
    # 6 experts, H = 2: cluster A = {0, 1, 2} around (10, 10) with expert 1 nearest the mean,
    # cluster B = {3, 4} around (-10, 0), expert 5 alone at (0, -10)
    base = torch.tensor([[10.0, 10.2], [10.0, 10.0], [10.0, 9.6], [-10.0, 0.1], [-10.0, -0.1], [0.0, -10.0]])
    out = base.expand(N, 6, 2).clone()
    out += 0.001 * torch.arange(N, dtype=torch.float64).view(N, 1, 1)  # tiny per-sample variation
    return make_stats(
        {0: {"count": [1.0] * 6, "sentence_out": out}, 1: {"count": [1.0] * 6, "sentence_out": out.flip(1)}},
        top_k=1,
    )


def test_layer_stage_by_hand():
    # uniform 1/3: each layer prunes 2 (rate 1/3). Cluster A (|C| = 3, p = 0.5, c = 0.8) selects
    # int(0.8 * 2/3 * 3) = 1 member, the one nearest its mean (expert 1); B and {5} are smaller than 3,
    # all selected. Selection counts: A's others 0 in every batch -> pruned.
    plan = CPrune(layer_clusters=3, batch_size=4).plan(hand_stats(), Target(expert_sparsity=1 / 3))
    assert plan.keep() == {0: [1, 3, 4, 5], 1: [0, 1, 2, 4]}  # layer 1 is the mirror image (e -> 5 - e)
    assert plan.layers[0].scores == (0.0, 1.0, 0.0, 1.0, 1.0, 1.0)  # fraction of the 2 batches
    assert plan.meta["layer_stage_pruned"] == {"0": 2, "1": 2} and plan.meta["global_stage_pruned"] == 0


def random_stats(L=3, E=16, N=40, H=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_stats(
        {li: {"count": [1.0] * E, "sentence_out": torch.randn(N, E, H, generator=g)} for li in range(L)},
        top_k=2,
    )


def test_two_stage_hits_target_and_respects_floors():
    st = random_stats()
    t = Target(expert_sparsity=0.5, allocation="global")
    plan = CPrune(batch_size=10).plan(st, t)
    # layer_rate = 1 - sqrt(0.5) = 0.293 -> floor(4.69) = 4 per layer; the global stage prunes 24 - 12 = 12
    assert (
        plan.meta["layer_stage_pruned"] == {"0": 4, "1": 4, "2": 4} and plan.meta["global_stage_pruned"] == 12
    )
    assert sum(plan.kept_counts().values()) == 24 and min(plan.kept_counts().values()) >= 2
    fixed = CPrune(batch_size=10, layer_rate=0.25).plan(st, t)
    assert fixed.meta["layer_stage_pruned"] == {"0": 4, "1": 4, "2": 4}
    with pytest.raises(ValueError, match="layer_rate=0.6 prunes 27 experts"):
        CPrune(layer_rate=0.6).plan(st, t)


def test_determinism_with_seed():
    st = random_stats(L=2, N=20)
    t = Target(expert_sparsity=0.5, allocation="method")
    for kw in ({"clustering": "kmeans", "shuffle": True}, {"shuffle": True}, {"ward_on_distances": True}):
        a, b = (
            CPrune(batch_size=10, seed=7, **kw).plan(st, t),
            CPrune(batch_size=10, seed=7, **kw).plan(st, t),
        )
        assert a.to_dict() == b.to_dict()
    shuffled = [CPrune(batch_size=10, seed=s, shuffle=True).plan(st, t).keep() for s in range(4)]
    assert any(k != shuffled[0] for k in shuffled)  # the seed matters when batches are shuffled


def test_grouped_layers_rebalanced():
    st = random_stats(L=1, E=8)
    st.meta["n_group"] = {"0": [4, 2]}
    plan = CPrune(batch_size=10, layer_clusters=3).plan(st, Target(expert_sparsity=0.5))
    per_group = [sum(1 for e in plan.keep()[0] if e // 2 == g) for g in range(4)]
    assert sorted(per_group) == [0, 0, 2, 2]
