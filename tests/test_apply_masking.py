"""mask_experts: never routes to pruned experts, restores the model bit for bit."""
from __future__ import annotations

import inspect

import pytest
import torch

from moeprune.apply import mask_experts
from moeprune.apply.experts import moe_blocks
from moeprune.arch.structure import get_experts
from moeprune.testing import example_plan

CORE = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe")  # also run in bf16


def _id(v) -> str:
    return str(v).removeprefix("torch.")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def _capture_ids(model):
    """Hooks recording the expert ids each experts module is actually called with."""
    seen, handles = {}, []
    for li, block in moe_blocks(model).items():
        ex = get_experts(block)
        f = getattr(type(ex).forward, "__wrapped__", type(ex).forward)
        sig = inspect.signature(f)

        def pre(mod, args, kwargs, _li=li, _sig=sig):
            idx = list(_sig.bind(mod, *args, **kwargs).arguments.values())[2]
            seen.setdefault(_li, set()).update(idx.reshape(-1).tolist())

        handles.append(ex.register_forward_pre_hook(pre, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("arch,dtype", [(a, torch.float32) for a in (
    "mixtral", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "minimax_m2", "afmoe", "gemma4_text", "kolibri1",
    "inkling_text")] + [(a, torch.bfloat16) for a in CORE], ids=_id)
def test_pruned_experts_never_selected(arch, dtype, tiny_cache, input_ids):
    model = tiny_cache(arch, dtype)
    plan = example_plan(model)
    seen, handles = _capture_ids(model)
    try:
        with torch.no_grad(), mask_experts(model, plan):
            model(input_ids=torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(plan.layers)
    for li, ids in seen.items():
        assert ids <= set(plan.layers[li].keep), (li, ids - set(plan.layers[li].keep))
        assert len(ids) >= 2  # the kept experts are still used


def test_longcat_zero_experts_stay_routable(tiny_cache):
    model = tiny_cache("longcat_flash")  # 8 real + 2 zero-compute (identity) experts
    plan = {li: [0, 1, 2] for li in moe_blocks(model)}
    seen, handles = _capture_ids(model)
    try:
        with torch.no_grad(), mask_experts(model, plan):
            model(input_ids=torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(1)))
    finally:
        for h in handles:
            h.remove()
    for ids in seen.values():
        assert ids <= {0, 1, 2, 8, 9} and ids & {8, 9}  # zero experts 8, 9 still chosen


@pytest.mark.parametrize("arch,dtype", [(a, torch.float32) for a in (
    "deepseek_v3", "afmoe", "ernie4_5_moe", "gpt_oss", "dbrx", "gemma4_text")] + [(a, torch.bfloat16) for a in CORE],
    ids=_id)
def test_restores_exactly(arch, dtype, tiny_cache, input_ids):
    model = tiny_cache(arch, dtype)
    plan = example_plan(model, neurons=True)  # biases set to -inf and channels zeroed inside
    before = _state(model)
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
    with torch.no_grad(), mask_experts(model, plan):
        inside = model(input_ids=input_ids).logits
    with torch.no_grad():
        after = model(input_ids=input_ids).logits
    assert not torch.equal(base, inside)
    assert torch.equal(base, after)
    _assert_same(model, before)
    assert not any(h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_restores_after_exception(tiny_cache, input_ids):
    model = tiny_cache("deepseek_v3")
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), mask_experts(model, example_plan(model, neurons=True)):
        raise RuntimeError("boom")
    _assert_same(model, before)
    assert not any(h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))
    with pytest.raises(ValueError, match="not an MoE layer"), mask_experts(model, {0: [0, 1]}):
        pass  # a bad plan changes nothing either
    _assert_same(model, before)
