"""plan_from_scores: uniform / global allocation, normalisation, floors, router groups, plan JSON."""

from __future__ import annotations

import pytest
import torch
from _stats_factory import make_stats

from moeprune.methods.allocation import (
    balance_groups,
    balanced_splits,
    normalize_scores,
    plan_from_scores,
    select_grouped,
)
from moeprune.methods.target import Target
from moeprune.plan import PruningPlan


def three_layers(**kw):
    counts = {0: [4.0, 3.0, 2.0, 1.0], 1: [1.0, 1.0, 5.0, 5.0], 2: [10.0, 0.0, 0.0, 0.0]}
    st = make_stats({li: {"count": c} for li, c in counts.items()}, top_k=1, **kw)
    return st, {li: torch.tensor(c) for li, c in counts.items()}


def test_uniform_ties_go_to_lower_id():
    st, sc = three_layers()
    plan = plan_from_scores(st, sc, Target(expert_sparsity=0.5))
    assert plan.keep() == {0: [0, 1], 1: [2, 3], 2: [0, 1]}  # layer 2: 0,0,0 tie -> expert 1
    assert plan.layers[0].scores == (4.0, 3.0, 2.0, 1.0)
    assert plan.meta["allocation"] == "uniform" and plan.target == {
        "expert_sparsity": 0.5,
        "allocation": "uniform",
    }


def test_global_mean_normalised_by_hand():
    # layer means 2.5, 3, 2.5 -> normalised [1.6 1.2 .8 .4], [.33 .33 1.67 1.67], [4 0 0 0]
    # floors (top_k=1): l0 e0, l1 e2, l2 e0; then 3 more: l1e3 (1.67), l0e1 (1.2), l0e2 (0.8)
    st, sc = three_layers()
    plan = plan_from_scores(st, sc, Target(expert_sparsity=0.5, allocation="global"))
    assert plan.keep() == {0: [0, 1, 2], 1: [2, 3], 2: [0]}
    assert plan.expert_sparsity() == 0.5 and plan.meta["normalize"] == "mean"


def test_global_raw_scores_differ_from_normalised():
    st, sc = three_layers()
    raw = plan_from_scores(st, sc, Target(expert_sparsity=0.5, allocation="global"), normalize="none")
    # raw: floors l0e0 l1e2 l2e0 then 5 (l1e3), 3 (l0e1), 2 (l0e2) -> same sets as normalised here
    sc2 = {**sc, 2: torch.tensor([1000.0, 30.0, 25.0, 0.0])}  # a layer on a 100x larger scale
    raw2 = plan_from_scores(st, sc2, Target(expert_sparsity=0.5, allocation="global"), normalize="none")
    norm2 = plan_from_scores(st, sc2, Target(expert_sparsity=0.5, allocation="global"))
    assert raw.keep() == {0: [0, 1, 2], 1: [2, 3], 2: [0]}
    assert raw2.keep() == {0: [0], 1: [2, 3], 2: [0, 1, 2]}  # raw ranking lets the large-scale layer win
    assert norm2.keep() == {0: [0, 1, 2], 1: [2, 3], 2: [0]}  # 30 and 25 are ~0.1 of layer 2's mean


def test_global_floor_at_least_top_k_and_min_keep():
    st, sc = three_layers()
    plan = plan_from_scores(st, sc, Target(expert_sparsity=0.5, allocation="global", min_keep=2))
    assert min(plan.kept_counts().values()) >= 2 and sum(plan.kept_counts().values()) == 6
    assert plan.keep()[2] == [0, 1]


def test_normalisations():
    s = {0: torch.tensor([2.0, -2.0, 4.0, float("inf")]), 1: torch.tensor([0.0, 0.0])}
    m = normalize_scores(s, "mean")
    assert m[0][:3].tolist() == pytest.approx([0.75, -0.75, 1.5]) and m[0][3] == float("inf")
    assert m[1].tolist() == [0.0, 0.0]
    r = normalize_scores({0: torch.tensor([3.0, 1.0, 2.0, 1.0])}, "rank")[0]
    assert r.tolist() == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])  # tie 1.0: lower id ranks higher


def test_param_budget_with_unequal_expert_sizes():
    st = make_stats(
        {0: {"count": [4.0, 3.0, 2.0, 1.0]}, 1: {"count": [1.0, 1.0, 1.0, 5.0]}},
        top_k=1,
        expert_params={0: 100, 1: 300},
    )
    sc = {li: st.get(li, "count") for li in (0, 1)}
    uni = plan_from_scores(st, sc, Target(param_ratio=0.5))
    assert uni.keep() == {0: [0, 1], 1: [0, 3]}  # 2 + 2 experts = 800 params
    # global: floors l0e0 + l1e3 = 400; then l0e1 (1.2) 500, l0e2 (.8) 600, l1 experts (.5, 300 each) do not
    # fit (900 > 800), l0e3 (.4) 700 -> 100 parameters unused
    glo = plan_from_scores(st, sc, Target(param_ratio=0.5, allocation="global"))
    assert glo.keep() == {0: [0, 1, 2, 3], 1: [3]}
    assert glo.meta["unused_budget"] == pytest.approx(100)
    mem = plan_from_scores(st, sc, Target(memory_gb=(1000 + 800) * 2 / 1e9, allocation="global"))
    assert mem.keep() == glo.keep()


