"""S(b, alpha, beta) family: every named member on hand-computed numbers, errors, REAP guard."""

from __future__ import annotations

import math

import pytest
import torch
from _stats_factory import make_stats, routed_from_tokens

import moeprune.methods.unified as U
from moeprune.methods.registry import METHODS
from moeprune.methods.target import Target

# routed (g, ||f||) pairs per expert of layer 0; expert 2 is never routed
TOKENS = [[(0.5, 2.0), (0.5, 4.0)], [(1.0, 1.0)], [], [(0.25, 8.0), (0.75, 2.0), (0.5, 2.0)]]
# by hand: count [2,1,0,3]; sum g [1,1,0,1.5]; sum|f| [6,1,0,12]; sum|f|^2 [20,1,0,72];
#          sum g|f| [3,1,0,4.5]; sum (g|f|)^2 [5,1,0,7.25]
EXPECTED = {
    "frequency": [2, 1, 0, 3],
    "soft_frequency": [1, 1, 0, 1.5],
    "ean": [6, 1, 0, 12],
    "reap": [1.5, 1, 0, 1.5],
    "man": [3, 1, 0, 4],
    "msan": [10, 1, 0, 24],
    "gated_ean_sum": [3, 1, 0, 4.5],
    "squared_gated_sum": [5, 1, 0, 7.25],
}


GATED = ("gate_sum", "gate_norm_sum", "gate_norm_sq_sum")


def with_reference_gates(d: dict, softmax_scale: float = 1.0, renorm_scale: float = 1.0) -> dict:
    """Add the reference-gate sums: the applied gate times a constant c (sum g^a |f|^b scales by c^a)."""
    out = dict(d)
    for prefix, c in (("softmax_gate", softmax_scale), ("renorm_gate", renorm_scale)):
        for name, a in zip(GATED, (1, 1, 2)):
            out[name.replace("gate", prefix, 1)] = [v * c**a for v in d[name]]
    return out


