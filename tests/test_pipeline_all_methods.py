"""Every registered method, end to end on real statistics of tiny models: observe -> plan -> apply.

deepseek_v3: sigmoid router, selection bias, groups; qwen2_moe: gated shared expert; longcat_flash: identity
(zero-compute) experts after the real ones. The plan must apply without changing routing semantics
(group-limited routers keep balanced groups, ``regroup="error"``), and the pruned model must equal the
original with the plan simulated by router masking.
"""
from __future__ import annotations

import copy

import pytest
import torch

from moeprune.apply import apply_plan, mask_experts
from moeprune.arch.tiny import tiny_model
from moeprune.methods import METHODS, Target, get_method
from moeprune.observe import observe

ARCHS = ("deepseek_v3", "qwen2_moe", "longcat_flash")
OPTIONS = {"naee": {"max_combinations": 100}, "tenp": {"channel_multiple": 8}}


@pytest.fixture(scope="module")
def observed():
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(3, 250, (4, 16), generator=g),
                    "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(8)]
        feats = sorted({f for cls in METHODS.values() for f in cls.needs})
        out[arch] = (model, observe(model, batches, features=feats, progress=False))
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_plan_applies_exactly(observed, arch, name):
    model, stats = observed[arch]
    method = get_method(name, **OPTIONS.get(name, {}))
    target = Target(param_ratio=0.75) if name == "tenp" else Target(expert_sparsity=0.25, allocation="method")
    plan = method.plan(stats, target)
    assert plan.method == name and set(plan.layers) == set(stats.moe_layers)
    for li, lp in plan.layers.items():
        assert len(lp.keep) >= int(stats.meta["top_k"][str(li)])
    x = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mask_experts(model, plan):
        ref = model(input_ids=x).logits
    pruned = apply_plan(copy.deepcopy(model), plan, regroup="error")  # unbalanced groups would raise
    with torch.no_grad():
        out = pruned(input_ids=x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    if name == "naee":  # the routing simulation reproduces the router exactly (selection bias, groups, scale)
        assert max(plan.meta["recon_fidelity"].values()) < 1e-6
