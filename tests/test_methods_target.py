"""Target validation and resolution: counts, budgets and the feasibility errors."""

from __future__ import annotations

import pytest
from _stats_factory import make_stats

from moeprune.methods.target import Target


def stats(E=4, L=2, top_k=2, **kw):
    return make_stats({li: {"count": [1.0] * E} for li in range(L)}, top_k=top_k, **kw)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({}, "exactly one"),
        ({"expert_sparsity": 0.5, "param_ratio": 0.5}, "exactly one"),
        ({"expert_sparsity": 1.0}, r"\[0, 1\)"),
        ({"expert_sparsity": -0.1}, r"\[0, 1\)"),
        ({"param_ratio": 0.0}, r"\(0, 1\]"),
        ({"memory_gb": 0}, "> 0"),
        ({"expert_sparsity": 0.5, "allocation": "layerwise"}, "allocation='layerwise'"),
        ({"expert_sparsity": 0.5, "min_keep": 0}, "positive integer"),
    ],
)
def test_invalid_targets(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Target(**kw)


def test_expert_sparsity_counts_floor_of_removed():
    st = make_stats({0: {"count": [1.0] * 10}, 1: {"count": [1.0] * 8}}, top_k=1)
    b = Target(expert_sparsity=0.3).resolve(st)
    # 0.3 * 10 = 2.9999999999999996 in floats: still 3 removed; 0.3 * 8 = 2.4 -> 2 removed
    assert b.uniform_keep == {0: 7, 1: 6}
    assert b.total_keep == 13 and b.unit == "experts" and b.budget == 13
    g = Target(expert_sparsity=0.3, allocation="global").resolve(st)
    assert g.total_keep == 13  # same count as uniform: fair comparison


def test_min_keep_floor_and_errors():
    st = stats(E=8, top_k=2)
    assert Target(expert_sparsity=0.5).floors(st) == {0: 2, 1: 2}
    assert Target(expert_sparsity=0.5, min_keep=3).floors(st) == {0: 3, 1: 3}
    assert Target(expert_sparsity=0.0, min_keep=50).floors(st) == {0: 8, 1: 8}  # capped at E
    with pytest.raises(ValueError, match="min_keep=1 is below top_k=2"):
        Target(expert_sparsity=0.5, min_keep=1).resolve(st)


def test_uniform_infeasible_names_limit_and_fix():
    st = stats(E=4, top_k=2)
    with pytest.raises(
        ValueError, match=r"keeps 1 of 4 experts in layer 0.*needs 2; use expert_sparsity at most 0\.5"
    ):
        Target(expert_sparsity=0.75).resolve(st)
    Target(expert_sparsity=0.5).resolve(st)  # the suggested limit itself is feasible


def test_global_infeasible_and_min_keep():
    st = stats(E=4, top_k=1)
    with pytest.raises(
        ValueError, match=r"keeps 2 experts in total.*needs 6; use expert_sparsity at most 0\.25"
    ):
        Target(expert_sparsity=0.75, allocation="global", min_keep=3).resolve(st)


def test_param_ratio_budget_and_error():
    st = make_stats(
        {0: {"count": [1.0] * 4}, 1: {"count": [1.0] * 4}}, top_k=1, expert_params={0: 100, 1: 300}
    )
    b = Target(param_ratio=0.5, allocation="global").resolve(st)
    assert b.unit == "params" and b.budget == pytest.approx(800) and b.cost == {0: 100.0, 1: 300.0}
    assert b.uniform_keep == {0: 2, 1: 2}
    assert b.total_keep == 5  # cheapest first: 4 x 100 + 1 x 300 = 700 <= 800
    with pytest.raises(ValueError, match=r"param_ratio=0.2 keeps 0 of 4 experts.*at least 0\.25"):
        Target(param_ratio=0.2).resolve(st)
    with pytest.raises(
        ValueError, match=r"keeps 320 routed-expert parameters.*needs 400; use param_ratio at least 0\.25"
    ):
        Target(param_ratio=0.2, allocation="global").resolve(st)


def test_memory_budget_matches_param_ratio():
    st = make_stats(
        {0: {"count": [1.0] * 4}, 1: {"count": [1.0] * 4}},
        top_k=1,
        expert_params={0: 100, 1: 300},
        other_params=1000,
        dtype_bytes=2,
    )
    mem = Target(memory_gb=(1000 + 800) * 2 / 1e9, allocation="global").resolve(st)
    assert mem.budget == pytest.approx(800)
    big = Target(memory_gb=1.0).resolve(st)  # more than the whole model: keep everything
    assert big.budget == pytest.approx(1600) and big.uniform_keep == {0: 4, 1: 4}
    with pytest.raises(
        ValueError,
        match=r"non-expert weights alone take 2e-06 GB; the smallest feasible memory_gb is 2\.8e-06",
    ):
        Target(memory_gb=1e-6).resolve(st)
    with pytest.raises(ValueError, match=r"use memory_gb at least 2\.8e-06"):
        Target(memory_gb=2.7e-6, allocation="global").resolve(st)


def test_memory_needs_metadata():
    st = stats()
    del st.meta["expert_params"]
    with pytest.raises(ValueError, match="expert_params"):
        Target(memory_gb=1.0).resolve(st)
    b = Target(param_ratio=0.5).resolve(st)  # equal sizes assumed
    assert b.uniform_keep == {0: 2, 1: 2}


def test_dict_round_trip():
    t = Target(param_ratio=0.6, allocation="global", min_keep=3)
    assert Target.from_dict(t.to_dict()) == t
    assert t.to_dict() == {"param_ratio": 0.6, "allocation": "global", "min_keep": 3}