def stats(norm_topk_prob: bool = True, softmax_scale: float = 1.0, renorm_scale: float = 1.0):
    layer1 = routed_from_tokens([[(1.0, 1.0)]] * 4)  # flat layer
    layers = {0: routed_from_tokens(TOKENS), 1: layer1}
    layers = {li: with_reference_gates(d, softmax_scale, renorm_scale) for li, d in layers.items()}
    return make_stats(layers, top_k=1, norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_members_by_hand(name):
    assert name in METHODS
    s = METHODS[name]().score(stats())
    assert s[0].tolist() == pytest.approx(EXPECTED[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_equals_unified_triple(name):
    cls = METHODS[name]
    b, a, bt = cls.TRIPLE
    assert U.Unified(b=b, alpha=a, beta=bt).score(stats())[0].tolist() == pytest.approx(EXPECTED[name])


def test_fractional_b():
    s = U.Unified(b=0.5, alpha=1, beta=1).score(stats())[0]
    assert s.tolist() == pytest.approx([3 / math.sqrt(2), 1.0, 0.0, 4.5 / math.sqrt(3)])


def test_unsupported_pairs_list_the_supported_ones():
    for a, b in [(2, 1), (1, 2), (2, 0), (0.5, 1)]:
        with pytest.raises(
            ValueError, match=r"supported: \(alpha=0, beta=0\), \(alpha=1, beta=0\).*\(alpha=2, beta=2\)"
        ):
            U.Unified(b=1, alpha=a, beta=b)
    with pytest.raises(ValueError, match="b=-1"):
        U.Unified(b=-1, alpha=1, beta=1)


def test_never_routed_expert_scores_zero_and_goes_first():
    plan = U.MAN().plan(stats(), Target(expert_sparsity=0.25))
    assert plan.keep()[0] == [0, 1, 3] and plan.layers[0].scores[2] == 0.0
    assert plan.method == "man" and plan.method_config["name"] == "man"


def test_reap_plan_ties_lower_id():
    plan = U.REAP().plan(stats(), Target(expert_sparsity=0.5))
    assert plan.keep() == {0: [0, 3], 1: [0, 1]}


def test_super_expert_guard():
    st = stats()
    st.layers[0]["max_act_signed"] = torch.tensor([1.0, 1.0, 1.0, 50.0], dtype=torch.float64)
    st.layers[1]["max_act_signed"] = torch.tensor([1.0, 1.0, 1.0, 60.0], dtype=torch.float64)
    st.layers[0]["count"] = torch.tensor([2.0, 1.0, 5.0, 3.0], dtype=torch.float64)  # expert 3 not the best
    # median of all max_act = 1, global max / 10 = 6 -> tau = 6; only the first int(2 * .75) = 1 layer guarded
    m = U.super_expert_mask(st, quantile=0.5, layer_frac=0.75)
    assert m[0].tolist() == [False, False, False, True] and not m[1].any()
    plain = U.Frequency().plan(st, Target(expert_sparsity=0.75, min_keep=1))
    guarded = U.Frequency(preserve_super_experts=True, guard_quantile=0.5).plan(
        st, Target(expert_sparsity=0.75, min_keep=1)
    )
    assert plain.keep()[0] == [2] and guarded.keep()[0] == [3]
    assert guarded.layers[0].scores[3] == math.inf


@pytest.mark.parametrize("name", ["soft_frequency", "reap", "gated_ean_sum", "squared_gated_sum"])
def test_reference_gate_follows_norm_topk_prob(name):
    """Reference gate: renormalised sums iff meta norm_topk_prob, plain-softmax sums otherwise; 'applied'
    reads the model's gates. Gates scaled by c scale S by c^alpha, so each source is recognisable."""
    alpha = METHODS[name].TRIPLE[1]
    base = torch.tensor(EXPECTED[name], dtype=torch.float64)
    renorm = METHODS[name]().score(stats(True, softmax_scale=0.5, renorm_scale=2.0))[0]
    soft = METHODS[name]().score(stats(False, softmax_scale=0.5, renorm_scale=2.0))[0]
    applied = METHODS[name](gate="applied").score(stats(False, softmax_scale=0.5, renorm_scale=2.0))[0]
    forced = METHODS[name](gate="softmax").score(stats(True, softmax_scale=0.5, renorm_scale=2.0))[0]
    torch.testing.assert_close(renorm, base * 2.0**alpha)
    torch.testing.assert_close(soft, base * 0.5**alpha)
    torch.testing.assert_close(forced, base * 0.5**alpha)
    torch.testing.assert_close(applied, base)


@pytest.mark.parametrize("name", ["frequency", "ean", "man", "msan"])
def test_gate_free_members_ignore_the_gate(name):
    for gate in U.GATES:
        s = METHODS[name](gate=gate).score(stats(True, softmax_scale=0.5, renorm_scale=2.0))[0]
        assert s.tolist() == pytest.approx(EXPECTED[name])


def test_reference_gate_without_meta_is_a_clear_error():
    st = stats()
    del st.meta["norm_topk_prob"]
    with pytest.raises(ValueError, match=r"norm_topk_prob.*re-run observe.*gate='applied'"):
        U.REAP().score(st)
    assert U.REAP(gate="applied").score(st)[0].tolist() == pytest.approx(EXPECTED["reap"])
    assert U.MAN().score(st)[0].tolist() == pytest.approx(EXPECTED["man"])  # gate-free: no meta needed


def test_bad_options_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"gate='softmax_topk'.*'reference', 'applied'"):
        U.REAP(gate="softmax_topk")
    with pytest.raises(ValueError, match=r"guard_stat='max'.*'signed', 'abs'"):
        U.Unified(guard_stat="max")


def test_guard_stat_signed_default_and_abs_option():
    """A large NEGATIVE activation is a super expert only for guard_stat='abs' (REAP uses the signed max)."""
    st = stats()
    for li in (0, 1):
        st.layers[li]["max_act_signed"] = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
        st.layers[li]["max_act"] = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    st.layers[0]["max_act"][2] = 40.0  # |f| large, signed max small: expert 2 has a large negative entry
    signed = U.super_expert_mask(st, quantile=0.5, layer_frac=1.0)
    absolute = U.super_expert_mask(st, quantile=0.5, layer_frac=1.0, stat="abs")
    assert not signed[0].any() and absolute[0].tolist() == [False, False, True, False]
    kept = U.MAN(preserve_super_experts=True, guard_stat="abs", guard_quantile=0.5, guard_layer_frac=1.0)
    assert kept.plan(st, Target(expert_sparsity=0.75, min_keep=1)).keep()[0] == [2]


def test_one_table_registers_every_member_as_a_frozen_config():
    import dataclasses

    assert [row[0] for row in U.MEMBERS] == list(EXPECTED)
    for name, cls_name, triple, doc in U.MEMBERS:
        cls = METHODS[name]
        assert cls is getattr(U, cls_name) and cls.TRIPLE == triple and cls.__doc__ == doc
        assert cls.name == name and issubclass(cls, U._UnifiedBase)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().gate = "applied"


class _Bank:
    """The two router facts the routed accumulator reads from an ExpertBank."""

    num_experts, router_width, score = 3, 4, "softmax"

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1)[:, :3]


def test_reference_gate_sums_by_hand():
    """3 experts + 1 identity (zero) expert, top-2, token 2 is padding. softmax(log w) = w / sum w."""
    from moeprune.observe.accumulators import RoutedAccumulator
    from moeprune.observe.record import MoERecord

    logits = torch.tensor([[1.0, 2, 3, 4], [4, 1, 1, 4], [1, 1, 1, 1]]).log()  # p: [.1 .2 .3 .4], [.4 .1 .1 .4]
    idx = torch.tensor([[2, 1], [0, 3], [0, 1]])  # token 1's second slot is the zero expert
    f = torch.tensor([[3.0, -4], [-6, -1], [0, 2], [1, 1], [100, 0], [0, 100]])  # [T*k, H] slot outputs
    rec = MoERecord(0, _Bank(), logits, idx, torch.full((3, 2), 0.5), torch.zeros(3, 2),
                    torch.tensor([True, True, False]), torch.zeros(3, dtype=torch.long), 1, 0, slot_out=f)
    acc = RoutedAccumulator(3)
    acc.update(rec)
    r = acc.result()
    n1 = math.sqrt(37)  # ||(-6, -1)||
    # token 0 renorm over {2, 1}: .3/.5, .2/.5; token 1 over {0, zero expert}: .4/.8 (zero expert not an expert)
    want = {"softmax_gate_sum": [0.4, 0.2, 0.3], "softmax_gate_norm_sum": [0.8, 0.2 * n1, 1.5],
            "softmax_gate_norm_sq_sum": [0.64, 0.04 * 37, 2.25], "renorm_gate_sum": [0.5, 0.4, 0.6],
            "renorm_gate_norm_sum": [1.0, 0.4 * n1, 3.0], "renorm_gate_norm_sq_sum": [1.0, 0.16 * 37, 9.0],
            "max_act_signed": [2.0, 0.0, 3.0],  # expert 1's largest element is -1: floored at 0
            "max_act": [2.0, 6.0, 4.0], "count": [1.0, 1.0, 1.0], "gate_sum": [0.5, 0.5, 0.5]}
    for name, v in want.items():
        # float32 softmax of the logs: ~1e-7 relative, the float64 sums keep it
        torch.testing.assert_close(r[name], torch.tensor(v, dtype=torch.float64), rtol=1e-6, atol=1e-7,
                                   msg=name)
