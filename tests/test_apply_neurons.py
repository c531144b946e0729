"""Neuron (intermediate channel) pruning: ragged plans equal the zeroed-channel model, and reload."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from moeprune.apply import apply_plan, load_pruned, mask_experts, prune_neurons_, save_pruned
from moeprune.apply.config import finalize_config, get_record, is_per_layer
from moeprune.apply.experts import moe_blocks
from moeprune.apply.neurons import neuron_index
from moeprune.arch.structure import intermediate_size_of, realign_tensors_
from moeprune.arch.tiny import ALL_TINY_ARCHS
from moeprune.plan import LayerPlan, PruningPlan
from moeprune.testing import example_plan
from moeprune.testing import logits as _logits
from moeprune.testing import state_dicts_equal as _sd_equal


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_ragged_neurons_equal_zeroed_and_reload(arch, tiny_cache, input_ids, tmp_path):
    dtype, atol = (torch.float64, 1e-9) if arch == "dbrx" else (torch.float32, 1e-4)
    model = tiny_cache(arch, dtype)
    plan = example_plan(model, neurons=True)  # experts AND ragged channels, original ids
    with mask_experts(model, plan):  # reference: pruned experts masked, removed channels zeroed
        ref = _logits(model, input_ids)
    pruned = apply_plan(copy.deepcopy(model), plan, ragged="pad")  # the pad+zero layout (buckets: test_apply_buckets)
    out = _logits(pruned, input_ids)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    rec = get_record(pruned)
    for li, block in moe_blocks(pruned).items():
        widths = [len(v) for _, v in sorted(plan.layers[li].neurons.items())]
        assert intermediate_size_of(block) == -(-max(widths) // 8) * 8  # rounded up to 8 channels
        assert rec["neurons"][str(li)]["live"] == widths
    loaded = load_pruned(save_pruned(pruned, tmp_path / "n", plan=plan))
    assert _sd_equal(loaded, pruned)
    torch.testing.assert_close(_logits(loaded, input_ids), out, atol=0, rtol=0)


def test_sliced_expert_matches_hand_computation(fresh_tiny):
    model = fresh_tiny("mixtral")
    ex = moe_blocks(model)[0].experts
    gu, down = ex.gate_up_proj[3].clone(), ex.down_proj[3].clone()  # [2I, H], [H, I]
    keep = [1, 4, 5, 9, 20, 31]
    others = {e: list(range(e, 32, 4)) for e in range(8) if e != 3}  # 8 channels each
    prune_neurons_(model, {0: {3: keep, **others}})
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    inter = 32
    h = F.silu(x @ gu[keep].T) * (x @ gu[[inter + j for j in keep]].T)  # [5, 6]
    expected = h @ down[:, keep].T  # [5, H]
    with torch.no_grad():
        got = ex.forward(x, torch.full((5, 1), 3), torch.ones(5, 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert intermediate_size_of(moe_blocks(model)[0]) == 8  # sliced to the widest expert; expert 3 has 2 dead
    assert ex.down_proj.shape == (8, 64, 8) and ex.gate_up_proj.shape == (8, 16, 64)


@pytest.mark.parametrize(("arch", "mode"), [("mixtral", "global"), ("gpt_oss", "global"), ("deepseek_v3", "per_layer"),
                                            ("llama4_text", "per_layer")])
def test_uniform_neurons_config(arch, mode, fresh_tiny, input_ids, tmp_path):
    """Uniform widths go into the global intermediate field unless it also sizes shared MLPs."""
    model = fresh_tiny(arch)
    keep = {li: {e: list(range(0, 32, 2)) for e in range(8)} for li in moe_blocks(model)}
    prune_neurons_(model, keep)
    assert finalize_config(model) == mode
    assert is_per_layer(model) == (mode == "per_layer")
    path = save_pruned(model, tmp_path / "u")
    if mode == "global":
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values())
        # plain loading keeps the 8-byte-aligned safetensors memory map: kernels chosen by alignment may
        # round differently (fp32 round-off); realigned like load_pruned does, the bits must agree
        torch.testing.assert_close(_logits(loaded, input_ids), _logits(model, input_ids), atol=1e-4, rtol=1e-4)
        realign_tensors_(loaded)
    else:
        loaded = load_pruned(path)
        with pytest.raises(Exception, match="(?i)mismatch|size"):
            transformers.AutoModelForCausalLM.from_pretrained(path)
    assert _sd_equal(loaded, model)
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(model, input_ids), atol=0, rtol=0)


def test_neuron_plan_errors(fresh_tiny):
    model = fresh_tiny("mixtral")
    with pytest.raises(ValueError, match="keeps no channel"):
        prune_neurons_(model, {0: {1: []}})
    with pytest.raises(ValueError, match="not one of the layer's experts"):
        prune_neurons_(model, {0: {8: [0, 1]}})
    assert intermediate_size_of(moe_blocks(model)[0]) == 32


def test_odd_widths_are_aligned_for_grouped_mm(tiny_cache, input_ids):
    """grouped_mm rejects rows that are not 16-byte aligned: 5 kept channels become 8 (3 dead)."""
    model = tiny_cache("mixtral", torch.bfloat16)
    keep = {li: {e: list(range(e, e + 5)) for e in range(8)} for li in moe_blocks(model)}
    plan = PruningPlan(layers={li: LayerPlan(num_experts=8, keep=tuple(range(8)), neurons=per)
                               for li, per in keep.items()})
    with mask_experts(model, plan):
        ref = _logits(model, input_ids)
    pruned = prune_neurons_(copy.deepcopy(model), keep)
    assert pruned.config._experts_implementation == "grouped_mm"
    assert all(intermediate_size_of(b) == 8 for b in moe_blocks(pruned).values())
    torch.testing.assert_close(_logits(pruned, input_ids), ref, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="16 bytes"):  # why align exists
        _logits(prune_neurons_(copy.deepcopy(model), keep, align=1), input_ids)


def test_neuron_index_pads_with_lowest_removed_channels():
    """The one width/padding rule (in-memory and streaming apply), by hand: I = 10 channels."""
    rows = [[1, 4, 7], [0, 2, 3, 5, 6], list(range(10))[:2]]
    idx, dead = neuron_index(rows, 10, align=1)  # widest = 5
    assert idx.tolist() == [[1, 4, 7, 0, 2], [0, 2, 3, 5, 6], [0, 1, 2, 3, 4]]
    assert dead.tolist() == [[False] * 3 + [True] * 2, [False] * 5, [False] * 2 + [True] * 3]
    idx, dead = neuron_index(rows, 10, align=4)  # 5 -> 8 channels
    assert idx.tolist()[0] == [1, 4, 7, 0, 2, 3, 5, 6] and dead.sum(1).tolist() == [5, 3, 6]
    idx, _ = neuron_index(rows, 10)  # ALIGN = 8 rounds 5 up to 8, never past I
    assert idx.shape == (3, 8) and neuron_index([list(range(9))], 10)[0].shape == (1, 10)
