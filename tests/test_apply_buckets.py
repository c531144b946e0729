"""Ragged neuron plans stored in width buckets: bucket choice, equivalence with pad+zero, reload, memory."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
import transformers

from moeprune.apply import apply_plan, load_pruned, mask_experts, save_pruned
from moeprune.apply.buckets import BUCKET_FAMILIES, plan_buckets
from moeprune.apply.experts import moe_blocks
from moeprune.apply.streaming import rewrite_checkpoint
from moeprune.arch.buckets import BucketedExperts
from moeprune.arch.structure import iter_moe_blocks, num_experts_of
from moeprune.arch.tiny import INTER, H
from moeprune.plan import LayerPlan, PruningPlan
from moeprune.testing import logits as _logits
from moeprune.testing import state_dicts_equal as _sd_equal

CORE = sorted(BUCKET_FAMILIES)
DROP = (0, 4)  # one expert per DeepSeek-V3 router group of 4: group-limited routing stays exact
WIDTHS = [32, 8, 16, 24, 8, 32, 16, 8]  # per expert, multiples of ALIGN=8 (as TENP's channel_multiple)




def _plan(model, drop: tuple[int, ...] = ()) -> PruningPlan:
    """A TENP-like plan: every layer keeps the experts not in ``drop`` with ragged widths ``WIDTHS`` of
    random channels (original ids), so the pad layout stays full width (experts 0 and 5 keep all 32)."""
    g = torch.Generator().manual_seed(0)
    layers = {}
    for li, _, block in iter_moe_blocks(model):
        n = num_experts_of(block)
        keep = tuple(e for e in range(n) if e not in drop)
        neurons = {e: tuple(sorted(torch.randperm(INTER, generator=g)[: WIDTHS[e]].tolist())) for e in keep}
        layers[li] = LayerPlan(num_experts=n, keep=keep, neurons=neurons)
    return PruningPlan(layers=layers, method="test", model_type=model.config.model_type)


def _brute_force_channels(need: list[int], max_buckets: int) -> int:
    """Oracle: the fewest stored channels over every choice of <= max_buckets bucket widths (the widest
    need must be one of them; each expert goes to the narrowest bucket that fits)."""
    vals = sorted(set(need))
    best = None
    for r in range(1, max_buckets + 1):
        for ws in itertools.combinations(vals, r):
            if ws[-1] != vals[-1]:
                continue
            c = sum(min(w for w in ws if w >= v) for v in need)
            best = c if best is None else min(best, c)
    return best


def test_plan_buckets_hand_case():
    # needs after rounding to 8: [32, 8, 8, 16, 32, 8]; 2 buckets: {8,8,8} + {16,32,32} stores 24 + 96 = 120
    # channels; {8,8,8,16} + {32,32} would store 4*16 + 64 = 128
    widths, members = plan_buckets([32, 8, 8, 12, 30, 3], 32, max_buckets=2)
    assert widths == [8, 32] and members == [[1, 2, 5], [0, 3, 4]]
    widths, members = plan_buckets([32, 8, 8, 12, 30, 3], 32, max_buckets=4)
    assert widths == [8, 16, 32] and members == [[1, 2, 5], [3], [0, 4]]  # 3 distinct needs: no padding
    with pytest.raises(ValueError, match="max_buckets=0"):
        plan_buckets([8], 32, max_buckets=0)


@pytest.mark.parametrize("seed", range(20))
def test_plan_buckets_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    live = torch.randint(1, 65, (12,), generator=g).tolist()
    for b in (1, 2, 3):
        widths, members = plan_buckets(live, 64, max_buckets=b)
        need = [-(-v // 8) * 8 for v in live]
        assert sorted(e for m in members for e in m) == list(range(12)) and len(widths) <= b
        assert all(need[e] <= w for w, m in zip(widths, members) for e in m)
        stored = sum(w * len(m) for w, m in zip(widths, members))
        assert stored == _brute_force_channels(need, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("arch", CORE)
def test_bucketed_equals_pad_and_masked(arch, impl, dtype, tiny_cache, input_ids):
    model = copy.deepcopy(tiny_cache(arch, dtype))
    model.set_experts_implementation(impl)
    plan = _plan(model, drop=DROP)
    pad = apply_plan(copy.deepcopy(model), plan, ragged="pad")
    bucketed = apply_plan(copy.deepcopy(model), plan)
    assert all(isinstance(b.experts, BucketedExperts) for b in moe_blocks(bucketed).values())
    out, ref = _logits(bucketed, input_ids), _logits(pad, input_ids)
    # Same family forward per bucket, but the bucket matmuls reduce over w_b channels instead of the
    # padded width's (zero tail): BLAS may block the reduction differently, so fp32 agrees to round-off
    # (observed 1.4e-6 on logits ~5); in bf16 such a difference can flip one rounding of an activation,
    # which three layers amplify to a few bf16 ulps of a logit (ulp 0.03 at |logit| ~ 5).
    tol = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    if dtype == torch.float32:  # and the pad model equals the original with pruned experts/channels masked
        with mask_experts(model, plan):
            torch.testing.assert_close(out, _logits(model, input_ids), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", CORE)
def test_bucketed_layer_equals_pad_layer(arch, dtype, tiny_cache):
    """One experts module on the same inputs: the per-token maths of every bucket is the family's."""
    model = tiny_cache(arch, dtype)
    plan = _plan(model)
    li = min(plan.layers)
    pad = moe_blocks(apply_plan(copy.deepcopy(model), plan, ragged="pad"))[li].experts
    bucketed = moe_blocks(apply_plan(copy.deepcopy(model), plan))[li].experts
    assert bucketed.widths == [8, 16, 24, 32] and bucketed.members == [[1, 4, 7], [2, 6], [3], [0, 5]]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])  # [T, 2] distinct ids
    w = torch.rand(40, 2, generator=g).to(dtype)
    with torch.no_grad():
        a, b = bucketed(x, idx, w), pad(x, idx, w)
    # fp32: reduction-order round-off only; bf16: at most a rounding flip of the bf16 output (2^-8 relative)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2**-7}
    torch.testing.assert_close(a, b, **tol)


