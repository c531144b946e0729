"""Structural expert pruning == router masking, for every supported family; plan refusals."""
from __future__ import annotations

import copy

import pytest
import torch

from moeprune.apply import apply_plan, mask_experts, prune_experts_
from moeprune.apply.config import get_record
from moeprune.apply.experts import moe_blocks
from moeprune.arch.structure import current_top_k, group_info, num_experts_of
from moeprune.arch.tiny import ALL_TINY_ARCHS
from moeprune.plan import LayerPlan, PruningPlan
from moeprune.testing import example_plan
from moeprune.testing import logits as _logits

CORE = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe")


@pytest.mark.parametrize("arch,bf16", [(a, False) for a in ALL_TINY_ARCHS] + [(a, True) for a in CORE],
                         ids=lambda v: {False: "full", True: "bf16"}.get(v, v) if isinstance(v, bool) else v)
def test_pruned_equals_masked(arch, bf16, tiny_cache, input_ids):
    # DBRX amplifies fp32 round-off (up to ~5e-4 in the prototype): compare it in fp64 (eager code).
    dtype, atol = (torch.float64, 1e-9) if arch == "dbrx" else (torch.float32, 1e-4)
    model = tiny_cache(arch, torch.bfloat16 if bf16 else dtype)
    plan = example_plan(model)
    assert len(set(plan.kept_counts().values())) > 1 or len(plan.layers) == 1  # non-uniform where possible
    base = _logits(model, input_ids)
    with mask_experts(model, plan):
        ref = _logits(model, input_ids)
    if bf16:
        # The kept experts run the same kernels on the same rows, so pruned == masked is bitwise on the
        # development CPU (measured for every CORE family). Not promised across CPUs: the router GEMM and
        # softmax over E' instead of E columns may round differently elsewhere, and one bf16 ulp in a gate
        # propagates through the layers; allow 2 bf16 ulps (2**-6 relative) of the largest logit.
        atol = 2.0 ** -6 * float(ref.abs().max())
    assert (ref - base).abs().max() > max(1e-3, 4 * atol)  # the plan really changes the routing
    pruned = apply_plan(copy.deepcopy(model), plan)
    out = _logits(pruned, input_ids)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    for li, block in moe_blocks(pruned).items():
        assert num_experts_of(block) == len(plan.layers[li].keep)
    rec = get_record(pruned)
    assert rec["kept_experts"] == {str(li): list(lp.keep) for li, lp in plan.layers.items()}


def test_group_balance_kept_and_fallback(fresh_tiny, input_ids):
    model = fresh_tiny("deepseek_v3")  # n_group=2 (groups of 4), topk_group=1
    li = min(moe_blocks(model))
    whole_group = {li: [4, 5, 6, 7]}  # drop group 0 entirely: n_group 2 -> 1, exact
    with mask_experts(model, whole_group):
        ref = _logits(model, input_ids)
    m1 = prune_experts_(copy.deepcopy(model), whole_group, regroup="error")
    assert group_info(moe_blocks(m1)[li]) == (1, 1)
    torch.testing.assert_close(_logits(m1, input_ids), ref, atol=1e-5, rtol=0)

    unbalanced = {li: [0, 1, 2, 4, 5]}  # 3 + 2 per group
    with pytest.raises(ValueError, match=r"unbalanced.*regroup='auto'"):
        prune_experts_(model, unbalanced, regroup="error")
    assert num_experts_of(moe_blocks(model)[li]) == 8  # refused before any change
    with pytest.warns(UserWarning, match="n_group=topk_group=1"):
        m2 = prune_experts_(copy.deepcopy(model), unbalanced)
    assert group_info(moe_blocks(m2)[li]) == (1, 1)
    # the fallback equals the masked original run with plain top-k routing
    ref_model = copy.deepcopy(model)
    moe_blocks(ref_model)[li].gate.num_group = 1
    moe_blocks(ref_model)[li].gate.topk_group = 1
    with mask_experts(ref_model, unbalanced):
        ref2 = _logits(ref_model, input_ids)
    torch.testing.assert_close(_logits(m2, input_ids), ref2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "phimoe", "llama4_text"])
def test_refuses_fewer_than_top_k(arch, fresh_tiny):
    model = fresh_tiny(arch)
    li, block = next(iter(moe_blocks(model).items()))
    k = current_top_k(block)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ok_layer = max(moe_blocks(model))
    plan = {ok_layer: list(range(4)), li: list(range(k - 1)) or []}
    with pytest.raises(ValueError) as err:
        prune_experts_(model, plan)
    msg = str(err.value)
    assert f"layer {li}" in msg and f"keeps {k - 1} experts" in msg and f"top_k={k}" in msg
    assert f"at least {k}" in msg
    if arch == "phimoe":
        assert "top-2" in msg
    after = model.state_dict()  # nothing was pruned, not even the valid layer listed first
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert "moe_pruning" not in model.config.to_dict()


def test_bad_plans_are_refused(fresh_tiny):
    model = fresh_tiny("qwen3_moe")  # layer 0 is dense (mlp_only_layers=[0])
    with pytest.raises(ValueError, match=r"layer 0 is not an MoE layer.*\[1, 2\]"):
        prune_experts_(model, {0: [0, 1]})
    with pytest.raises(ValueError, match=r"out of range \[0, 8\)"):
        prune_experts_(model, {1: [0, 8]})
    plan = PruningPlan(layers={1: LayerPlan(num_experts=16, keep=(0, 1, 2))})
    with pytest.raises(ValueError, match="made for 16 experts, the model layer has 8"):
        apply_plan(model, plan)
    other = PruningPlan(layers={1: LayerPlan(num_experts=8, keep=(0, 1, 2))}, model_type="mixtral")
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        apply_plan(model, other)
    bad_neurons = PruningPlan(layers={1: LayerPlan(num_experts=8, keep=(0, 1, 2), neurons={1: (0, 40)})})
    with pytest.raises(ValueError, match=r"channel ids must be unique and in \[0, 32\)"):
        apply_plan(model, bad_neurons)
    assert all(num_experts_of(b) == 8 for b in moe_blocks(model).values())


def test_repeated_pruning_composes_original_ids(fresh_tiny, input_ids):
    model = fresh_tiny("olmoe")
    orig = copy.deepcopy(model)
    prune_experts_(model, {1: [1, 3, 5, 6, 7]})
    prune_experts_(model, {1: [0, 2, 4]})  # current ids -> original 1, 5, 7
    assert get_record(model)["kept_experts"]["1"] == [1, 5, 7]
    with mask_experts(orig, {1: [1, 5, 7]}):
        ref = _logits(orig, input_ids)
    torch.testing.assert_close(_logits(model, input_ids), ref, atol=1e-5, rtol=0)
