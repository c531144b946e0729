"""C-Prune (released-code algorithm): coefficient, hand-built clustering / tie / cap / floor cases, rates from
the target, options, determinism. Reference parity itself: test_parity_cprune.py."""

from __future__ import annotations

import math

import pytest
import torch
from _stats_factory import make_stats

from moeprune.methods.cprune import CPrune
from moeprune.methods.cprune_counting import coefficient
from moeprune.methods.target import Target

# the achieved-vs-target note of the reference counting; asserted with pytest.warns where it matters
pytestmark = pytest.mark.filterwarnings("ignore:cprune. the code's counting")


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


def test_two_stage_rates_from_target_and_exact_option():
    st = random_stats()
    t = Target(expert_sparsity=0.5, allocation="global")
    # rates derived from the target: r = 1 - sqrt(0.5) = 0.2929 in both stages; the code's counting prunes
    # int(0.2929 * 16) = 4 per layer, then int(0.2929 * 36) = 10 globally: 26 kept, not the target's 24
    with pytest.warns(UserWarning, match="keeps 26 of 48 experts"):
        plan = CPrune(batch_size=10).plan(st, t)
    assert (
        plan.meta["layer_stage_pruned"] == {"0": 4, "1": 4, "2": 4} and plan.meta["global_stage_pruned"] == 10
    )
    assert plan.meta["layer_rate"] == plan.meta["global_rate"] == pytest.approx(1 - math.sqrt(0.5))
    assert plan.meta["achieved_expert_sparsity"] == pytest.approx(22 / 48)
    # global_stage="exact" (the former behaviour): the global stage prunes exactly the rest, floors kept
    exact = CPrune(batch_size=10, global_stage="exact").plan(st, t)
    assert exact.meta["global_stage_pruned"] == 12 and sum(exact.kept_counts().values()) == 24
    assert min(exact.kept_counts().values()) >= 2
    with pytest.raises(ValueError, match="layer stage prunes 27 experts"):
        CPrune(layer_rate=0.6, global_rate=0.0, global_stage="exact").plan(st, t)
    # one rate given: the other solves (1 - lr)(1 - gr) = 1 - s
    with pytest.warns(UserWarning):
        one = CPrune(batch_size=10, layer_rate=0.25).plan(st, t)
    assert one.meta["global_rate"] == pytest.approx(1 - 0.5 / 0.75)
    with pytest.raises(ValueError, match="layer_rate=0.6 alone prunes more"):
        CPrune(layer_rate=0.6).plan(st, t)
    with pytest.raises(ValueError, match="global_rate=0.1 needs allocation='method'"):
        CPrune(global_rate=0.1).plan(st, Target(expert_sparsity=0.5))


def tie_stats():
    """Every expert is a singleton cluster (E <= clusters), so all counts tie: only the tie rule decides."""
    so = torch.randn(8, 6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return make_stats({li: {"count": [1.0] * 6, "sentence_out": so} for li in (0, 1)}, top_k=1)


def test_tie_rule_reference_prunes_lowest_id_in_both_stages():
    st, t = tie_stats(), Target(expert_sparsity=0.19, allocation="method")
    kw = {"layer_rate": 0.34, "global_rate": 0.3, "layer_clusters": 6, "global_clusters": 8, "batch_size": 4}
    with pytest.warns(UserWarning):
        ref = CPrune(**kw).plan(st, t)
    # layer stage: int(0.34 * 6) = 2 -> ids 0, 1; global pool (0:2..0:5, 1:2..1:5) all 2 batches -> the first
    # int(0.3 * 8) = 2 positions go: (0, 2), (0, 3)
    assert ref.keep() == {0: [4, 5], 1: [2, 3, 4, 5]}
    with pytest.warns(UserWarning):
        lib = CPrune(ties="keep_lower_id", **kw).plan(st, t)
    assert lib.keep() == {0: [0, 1, 2, 3], 1: [0, 1]}  # highest layer, then highest id goes first


def cap_stats():
    """Layer 0 spread out, layer 1's 10 experts near copies: the global stage wants 9 of layer 0's 9 survivors."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 10, 4, generator=g, dtype=torch.float64) * 5
    b = torch.randn(16, 1, 4, generator=g, dtype=torch.float64).expand(16, 10, 4) + 1e-4 * torch.randn(
        16, 10, 4, generator=g, dtype=torch.float64
    )
    return make_stats(
        {0: {"count": [1.0] * 10, "sentence_out": a}, 1: {"count": [1.0] * 10, "sentence_out": b}}, top_k=1
    )


def test_cap_and_floors():
    st, t = cap_stats(), Target(expert_sparsity=0.19, allocation="method")
    kw = {"layer_rate": 0.1, "global_rate": 0.8, "layer_clusters": 3, "global_clusters": 2, "batch_size": 8}
    with pytest.warns(UserWarning):
        plan = CPrune(**kw).plan(st, t)
    # int(0.8 * 18) = 14 global removals, 9 of them in layer 0; its cap int(1 // 0.1 * 0.9) = int(9.0 * 0.9) = 8
    # cuts one (not re-assigned): layer 0 keeps 10 - 1 - 8 = 1 expert
    assert plan.meta["global_capped"] == {"0": 1} and plan.meta["global_stage_pruned"] == 13
    assert plan.keep() == {0: [9], 1: [5, 6, 8, 9]}
    t2 = Target(expert_sparsity=0.19, allocation="method", min_keep=2)
    with pytest.raises(
        ValueError, match=r"layer 0 would keep 1 experts, below its floor 2.*respect_floors=True"
    ):
        CPrune(**kw).plan(st, t2)
    with pytest.warns(UserWarning):
        floored = CPrune(respect_floors=True, **kw).plan(st, t2)
    assert floored.kept_counts()[0] == 2 and floored.meta["floor_cut"] == {"0": 1}
    assert floored.keep()[1] == plan.keep()[1]


def test_fp16_overflow_is_reported():
    so = torch.full((4, 4, 2), 1.0, dtype=torch.float64)
    so[:, 3] = 400.0  # distance 0 -> 400 * sqrt(...) > 256: the squared norm overflows fp16
    so[:, 2] = -400.0
    st = make_stats({0: {"count": [1.0] * 4, "sentence_out": so}}, top_k=1)
    with pytest.warns(UserWarning, match="overflowed fp16"):
        plan = CPrune(layer_clusters=1, batch_size=4).plan(st, Target(expert_sparsity=0.25))
    assert plan.meta["fp16_inf_distances"] > 0
    plan64 = CPrune(layer_clusters=1, batch_size=4, precision="float64").plan(
        st, Target(expert_sparsity=0.25)
    )
    assert "fp16_inf_distances" not in plan64.meta


def test_determinism_with_seed():
    st = random_stats(L=2, N=20)
    t = Target(expert_sparsity=0.5, allocation="method")
    for kw in (
        {"clustering": "kmeans", "shuffle": True},
        {"shuffle": True},
        {"ward_on_distances": False},
        {"precision": "float64"},
    ):
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
