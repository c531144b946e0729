"""save_pruned / load_pruned round trips for every family; atomic writes; source protection."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers

from moeprune.apply import apply_plan, load_pruned, save_pruned
from moeprune.apply.checkpoint import PLAN_FILE, REMOTE_CODE_FILE
from moeprune.apply.config import is_per_layer
from moeprune.arch.structure import ALIGN_BYTES, realign_tensors_
from moeprune.arch.tiny import ALL_TINY_ARCHS
from moeprune.plan import PruningPlan
from moeprune.testing import example_plan
from moeprune.testing import logits as _logits
from moeprune.testing import state_dicts_equal as _sd_equal


def _clean(info):
    return not any(v for v in info.values() if isinstance(v, (list, set, dict, tuple)))


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_per_layer_roundtrip(arch, tiny_cache, input_ids, tmp_path):
    model = tiny_cache(arch)
    plan = example_plan(model)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert is_per_layer(pruned)
    out = _logits(pruned, input_ids)
    path = save_pruned(pruned, tmp_path / "ckpt", plan=plan)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    rec = cfg.get("text_config", cfg)["moe_pruning"]
    assert rec["kept_experts"] == {str(li): list(lp.keep) for li, lp in plan.layers.items()}
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned_moe.")
    assert PruningPlan.load(os.path.join(path, PLAN_FILE)).to_dict() == plan.to_dict()

    loaded, info = load_pruned(path, output_loading_info=True)
    assert _clean(info), info
    assert _sd_equal(loaded, pruned)
    torch.testing.assert_close(_logits(loaded, input_ids), out, atol=0, rtol=0)

    remote, info = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                                      output_loading_info=True)
    assert type(remote).__name__.startswith("PrunedMoE") and _clean(info), info
    assert _sd_equal(remote, pruned)
    torch.testing.assert_close(_logits(remote, input_ids), out, atol=0, rtol=0)

    with pytest.raises(RuntimeError, match="(?i)mismatch"):  # loud, never silently re-initialised
        transformers.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_uniform_plain_reload(arch, tiny_cache, input_ids, tmp_path):
    model = tiny_cache(arch)
    plan = example_plan(model, uniform=True)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        out = _logits(pruned, input_ids)
    path = save_pruned(pruned, tmp_path / "uni", plan=plan)
    if arch == "jetmoe":  # num_local_experts also sizes the attention experts (MoA): per-layer by design
        assert is_per_layer(pruned)
        loaded, info = load_pruned(path, output_loading_info=True)
    else:
        assert not is_per_layer(pruned) and not os.path.exists(os.path.join(path, REMOTE_CODE_FILE))
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert _clean(info), info
    assert _sd_equal(loaded, pruned)
    if arch != "jetmoe":
        # Plain from_pretrained keeps the safetensors memory map, 8-byte aligned: CPU GEMM kernels chosen by
        # alignment (MKL on non-AVX-512 paths) may round differently, so only fp32 round-off is promised here.
        torch.testing.assert_close(_logits(loaded, input_ids), out, atol=1e-4, rtol=1e-4)
        realign_tensors_(loaded)  # what load_pruned does: then the same kernels, the same bits
    torch.testing.assert_close(_logits(loaded, input_ids), out, atol=0, rtol=0)


def test_load_pruned_returns_aligned_tensors(tiny_cache, tmp_path):
    """Root cause of reloaded-vs-in-memory differences on some CPUs: mmapped safetensors are only
    8-byte aligned; load_pruned (and the remote code) realign every CPU tensor to 64 bytes."""
    model = tiny_cache("qwen3_moe")
    plan = example_plan(model)
    path = save_pruned(apply_plan(copy.deepcopy(model), plan), tmp_path / "c", plan=plan)
    loaded = load_pruned(path)
    assert all(t.data_ptr() % ALIGN_BYTES == 0 for t in loaded.state_dict().values())
    remote = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert all(t.data_ptr() % ALIGN_BYTES == 0 for t in remote.state_dict().values())
    plain = transformers.AutoModelForCausalLM.from_pretrained(save_pruned(
        apply_plan(copy.deepcopy(model), example_plan(model, uniform=True)), tmp_path / "u"))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    tied = plain.lm_head.weight is plain.get_input_embeddings().weight
    realign_tensors_(plain)
    assert all(t.data_ptr() % ALIGN_BYTES == 0 for t in plain.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert (plain.lm_head.weight is plain.get_input_embeddings().weight) == tied


def test_atomic_save_leaves_nothing_on_failure(fresh_tiny, tmp_path, monkeypatch):
    model = fresh_tiny("mixtral")
    real = type(model).save_pretrained

    def broken(self, folder, **kw):
        real(self, folder, **kw)  # files written, then the "disk" fails
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither the target nor a temp dir

    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tmp_path / "prev", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["prev"] and os.listdir(tmp_path / "prev") == ["keep.txt"]


def test_refuses_source_and_non_empty_dirs(fresh_tiny, tmp_path, input_ids):
    src = tmp_path / "src"
    fresh_tiny("qwen3_moe").save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    before = sorted(os.listdir(src))
    apply_plan(model, example_plan(model))
    for bad in (src, src / "pruned"):
        with pytest.raises(ValueError, match="source checkpoint"):
            save_pruned(model, bad, overwrite=True)
    assert sorted(os.listdir(src)) == before

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("1")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(model, busy)
    path = save_pruned(model, busy, overwrite=True, max_shard_size="100KB")
    assert not os.path.exists(os.path.join(path, "x"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert os.path.exists(os.path.join(path, "tokenizer.json"))  # copied from the source folder
    assert os.path.exists(os.path.join(path, "generation_config.json"))
    assert sorted(os.listdir(tmp_path)) == ["busy", "src"]
    torch.testing.assert_close(_logits(load_pruned(path), input_ids), _logits(model, input_ids), atol=0, rtol=0)
