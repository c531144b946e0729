"""TENP: trapezoid shape, neuron choice by hand, parameter budget met from below to one channel."""

from __future__ import annotations

import pytest
import torch
from _stats_factory import make_stats

from moeprune.apply.neurons import ALIGN, neuron_index
from moeprune.methods.target import Target
from moeprune.methods.tenp import TENP, trapezoid
from moeprune.plan import PruningPlan


def test_trapezoid_linear_ramp():
    # x = 0, 1/3, 2/3, 1 -> 8 * (0, 1/6, 1/3, 1/2) = 0, 1.33, 2.67, 4 -> rounded 0, 1, 3, 4
    assert trapezoid([8] * 4, 0.0, 0.5) == [0, 1, 3, 4]
    assert trapezoid([64] * 27, 0.1, 0.4) == sorted(trapezoid([64] * 27, 0.1, 0.4))
    assert trapezoid([8], 0.0, 0.5) == [2]  # single layer: the midpoint


def hand_stats():
    # 2 layers x 4 experts, I = 4 channels, P = 12 parameters per expert (3 per channel)
    layers = {
        0: {
            "count": [1.0] * 4,
            "gate_norm_dir_sum": [0.1, 0.9, 0.5, 0.3],
            "easyep_sum": [0.9, 0.1, 0.1, 0.1],
            "neuron_proj_sum": [[1, -2, 3, 0.5], [0, 0, 0, 0], [4, 3, 2, 1], [1, 2, 3, 4]],
            "neuron_l2_sum": [[4, 3, 2, 1], [0, 0, 0, 0], [1, 2, 3, 4], [1, 1, 1, 1]],
        },
        1: {
            "count": [1.0] * 4,
            "gate_norm_dir_sum": [4.0, 3.0, 2.0, 1.0],
            "easyep_sum": [1.0, 1.0, 1.0, 1.0],
            "neuron_proj_sum": [[0] * 4, [0] * 4, [1, 2, 3, 4], [4, 3, 2, 1]],
            "neuron_l2_sum": [[0] * 4, [0] * 4, [1, 1, 1, 1], [1, 1, 1, 1]],
        },
    }
    return make_stats(layers, top_k=2, intermediate_size=4, expert_params=12)


def by_channel(**kw) -> TENP:
    """TENP at the paper's per-channel granularity (the hand cases have I = 4 < the default multiple 8)."""
    return TENP(channel_multiple=1, **kw)


def test_tenp_by_hand():
    # full-width counts: floor(4 * .25 + .5) = 1, floor(4 * .5 + .5) = 2; budget 0.75 * 96 = 72
    # full cost 3 * 12 = 36; narrowed 3 + 2 experts, w = 36 / 60 = 0.6 -> floor(2.4) = 2 channels: 66 spent;
    # +1 channel on layer 1 costs 2 * 3 = 6 -> 72 (exact); layer 0 would cost 9 more -> stays at 2
    plan = by_channel(full_start=0.25, full_end=0.5).plan(hand_stats(), Target(param_ratio=0.75))
    assert plan.keep() == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}  # every expert stays routable
    assert plan.meta["full_width"] == {"0": 1, "1": 2} and plan.meta["channels"] == {"0": 2, "1": 3}
    assert plan.layers[0].neurons == {0: (0, 2), 2: (0, 1), 3: (2, 3)}  # expert 1 (most important) full
    assert plan.layers[1].neurons == {2: (1, 2, 3), 3: (0, 1, 2)}
    assert plan.layers[0].intermediate_size == 4
    assert plan.meta["params_kept"] == pytest.approx(72)


def test_tenp_l2_and_easyep_variants():
    st = hand_stats()
    l2 = by_channel(full_start=0.25, full_end=0.5, neuron_score="l2").plan(st, Target(param_ratio=0.75))
    assert l2.layers[0].neurons == {0: (0, 1), 2: (2, 3), 3: (0, 1)}  # ties -> lower channel ids
    ee = by_channel(full_start=0.25, full_end=0.5, importance="easyep").plan(st, Target(param_ratio=0.75))
    assert set(ee.layers[0].neurons) == {1, 2, 3}  # expert 0 is now the important one


def random_stats(L: int, E: int, inter: int, P: int, seed: int):
    """``L`` layers of ``E`` experts with random importances and channel scores, ``I = inter``, ``P`` params."""
    g = torch.Generator().manual_seed(seed)
    layers = {
        li: {
            "count": [1.0] * E,
            "gate_norm_dir_sum": torch.rand(E, generator=g),
            "neuron_proj_sum": torch.randn(E, inter, generator=g),
        }
        for li in range(L)
    }
    return make_stats(layers, intermediate_size=inter, expert_params=P)


def kept_params(plan: PruningPlan, inter: int, per_channel: float) -> float:
    return sum(
        len(lp.neurons.get(e, range(inter)) if lp.neurons else range(inter)) * per_channel
        for lp in plan.layers.values()
        for e in lp.keep
    )


