"""Layer-wise calibration equals the full pass, keeps one decoder layer in memory, and resumes."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from moeprune.models import load_layerwise_model
from moeprune.observe import observe, observe_layerwise

FEATS = ("routed", "direction", "neurons", "transitions", "paths", "cluster", "reconstruction")


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return [{"input_ids": ids, "attention_mask": mask}, torch.randint(3, 250, (1, 7), generator=g)]


def _assert_same(a, b, tol=0.0):
    assert a.moe_layers == b.moe_layers and a.meta["num_tokens"] == b.meta["num_tokens"]
    for li in a.moe_layers:
        assert set(a[li]) == set(b[li])
        for name, t in a[li].items():
            torch.testing.assert_close(b[li][name], t, rtol=tol, atol=tol, msg=f"L{li} {name}")


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_layerwise_equals_full_pass(arch, tiny_cache):
    """gpt_oss alternates sliding/full attention: per-layer kwargs must be the model's own."""
    model = tiny_cache(arch)
    full = observe(model, _batches(), features=FEATS, progress=False)
    _assert_same(full, observe_layerwise(model, _batches(), features=FEATS, progress=False))


def _resident_counter(layers):
    """Forward pre-hooks recording, at every decoder layer's attention, how many layers hold real weights."""
    resident = []

    def count(mod, args):
        resident.append(sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in layers))
    return resident, [lay.self_attn.register_forward_pre_hook(count) for lay in layers]


def test_lazy_model_one_layer_resident_and_equal(tiny_cache, tmp_path):
    """Mixtral stores per-expert keys: transformers' converter stacks them while a layer is read."""
    tiny_cache("mixtral").save_pretrained(tmp_path / "ckpt")
    # the reference: the full pass of from_pretrained's model, same experts kernel as the lazy one
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", experts_implementation="eager")
    full = observe(ref, _batches(), features=("routed", "transitions", "paths"), progress=False)
    lazy, _ = load_layerwise_model(str(tmp_path / "ckpt"), experts_implementation="eager")
    layers = lazy.model.layers
    assert all(p.device.type == "meta" for p in layers.parameters())  # nothing resident before the run
    resident, hooks = _resident_counter(layers)
    got = observe_layerwise(lazy, _batches(), features=("routed", "transitions", "paths"), progress=False,
                            checkpoint_dir=tmp_path / "run")
    for h in hooks:
        h.remove()
    assert resident == [1] * (len(layers) * 2)  # 3 layers x 2 batches, one layer materialised each time
    assert all(p.device.type == "meta" for p in layers.parameters())  # released again afterwards
    _assert_same(full, got)


def test_interrupted_run_resumes_after_last_committed_layer(fresh_tiny, tmp_path):
    model = fresh_tiny("qwen3_moe")  # MoE layers 1 and 2 (layer 0 is dense)
    feats = ("routed", "transitions", "reconstruction")
    full = observe(model, _batches(), features=feats, progress=False)
    layers = model.model.layers

    def fail(mod, args):
        raise RuntimeError("interrupted")
    h = layers[2].mlp.register_forward_pre_hook(fail)  # layers 0 and 1 complete, layer 2 dies
    with pytest.raises(RuntimeError, match="interrupted"):
        observe_layerwise(model, _batches(), features=feats, progress=False, checkpoint_dir=tmp_path)
    h.remove()
    assert json.loads((tmp_path / "progress.json").read_text())["next_layer"] == 2
    assert (tmp_path / "acts_2").is_dir() and not (tmp_path / "acts_1").exists()
    calls = [0, 0, 0]
    hooks = [lay.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, lay in enumerate(layers)]
    resumed = observe_layerwise(model, _batches(), features=feats, progress=False, checkpoint_dir=tmp_path)
    for hk in hooks:
        hk.remove()
    assert calls == [0, 0, 2]  # only the missing layer ran, once per batch
    _assert_same(full, resumed)
    assert json.loads((tmp_path / "progress.json").read_text())["next_layer"] == 3
    with pytest.raises(ValueError, match="another model/data/features"):
        observe_layerwise(model, _batches(seed=1), features=feats, progress=False, checkpoint_dir=tmp_path)
    again = observe_layerwise(model, _batches(seed=1), features=feats, progress=False, checkpoint_dir=tmp_path,
                              resume=False)
    _assert_same(observe(model, _batches(seed=1), features=feats, progress=False), again)
