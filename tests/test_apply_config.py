"""Config bookkeeping: global vs per-layer, and the meta-device path gives the identical config."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from moeprune.apply import apply_plan, save_pruned
from moeprune.apply.checkpoint import REMOTE_CODE_FILE, write_config
from moeprune.apply.config import finalize_config, get_record
from moeprune.arch.adapters import cfg_get, get_adapter
from moeprune.testing import example_plan


def _meta_from(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config))


@pytest.mark.parametrize(("arch", "uniform", "neurons"), [("deepseek_v3", False, True), ("mixtral", True, False),
                                                          ("jetmoe", True, False), ("dbrx", False, True),
                                                          ("gemma4_text", True, True)])
def test_meta_path_gives_identical_config(arch, uniform, neurons, tiny_cache, tmp_path):
    model = tiny_cache(arch)
    plan = example_plan(model, uniform=uniform, neurons=neurons)
    real = apply_plan(copy.deepcopy(model), plan)
    meta = apply_plan(_meta_from(model.config), plan)  # what the out-of-core shard rewriter does
    assert next(meta.parameters()).is_meta
    assert meta.config.to_dict() == real.config.to_dict()
    # the folder config written by the rewriter (config + remote code) equals save_pruned's
    save_pruned(real, tmp_path / "real")
    write_config(meta, tmp_path / "meta", dtype=torch.float32)
    for name in ("config.json", REMOTE_CODE_FILE):
        assert (tmp_path / "meta" / name).exists() == (tmp_path / "real" / name).exists()
        if (tmp_path / "real" / name).exists():
            assert (tmp_path / "meta" / name).read_bytes() == (tmp_path / "real" / name).read_bytes()


def test_global_and_per_layer_fields(fresh_tiny):
    uni = fresh_tiny("deepseek_v3")
    apply_plan(uni, example_plan(uni, uniform=True))  # 3 of 4 per group -> 6 experts, n_group kept
    assert cfg_get(uni.config, "n_routed_experts") == 6 and cfg_get(uni.config, "n_group") == 2
    rec = get_record(uni)
    assert set(rec) == {"kept_experts", "original_num_experts"} and rec["original_num_experts"] == {"1": 8, "2": 8}
    assert finalize_config(uni) == "global" and get_record(uni) == rec  # idempotent

    het = fresh_tiny("qwen3_moe")
    apply_plan(het, example_plan(het))
    rec = get_record(het)
    assert cfg_get(het.config, get_adapter(het).num_experts) == 8  # global field untouched
    assert rec["num_experts"] == {"1": 6, "2": 5}
    assert finalize_config(het) == "per_layer" and get_record(het) == rec