@pytest.mark.parametrize("ratio", [0.3, 0.45, 0.6, 0.8])
@pytest.mark.parametrize("width", ["global", "layer"])
@pytest.mark.parametrize("m", [1, 8])
def test_budget_met_from_below_within_one_step(ratio, width, m):
    L, E, inter, P = 6, 16, 32, 3 * 8 * 32
    st = random_stats(L, E, inter, P, seed=0)
    method = TENP(full_start=0.05, full_end=0.25, width=width, channel_multiple=m)
    if m == 8 and ratio == 0.3:  # about 5 of 32 channels: rounds down to 0 multiples of 8
        with pytest.raises(ValueError, match="channel_multiple=8"):
            method.plan(st, Target(param_ratio=ratio))
        return
    plan = method.plan(st, Target(param_ratio=ratio))
    budget, got = ratio * L * E * P, kept_params(plan, inter, P / inter)
    full = plan.meta["full_width"]
    min_step = min((E - full[str(li)]) * m * P / inter for li in range(L))
    assert got <= budget + 1e-6 and budget - got < min_step  # no layer could take m more channels
    assert all(k % m == 0 for k in plan.meta["channels"].values())
    assert got == pytest.approx(plan.meta["params_kept"])
    assert [full[str(li)] for li in range(L)] == sorted(full[str(li)] for li in range(L))  # trapezoid


def test_memory_target_and_errors():
    st = hand_stats()
    mem = by_channel(full_start=0.25, full_end=0.5).plan(st, Target(memory_gb=(1000 + 72) * 2 / 1e9))
    assert mem.meta["channels"] == {"0": 2, "1": 3}
    with pytest.raises(ValueError, match="full-width experts alone need"):
        by_channel(full_start=0.5, full_end=1.0).plan(st, Target(param_ratio=0.5))
    with pytest.raises(ValueError, match="min_channels"):
        by_channel(full_start=0.25, full_end=0.5).plan(st, Target(param_ratio=0.4))
    with pytest.raises(ValueError, match="neuron_score='x'"):
        TENP(neuron_score="x")


def test_expert_sparsity_removes_experts_by_importance():
    plan = TENP().plan(hand_stats(), Target(expert_sparsity=0.5))
    assert plan.keep() == {0: [1, 2], 1: [0, 1]} and not plan.has_neurons


def test_json_round_trip(tmp_path):
    plan = by_channel(full_start=0.25, full_end=0.5).plan(hand_stats(), Target(param_ratio=0.75))
    loaded = PruningPlan.load(plan.save(tmp_path / "p.json"))
    assert loaded.to_dict() == plan.to_dict() and loaded.layers[1].neurons == {2: (1, 2, 3), 3: (0, 1, 2)}


def test_channel_multiple_and_uniform_enp():
    st = hand_stats()
    # uniform ENP (no full-width expert): w = 0.5 -> 2 of 4 channels everywhere; padded == ragged
    enp = by_channel(full_start=0.0, full_end=0.0).plan(st, Target(param_ratio=0.5))
    assert enp.meta["channels"] == {"0": 2, "1": 2}
    assert enp.meta["params_padded"] == pytest.approx(enp.meta["params_kept"]) == pytest.approx(48)
    # trapezoid: layers with a full-width expert store full width when fused
    tr = by_channel(full_start=0.25, full_end=0.5).plan(st, Target(param_ratio=0.75))
    assert tr.meta["params_padded"] == pytest.approx(96)
    # multiples of 2 channels: w = 0.6 -> floor(2.4 / 2) * 2 = 2; +2 on layer 1 costs 12 > 6 left
    m2 = TENP(full_start=0.25, full_end=0.5, channel_multiple=2).plan(st, Target(param_ratio=0.75))
    assert m2.meta["channels"] == {"0": 2, "1": 2} and m2.meta["params_kept"] == pytest.approx(66)


def test_default_widths_are_what_apply_stores():
    """Default ``channel_multiple=8`` (apply's grouped_mm alignment): uniform-ENP widths are multiples of 8,
    so ``apply``'s fused width is the planned one; per-channel widths get padded with dead channels."""
    L, E, inter = 3, 8, 64
    st = random_stats(L, E, inter, 3 * 16 * inter, seed=1)
    assert TENP().channel_multiple == ALIGN == 8
    padded = {}
    for m in (8, 1):
        plan = TENP(full_start=0.0, full_end=0.0, channel_multiple=m).plan(st, Target(param_ratio=0.55))
        padded[m] = 0
        for li, lp in plan.layers.items():
            k = plan.meta["channels"][str(li)]
            idx, dead = neuron_index([list(lp.neurons[e]) for e in lp.keep], inter)  # what apply stores
            assert idx.shape[1] == -(-k // 8) * 8 and int(dead.sum()) == E * (idx.shape[1] - k)
            assert k % m == 0
            padded[m] += int(dead.sum())
    assert padded[8] == 0 and padded[1] > 0  # w = 0.55: 35.2 channels; 35 or 36 are padded to 40