def _routed_numel(model) -> int:
    return sum(p.numel() for b in moe_blocks(model).values() for p in b.experts.parameters())


def _disk_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@pytest.mark.parametrize("arch", CORE)
def test_save_reload_identical_and_memory_matches_plan(arch, tiny_cache, input_ids, tmp_path):
    model = tiny_cache(arch)
    plan = _plan(model, drop=DROP)
    pruned = apply_plan(copy.deepcopy(model), plan)
    out = _logits(pruned, input_ids)
    path = save_pruned(pruned, tmp_path / "b", plan=plan)
    rec = json.loads((Path(path) / "config.json").read_text())["moe_pruning"]
    assert {int(k) for k in rec["buckets"]} == set(plan.layers)
    loaded = load_pruned(path)
    remote = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    for m in (loaded, remote):
        assert _sd_equal(m, pruned)
        torch.testing.assert_close(_logits(m, input_ids), out, atol=0, rtol=0)  # same weights, same code
    with pytest.raises(RuntimeError, match="(?i)mismatch"):  # never silently re-initialised
        transformers.AutoModelForCausalLM.from_pretrained(path)

    # memory: the plan keeps sum_e width_e channels of 3*H weights (gate, up, down) per kept expert
    kept = sum(len(ch) * 3 * H for lp in plan.layers.values() for ch in lp.neurons.values())
    assert _routed_numel(loaded) == kept  # widths are multiples of 8 and <= 4 distinct: no padding
    pad = load_pruned(save_pruned(apply_plan(copy.deepcopy(model), plan, ragged="pad"), tmp_path / "p"))
    assert _routed_numel(pad) == len(plan.layers) * 6 * INTER * 3 * H > kept  # the pad layout: all full width
    # on disk: fp32 parameters after loading, plus the safetensors headers (under 3% even at this tiny size)
    numel = sum(p.numel() for p in loaded.parameters())
    assert 4 * numel <= _disk_bytes(path) < 1.03 * 4 * numel


def test_unsupported_family_errors_and_auto_falls_back(tiny_cache, tmp_path):
    model = tiny_cache("gpt_oss")
    plan = _plan(model)
    with pytest.raises(NotImplementedError, match="gpt_oss.*ragged='pad'"):
        apply_plan(copy.deepcopy(model), plan, ragged="buckets")
    pruned = apply_plan(copy.deepcopy(model), plan)  # auto: pad + zero for families without buckets
    assert not any(isinstance(b.experts, BucketedExperts) for b in moe_blocks(pruned).values())
    with pytest.raises(ValueError, match="ragged='spread'"):
        apply_plan(copy.deepcopy(model), plan, ragged="spread")


def test_bucketed_model_refuses_further_pruning(tiny_cache):
    model = tiny_cache("qwen3_moe")
    pruned = apply_plan(copy.deepcopy(model), _plan(model))
    with pytest.raises(ValueError, match="width buckets"):
        apply_plan(pruned, _plan(model))


def test_streaming_refuses_buckets_and_warns(tiny_cache, tmp_path):
    src = tmp_path / "src"
    tiny_cache("qwen3_moe").save_pretrained(src)
    plan = _plan(tiny_cache("qwen3_moe"))
    with pytest.raises(NotImplementedError, match="--streaming.*in memory"):
        rewrite_checkpoint(src, plan, tmp_path / "o1", ragged="buckets", progress=False)
    with pytest.warns(UserWarning, match="--streaming.*pad layout"):
        rewrite_checkpoint(src, plan, tmp_path / "o2", progress=False)