def test_check_scores_errors():
    st, sc = three_layers()
    with pytest.raises(ValueError, match="scores cover layers"):
        plan_from_scores(st, {0: sc[0]}, Target(expert_sparsity=0.5))
    with pytest.raises(ValueError, match="NaN"):
        plan_from_scores(st, {**sc, 1: torch.tensor([1.0, float("nan"), 0, 0])}, Target(expert_sparsity=0.5))
    with pytest.raises(ValueError, match="3 scores for 4 experts"):
        plan_from_scores(st, {**sc, 1: torch.ones(3)}, Target(expert_sparsity=0.5))


# ---------------------------------------------------------------- router groups
GROUP_SCORES = [5.0, 0.0, 3.0, 3.0, 4.0, 4.0, 0.0, 9.0]  # group sums (top-2 of 2): 5, 6, 8, 9


def grouped_stats(top_k=2, topk_group=2, extra_layer=False):
    layers = {0: {"count": GROUP_SCORES}}
    if extra_layer:
        layers[1] = {"count": [1.0] * 8}
    return make_stats(layers, top_k=top_k, n_group={0: [4, topk_group]})


def test_balanced_splits():
    assert balanced_splits(8, 4, 2, 2, 4) == [(2, 2)]  # (4,1): 1 per group < 2; (1,4): 4 > group size 2
    assert balanced_splits(256, 8, 4, 8, 128) == [(8, 16), (4, 32)]
    assert balanced_splits(8, 4, 1, 3, 4) == []  # topk_group=1 group of 2 cannot fill top_k=3


def test_uniform_groups_balanced_by_group_score():
    st = grouped_stats()
    sc = {0: torch.tensor(GROUP_SCORES)}
    plan = plan_from_scores(st, sc, Target(expert_sparsity=0.5))
    assert plan.keep() == {0: [4, 5, 6, 7]}  # groups 3 and 2; plain top-4 would be [0, 4, 5, 7]
    ign = plan_from_scores(st, sc, Target(expert_sparsity=0.5), groups="ignore")
    assert ign.keep() == {0: [0, 4, 5, 7]}


def test_unbalanceable_count_rounds_down_and_reports():
    st = grouped_stats()
    plan = plan_from_scores(st, {0: torch.tensor(GROUP_SCORES)}, Target(expert_sparsity=0.625))  # keep 3
    assert plan.keep() == {0: [6, 7]}
    assert plan.meta["group_rounded"] == {"0": [3, 2]} and plan.meta["unused_budget"] == 1


def test_global_redistributes_rounding_to_ungrouped_layer():
    # normalised: l0 = [1.43 0 .86 .86 1.14 1.14 0 2.57], l1 = [4 0 0 0 0 0 1 3]; floors l0 {7,0}, l1 {0,7};
    # 4 more: l0e4, l0e5 (1.14), l1e6 (1.0), l0e2 (.86) -> layer 0 would keep 5 experts, not balanceable
    # -> 4 (2 groups x 2, groups 3 and 2), and the freed slot goes to layer 1's next expert (e1, tie at 0)
    st = grouped_stats(extra_layer=True)
    sc = {0: torch.tensor(GROUP_SCORES), 1: torch.tensor([8.0, 0, 0, 0, 0, 0, 2, 6])}
    plan = plan_from_scores(st, sc, Target(expert_sparsity=0.5, allocation="global"))
    assert plan.keep() == {0: [4, 5, 6, 7], 1: [0, 1, 6, 7]}
    assert plan.meta["group_rounded"] == {"0": [5, 4]} and plan.meta["unused_budget"] == 0


def test_no_balanced_count_falls_back_to_plain_topk():
    st = grouped_stats(top_k=3, topk_group=1)
    plan = plan_from_scores(st, {0: torch.tensor(GROUP_SCORES)}, Target(expert_sparsity=0.625))  # keep 3
    assert plan.keep() == {0: [0, 4, 7]} and plan.meta["ungrouped_layers"] == [0]


def test_select_grouped_and_balance_groups():
    s = torch.tensor(GROUP_SCORES)
    assert select_grouped(s, 2, (4, 2), 2) == [6, 7]
    assert select_grouped(s, 3, (4, 2), 2) is None
    st = grouped_stats()
    keep, info = balance_groups(st, {0: [0, 1, 4, 7]}, {0: s}, {0: 2})
    # 2 groups x 2: overlap 2 with groups 0 ({0,1}) and 2 ({4,5}); group 3 ({6,7}) overlaps 1
    assert keep == {0: [0, 1, 4, 5]} and info == {}


def test_plan_json_round_trip(tmp_path):
    st, sc = three_layers()
    plan = plan_from_scores(
        st,
        sc,
        Target(expert_sparsity=0.5, allocation="global"),
        method="frequency",
        method_config={"name": "frequency"},
    )
    loaded = PruningPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.to_dict() == plan.to_dict() and loaded.keep() == plan.keep()
    assert loaded.layers[1].scores == (1.0, 1.0, 5.0, 5.0)
