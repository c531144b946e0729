"""MoE Pathfinder: exact top-m DP, IQR rule, hand-computed plans, ablations, floors, co-routing variant."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from _stats_factory import make_stats

from moeprune.methods.pathfinder import (
    GUARD,
    Pathfinder,
    PathfinderCoroute,
    aggregate_paths,
    iqr_outliers,
    node_importance,
)
from moeprune.methods.pathfinder_dp import topm_paths, unique_paths
from moeprune.methods.registry import METHODS, get_method
from moeprune.methods.target import Target
from moeprune.plan import PruningPlan

NEG = float("-inf")
TIE = ("layer", "spread")


# ---------------------------------------------------------------------------------------------- DP
def brute(source, edges, sink, m):
    """All paths, weight accumulated left to right like the DP, sorted by (-weight, node tuple)."""
    dims = [source.numel()] + [e.shape[1] for e in edges]
    out = []
    for p in itertools.product(*[range(d) for d in dims]):
        w = 0.0 + float(source[p[0]])
        for li, e in enumerate(edges):
            w = w + float(e[p[li], p[li + 1]])
        w = w + float(sink[p[-1]])
        if w != NEG:
            out.append((-w, p))
    out.sort()
    return [(-a, b) for a, b in out[:m]]


def as_list(w, p):
    return [(float(a), tuple(int(x) for x in b)) for a, b in zip(w, p)]


def rand_graph(g, dims, integer, p_missing=0.15):
    def rnd(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if integer:  # coarse values: many exact ties, resolved lexicographically
            x = torch.round(2 * x) / 2
        return x.masked_fill(torch.rand(*shape, generator=g) < p_missing, NEG)

    return rnd(dims[0]), [rnd(dims[i], dims[i + 1]) for i in range(len(dims) - 1)], rnd(dims[-1])


@pytest.mark.parametrize("kind", ["general", "separable"])
@pytest.mark.parametrize("integer", [False, True])
def test_dp_equals_brute_force_small(kind, integer):
    g = torch.Generator().manual_seed(1 + integer)
    for _ in range(12):
        if kind == "general":
            dims = [4, 4, 4, 4]
        else:  # expert layers joined by single-node router hubs (Pathfinder's factorised graph)
            dims = [4, 1, 4, 1, 4, 1, 4]
        src, edges, sink = rand_graph(g, dims, integer)
        for m in (1, 3, 10):
            got = as_list(*topm_paths(src, edges, sink, m))
            assert got == brute(src, edges, sink, m)


def test_dp_equals_brute_force_pruned_regime():
    """m large relative to the widths: the lower-bound pruning and the 'fewer paths than m' case."""
    g = torch.Generator().manual_seed(7)
    for dims, integer in (([5, 6, 4, 5, 3], True), ([5, 1, 6, 4, 1, 5], False), ([6, 6, 6, 6], True)):
        src, edges, sink = rand_graph(g, dims, integer, p_missing=0.1)
        for m in (7, 50, 333, 2000):
            assert as_list(*topm_paths(src, edges, sink, m)) == brute(src, edges, sink, m)


def test_dp_all_ties_are_lexicographic():
    w, p = topm_paths(torch.zeros(3), [torch.zeros(3, 2), torch.zeros(2, 3)], torch.zeros(3), 5)
    assert torch.equal(w, torch.zeros(5, dtype=torch.float64))
    assert [tuple(x.tolist()) for x in p] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1)]


def _dense_reference(source, edges, sink, m):
    """Independent per-node top-m DP on Python tuples (all P*m candidates, no pruning)."""
    lists = [[(-float(source[j]), (j,))] if source[j] != NEG else [] for j in range(source.numel())]
    for e in edges + [sink.reshape(-1, 1)]:
        new = []
        for j in range(e.shape[1]):
            cand = [(-(-nw + float(e[i, j])), path + (j,)) for i, lst in enumerate(lists) for nw, path in lst
                    if e[i, j] != NEG]
            new.append(sorted((c for c in cand if c[0] != -NEG), key=lambda c: (c[0], c[1]))[:m])
        lists = new
    return [(-nw, path[:-1]) for nw, path in lists[0]]


def test_dp_matches_dense_reference_medium():
    g = torch.Generator().manual_seed(3)
    src, edges, sink = rand_graph(g, [12, 12, 12, 12, 12], integer=False, p_missing=0.05)
    assert as_list(*topm_paths(src, edges, sink, 40)) == _dense_reference(src, edges, sink, 40)
    src, edges, sink = rand_graph(g, [10, 10, 10, 10], integer=True, p_missing=0.05)
    assert as_list(*topm_paths(src, edges, sink, 25)) == _dense_reference(src, edges, sink, 25)


def test_unique_paths_repeats_best_path_and_removes_its_nodes():
    g = torch.Generator().manual_seed(5)
    src, edges, sink = rand_graph(g, [4, 4, 4], integer=False, p_missing=0.0)
    w, p = unique_paths(src, edges, sink, 10)
    s, e = src.clone(), [x.clone() for x in edges]
    ref = []
    while True:
        best = brute(s, e, sink, 1)
        if not best:
            break
        ref.append(best[0])
        path = best[0][1]
        s[path[0]] = NEG
        for li in range(1, len(path)):
            e[li - 1][:, path[li]] = NEG
    assert as_list(w, p) == ref and len(ref) == 4  # 4 experts per layer: 4 disjoint paths


def test_dp_rejects_bad_input():
    with pytest.raises(ValueError, match="m=0"):
        topm_paths(torch.zeros(2), [], torch.zeros(2), 0)
    with pytest.raises(ValueError, match="edges\\[0\\]"):
        topm_paths(torch.zeros(2), [torch.zeros(3, 2)], torch.zeros(2), 1)
    with pytest.raises(ValueError, match="NaN"):
        topm_paths(torch.tensor([0.0, float("nan")]), [], torch.zeros(2), 1)


# ---------------------------------------------------------------------------------------------- IQR
def test_iqr_rule_hand_computed():
    # sorted [0,1,2,3,4,11.3]: Q1 = 1.25, Q3 = 3.75 (linear interpolation), IQR 2.5, upper 11.25
    keep, rem = iqr_outliers(torch.tensor([3.0, 0, 1, 2, 4, 11.3]), torch.ones(6))
    assert keep.tolist() == [False] * 6 and rem.tolist() == [False] * 5 + [True]
    # nearest-rank quartiles (1, 4) would give upper 13 and no outlier: interpolation matters
    keep, rem = iqr_outliers(torch.tensor([3.0, 0, 1, 2, 4, 11.2]), torch.ones(6))
    assert not rem.any()
    # large norm keeps: [1,2,3,4,5,40] -> Q1 2.25, Q3 4.75, upper 12.25; loss outlier on the same expert
    keep, rem = iqr_outliers(torch.tensor([3.0, 0, 1, 2, 4, 11.3]), torch.tensor([1.0, 2, 3, 4, 5, 40]))
    assert keep.tolist() == [False] * 5 + [True] and not rem.any()  # conflict -> keep
    # small loss keeps, small norm removes
    keep, rem = iqr_outliers(torch.tensor([10.0, 10.1, 10.2, 10.3, 10.4, 10.5, 10.6, 0.0]),
                             torch.tensor([5.0, 5.1, 5.2, 5.3, 0.0, 5.4, 5.5, 5.6]))
    assert keep.nonzero().flatten().tolist() == [7] and rem.nonzero().flatten().tolist() == [4]
    # fewer than 4 values, or zero IQR: no bounds
    assert not any(t.any() for t in iqr_outliers(torch.tensor([0.0, 1.0, 100.0]), torch.ones(3)))
    assert not any(t.any() for t in iqr_outliers(torch.tensor([1.0] * 5 + [9.0]), torch.ones(6)))


def test_node_importance_softmax_over_enabled_only():
    e = node_importance(torch.tensor([1.0, 2.0, 0.0, 1000.0]), torch.tensor([True, True, False, True]), 1.0)
    z = math.exp(-1) + math.exp(-2) + math.exp(-1000)
    assert e[2] == 0 and e[0] == pytest.approx(math.exp(-1) / z) and e[1] == pytest.approx(math.exp(-2) / z)


# ---------------------------------------------------------------------------------------------- plans
R = {  # router probabilities r[layer][sample]; a = 1 and L = const, so only r ranks experts
    0: [[0.4, 0.35, 0.15, 0.1], [0.7, 0.1, 0.1, 0.1]],
    1: [[0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.38, 0.42]],
    2: [[0.1, 0.7, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]],
}


def tiny_stats(top_k=1, r=R, loss=None, norm=None, **meta):
    """2 samples, 3 layers, 4 experts. Top-2 paths: s0 (0,2,1), (1,2,1); s1 (0,3,1), (0,2,1)."""
    n, e = len(r[0]), len(r[0][0])
    layers = {li: {"count": [1.0] * e, "sample_tokens": [8.0] * n, "sample_prob_mean": r[li],
                   "sample_norm_mean": norm[li] if norm else [[1.0] * e] * n,
                   "sample_recon_loss": loss[li] if loss else [[2.0] * e] * n} for li in r}
    return make_stats(layers, top_k=top_k, expert_params=100, **meta)


def test_hand_computed_paths_and_log_weights():
    st, meth = tiny_stats(), Pathfinder(m=2)
    layers = st.moe_layers
    e = [torch.full((4,), 0.25, dtype=torch.float64)] * 3
    en = [torch.ones(4, dtype=torch.bool)] * 3
    w, p = topm_paths(*meth._graph(st, layers, 0, e, en, {})[:3], 2)
    assert p[:, [0, 2, 4]].tolist() == [[0, 2, 1], [1, 2, 1]]  # hub layers sit at odd positions
    lg = lambda x: math.log(x + GUARD)
    expect = lg(0.4) + lg(0.6) + lg(0.7) + 3 * lg(0.25) + 3 * lg(1.0)
    assert float(w[0]) == pytest.approx(expect, abs=1e-12)
    assert float(w[1]) == pytest.approx(expect - lg(0.4) + lg(0.35), abs=1e-12)
    assert [x.tolist() for x in (meth.sample_paths(st, layers, 1, {})[0])] == [[0, 3, 1], [0, 2, 1]]


def test_hand_computed_plan_budget_fill_tie_breaking():
    # freq: L0 {0:3, 1:1}, L1 {2:3, 3:1}, L2 {1:4}; fill order (-freq, layer, expert)
    plan = Pathfinder(m=2).plan(tiny_stats(), Target(expert_sparsity=0.5, allocation="method"))
    assert plan.keep() == {0: [0, 1, 2], 1: [2, 3], 2: [1]}  # 6 kept; zero-freq tie -> layer 0, expert 2
    assert plan.layers[2].scores == (0.0, 4.0, 0.0, 0.0) and plan.layers[0].scores == (3.0, 1.0, 0.0, 0.0)
    # 4 experts' parameters: the freq-1 tie (L0e1 vs L1e3) goes to the lower layer
    plan = Pathfinder(m=2).plan(tiny_stats(), Target(param_ratio=1 / 3, allocation="method"))
    assert plan.keep() == {0: [0, 1], 1: [2], 2: [1]}
    # uniform allocation: 2 per layer by frequency, then expert id
    plan = Pathfinder(m=2).plan(tiny_stats(), Target(expert_sparsity=0.5))
    assert plan.keep() == {0: [0, 1], 1: [2, 3], 2: [0, 1]}
    assert plan.method == "pathfinder" and plan.meta["paths_per_sample"] == [2, 2]
    assert PruningPlan.from_dict(plan.to_dict()).keep() == plan.keep()


def test_spread_tie_break_deals_zero_frequency_slots_over_layers():
    # 6th slot among zero-frequency experts: "layer" takes L0e2; "spread" takes the best-ranked by mean r
    # (L2e0: rank 1 in its layer, vs rank 2 for L0e2 and L1e0)
    t = Target(expert_sparsity=0.5, allocation="method")
    keep = Pathfinder(m=2, tie_break="spread").plan(tiny_stats(), t).keep()
    assert keep == {0: [0, 1], 1: [2, 3], 2: [0, 1]}
    # at scale: 1 sample, 1 path, 50 % budget -> "layer" fills the first layers, "spread" stays balanced
    g = torch.Generator().manual_seed(0)
    r = {li: torch.softmax(torch.randn(1, 16, generator=g, dtype=torch.float64), 1).tolist()
         for li in range(6)}
    st = tiny_stats(r=r, top_k=2)
    counts = {tb: list(Pathfinder(m=1, tie_break=tb).plan(st, t).kept_counts().values()) for tb in TIE}
    assert counts["layer"] == [16, 16, 10, 2, 2, 2] and counts["spread"] == [8] * 6  # floors 2, then fill


def test_floors_are_raised_before_the_fill():
    # top_k = 2: layer 2 has one path expert; the reference code would keep 1 < top_k there
    plan = Pathfinder(m=2).plan(tiny_stats(top_k=2), Target(expert_sparsity=0.5, allocation="method"))
    assert plan.keep() == {0: [0, 1], 1: [2, 3], 2: [0, 1]}
    plan = Pathfinder(m=2).plan(tiny_stats(top_k=1), Target(expert_sparsity=0.5, allocation="method",
                                                            min_keep=2))
    assert min(plan.kept_counts().values()) >= 2 and sum(plan.kept_counts().values()) == 6


def test_union_and_adaptive_aggregation():
    st = tiny_stats()
    t = Target(expert_sparsity=0.5, allocation="method")
    assert Pathfinder(m=2, aggregate="union").plan(st, t).keep() == {0: [0, 1], 1: [2, 3], 2: [1]}
    assert Pathfinder(m=1, aggregate="union").plan(st, t).keep() == {0: [0], 1: [2, 3], 2: [1]}
    # adaptive, budget 4: k=1 union {L0e0, L1e2, L1e3, L2e1} fits, k=2 (5) does not
    p = Pathfinder(m=2, aggregate="adaptive").plan(st, Target(param_ratio=1 / 3, allocation="method"))
    assert p.keep() == {0: [0], 1: [2, 3], 2: [1]} and p.meta["selected_k"] == 1
    # adaptive, budget 6: k=2 (5 experts), then fill in (layer, expert) order
    p = Pathfinder(m=2, aggregate="adaptive").plan(st, t)
    assert p.keep() == {0: [0, 1, 2], 1: [2, 3], 2: [1]} and p.meta["selected_k"] == 2
    with pytest.raises(ValueError, match="allocation='method'"):
        Pathfinder(aggregate="union").plan(st, Target(expert_sparsity=0.5))


def test_outliers_leave_the_graph_and_force_kept_are_readded():
    loss = [30, 10, 10.1, 10.2, 10.3, 10.4, 10.5, 0]  # expert 0 force-removed, expert 7 force-kept
    r = {0: [[0.9] + [0.1 / 7] * 7], 1: [[0.1 / 7] * 7 + [0.9]]}
    st = tiny_stats(r=r, loss={0: [loss], 1: [loss]})
    meth = Pathfinder(m=5)
    paths, fk, fr = meth.sample_paths(st, st.moe_layers, 0, {})
    assert fk[0].nonzero().flatten().tolist() == [7] and fr[0].nonzero().flatten().tolist() == [0]
    assert not ((paths == 0) | (paths == 7)).any()  # r favours experts 0 / 7, but they are disabled
    plan = meth.plan(st, Target(expert_sparsity=0.75, allocation="method"))  # keep 4 of 16
    assert 7 in plan.keep()[0] and 7 in plan.keep()[1] and plan.meta["force_keep"] == 2
    # outliers off: expert 7 (loss 0, e ~ 1) is back in the graph and dominates both layers
    paths, _, _ = Pathfinder(m=1, outliers=False).sample_paths(st, st.moe_layers, 0, {})
    assert paths.tolist() == [[7, 7]]


def test_force_kept_beyond_budget_are_trimmed_by_priority():
    st = tiny_stats()
    budget = Target(param_ratio=0.25, allocation="method").resolve(st)  # 3 experts
    fk = {0: torch.tensor([2, 1, 0, 0]), 1: torch.tensor([1, 0, 0, 1]), 2: torch.zeros(4, dtype=torch.long)}
    fr = {li: torch.zeros(4, dtype=torch.bool) for li in range(3)}
    keep, _, info = aggregate_paths([0, 1, 2], [torch.tensor([[0, 2, 1]])], fk, fr, budget)
    # floor (1 per layer) first: L0e0 (most samples), L1e0 (force-kept, lowest id), L2e1 (frequency)
    assert keep == {0: [0], 1: [0], 2: [1]} and info["dropped_force_keep"] == 2


def test_ablations_change_the_right_factor():
    # r favours expert 0, the loss favours expert 1, expert 2 is second in both (a = 1)
    r = {li: [[0.6, 0.05, 0.3, 0.05]] for li in (0, 1)}
    loss = {li: [[4.0, 0.0, 0.5, 4.0]] for li in (0, 1)}
    st = tiny_stats(r=r, loss=loss)
    t = Target(expert_sparsity=0.75, allocation="method")  # 1 expert per layer
    kept = {ab: Pathfinder(m=1, ablation=ab, outliers=False).plan(st, t).keep()
            for ab in (None, "ti_only", "is_only")}
    assert kept == {None: {0: [2], 1: [2]}, "ti_only": {0: [0], 1: [0]}, "is_only": {0: [1], 1: [1]}}


def test_coroute_follows_measured_transitions():
    r = {0: [[0.7, 0.1, 0.1, 0.1]], 1: [[0.1, 0.7, 0.1, 0.1]], 2: [[0.1, 0.7, 0.1, 0.1]]}
    st = tiny_stats(r=r, next_moe_layer={"0": 1, "1": 2})
    c0 = torch.full((4, 4), 10.0)
    c0[0] = torch.tensor([0.0, 0.0, 0.0, 100.0])  # tokens on expert 0 go to expert 3
    c1 = torch.full((4, 4), 10.0)
    c1[3] = torch.tensor([0.0, 0.0, 100.0, 0.0])  # ... and from there to expert 2
    c1[1] = 0.0  # a row without tokens
    st.layers[0]["transition"], st.layers[1]["transition"] = c0.double(), c1.double()
    t = Target(expert_sparsity=0.75, allocation="method")
    assert Pathfinder(m=1).plan(st, t).keep() == {0: [0], 1: [1], 2: [1]}  # per-layer argmax of r a
    assert PathfinderCoroute(m=1).plan(st, t).keep() == {0: [0], 1: [3], 2: [2]}
    logp = PathfinderCoroute(smoothing=0.5)._prepare(st, [0, 1, 2])["logp"]
    assert float(logp[0][0, 3]) == pytest.approx(math.log(100.5 / 102 + GUARD))
    assert float(logp[0][0, 1]) == pytest.approx(math.log(0.5 / 102 + GUARD))
    assert torch.allclose(PathfinderCoroute(smoothing=0.0)._prepare(st, [0, 1, 2])["logp"][1][1],
                          torch.full((4,), math.log(0.25 + GUARD), dtype=torch.float64))  # empty row: uniform
    # is_only drops r and the transitions: only importance (uniform here) -> lexicographic path
    assert PathfinderCoroute(m=1, ablation="is_only").plan(st, t).keep() == {0: [0], 1: [0], 2: [0]}


def test_coroute_checks_its_statistics():
    st = tiny_stats(next_moe_layer={"0": 2, "1": 2})
    for li in (0, 1):
        st.layers[li]["transition"] = torch.ones(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="next_moe_layer"):
        PathfinderCoroute().plan(st, Target(expert_sparsity=0.5, allocation="method"))
    st = tiny_stats()
    st.layers[0]["transition"] = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        PathfinderCoroute().plan(st, Target(expert_sparsity=0.5, allocation="method"))
    with pytest.raises(KeyError, match="transitions"):
        PathfinderCoroute().plan(tiny_stats(), Target(expert_sparsity=0.5, allocation="method"))


def test_registration_options_and_unique_mode():
    assert METHODS["pathfinder"] is Pathfinder and METHODS["pathfinder_coroute"] is PathfinderCoroute
    assert get_method("pathfinder", m=3, aggregate="union").m == 3
    for bad in ({"m": 0}, {"aggregate": "sum"}, {"ablation": "both"}, {"tau": 0.0}, {"max_samples": 0},
                {"tie_break": "random"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Pathfinder(**bad)
    # unique paths: s0 (0,2,1) then, without those experts, (1,3,0) (r ties -> lower id); s1 (0,3,1), (1,2,0)
    paths, _, _ = Pathfinder(m=2, unique_paths=True).sample_paths(tiny_stats(), [0, 1, 2], 0, {})
    assert paths.tolist() == [[0, 2, 1], [1, 3, 0]]
    t = Target(expert_sparsity=0.5, allocation="method")
    p = Pathfinder(m=2, unique_paths=True).plan(tiny_stats(), t)
    assert [p.layers[li].scores for li in range(3)] == [(2, 2, 0, 0), (0, 0, 2, 2), (2, 2, 0, 0)]
    # max_samples: only the first sample's paths count
    p = Pathfinder(m=2, max_samples=1).plan(tiny_stats(), Target(expert_sparsity=0.5, allocation="method"))
    assert p.meta["samples_used"] == 1 and p.layers[0].scores == (1.0, 1.0, 0.0, 0.0)


def test_group_limited_layers_are_balanced():
    # n_group=2 (experts {0,1} and {2,3}), top_k=2: a keep set must use the same count (>= 2) per
    # surviving group; the unbalanced path choice of layer 1 ({2, 3} + one of group 0) is re-balanced
    st = tiny_stats(top_k=2, n_group={str(li): [2, 1] for li in R})
    plan = Pathfinder(m=2).plan(st, Target(expert_sparsity=0.25, allocation="method"))
    for li, keep in plan.keep().items():
        per = [sum(1 for e in keep if e // 2 == g) for g in range(2)]
        assert sorted(set(per) - {0}) in ([2],), (li, keep)  # every used group holds exactly 2
    assert "ungrouped_layers" not in plan.meta
