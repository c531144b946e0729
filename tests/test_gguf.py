"""Serving compatibility: the plan-time verdict (``moeprune.serving``) and, as slow integration
checks, llama.cpp's converter and runtime on uniform pruned checkpoints (``benchmarks/check_gguf.py``).

The slow checks need llama.cpp's converter (``$MOEPRUNE_LLAMA_CPP``) and a python with llama-cpp-python
(``$MOEPRUNE_LLAMA_PYTHON``); without them they skip, naming the setup (an optional integration check).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest

from moeprune.apply import apply_plan
from moeprune.apply.config import is_per_layer
from moeprune.apply.neurons import fused_width
from moeprune.arch.tiny import TINY_ARCHS
from moeprune.plan import LayerPlan, PruningPlan
from moeprune.serving import card_lines, transformers_only_reasons, warn_if_transformers_only
from moeprune.testing import example_plan

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("check_gguf", ROOT / "benchmarks" / "check_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plan(counts: list[int], widths: list[list[int]] | None = None, n: int = 8, inter: int = 32) -> PruningPlan:
    layers = {}
    for li, c in enumerate(counts):
        keep = tuple(range(c))
        neurons = {e: tuple(range(widths[li][e])) for e in keep} if widths else None
        layers[li] = LayerPlan(num_experts=n, keep=keep, neurons=neurons, intermediate_size=inter)
    return PruningPlan(layers=layers, method="hand")


def test_fused_width_hand_cases():
    assert fused_width([5, 9], 32) == 16   # widest 9 -> next multiple of 8
    assert fused_width([30, 2], 32) == 32  # rounding capped at the original width
    assert fused_width([8], None) == 8


def test_uniform_plan_loads_everywhere(caplog):
    plan = _plan([4, 4, 4])
    with caplog.at_level(logging.WARNING, logger="moeprune"):
        assert warn_if_transformers_only(plan) == []
    assert not caplog.records
    assert "llama.cpp" in "\n".join(card_lines(plan)) and "transformers only" not in "\n".join(card_lines(plan))


def test_non_uniform_plan_warns_and_offers_uniform(caplog):
    plan = _plan([6, 4, 4])
    with caplog.at_level(logging.WARNING, logger="moeprune"):
        reasons = warn_if_transformers_only(plan)
    assert reasons == ["kept experts differ across layers (4 to 6 per layer)"]
    msg = caplog.records[-1].getMessage()
    assert "allocation: uniform" in msg and "load_pruned" in msg and "trust_remote_code" in msg
    assert "transformers only" in "\n".join(card_lines(plan))


def test_neuron_widths():
    ragged_same = _plan([2, 2], [[20, 13], [17, 24]])   # both layers fuse to 24 channels
    assert transformers_only_reasons(ragged_same) == []
    differ = _plan([2, 2], [[20, 13], [8, 5]])          # 24 vs 8
    assert transformers_only_reasons(differ) == ["expert widths differ across layers (24, 8 channels)"]
    partly = _plan([2, 2], [[32, 31], [8, 5]])          # 32 = unchanged ("full") vs 8
    assert transformers_only_reasons(partly) == ["expert widths differ across layers (8, full channels)"]


VERDICT_CASES = ([(a, k) for a in ("qwen3_moe", "deepseek_v3") for k in ("non_uniform", "non_uniform_neurons")]
                 + [(a, k) for a in TINY_ARCHS for k in ("uniform", "uniform_neurons")])


@pytest.mark.parametrize("arch,kind", VERDICT_CASES)
def test_plan_verdict_matches_saved_config(tiny_cache, arch, kind):
    """The plan-time verdict equals what apply writes: per-layer config iff reasons were given."""
    model = copy.deepcopy(tiny_cache(arch))
    plan = example_plan(model, uniform=kind.startswith("uniform"), neurons=kind.endswith("neurons"))
    reasons = transformers_only_reasons(plan)
    apply_plan(model, plan)
    assert is_per_layer(model) == bool(reasons), (reasons, model.config.moe_pruning)


# ---- slow: llama.cpp converter and runtime ------------------------------------------------------

def _llama_or_skip(module: str):
    h = _harness()
    try:
        return h, h.llama_dir(), h.llama_python(module=module)
    except FileNotFoundError as e:
        pytest.skip(f"optional llama.cpp integration check not set up: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["save_pruned", "streaming"])
@pytest.mark.parametrize("outtype", ["f32", "bf16"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe"])
def test_uniform_checkpoint_converts_and_runs_in_llama_cpp(tmp_path, arch, outtype, writer):
    h, llama, python = _llama_or_skip("llama_cpp")
    row = h.check_family(arch, tmp_path, outtype, llama, python, writer=writer)
    assert row["status"] == "ok", row
    assert row["expert_count"] == 4 and row["router_max_abs_diff"] == 0.0, row
    # f32: same weights, float32 op order only; bf16: see RTOL in the harness.
    assert row["max_rel_diff"] <= h.RTOL[outtype], row
    if outtype == "f32":
        assert row["greedy_agree"] == 1.0, row


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["save_pruned", "streaming"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_uniform_checkpoint_converts_to_gguf(tmp_path, arch, writer):
    """Converter only (no llama.cpp runtime): expert_count, expert tensor shapes and router rows, for
    the in-memory writer and the out-of-core shard rewriter."""
    h, llama, python = _llama_or_skip("torch")
    row = h.check_family(arch, tmp_path, "f32", llama, python, no_run=True, writer=writer)
    assert row["status"] == "converted", row
    assert row["expert_count"] == 4 and row["router_max_abs_diff"] == 0.0, row
