"""Lazy layer loading (``observe/lazy.py``): each decoder layer read from the source safetensors equals
``from_pretrained``'s, at most one layer is materialised, nothing but activations is written, resume works."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from moeprune.arch.structure import realign_tensors_
from moeprune.arch.tiny import tiny_config, tiny_model
from moeprune.models import byte_tokenizer, load_layerwise_model
from moeprune.observe import observe, observe_layerwise
from moeprune.observe.lazy import lazy_layers

FEATS = ("routed", "transitions", "reconstruction")


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 10), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(3, 250, (1, 7), generator=g)]


def _keys(folder) -> list[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return list(f.keys())


def _assert_module_equal(got: torch.nn.Module, ref: torch.nn.Module, what: str) -> None:
    """Same names, dtypes, shapes and values (bitwise): the lazy load IS from_pretrained's conversion."""
    a = dict(got.named_parameters()) | dict(got.named_buffers())
    b = dict(ref.named_parameters()) | dict(ref.named_buffers())
    assert a.keys() == b.keys(), what
    for k, t in a.items():
        assert t.dtype == b[k].dtype and torch.equal(t, b[k]), f"{what}: {k}"


@pytest.mark.parametrize("arch,dtype", [("mixtral", torch.float32), ("qwen3_moe", torch.bfloat16),
                                        ("gpt_oss", torch.float32)])
def test_each_lazy_layer_equals_from_pretrained(arch, dtype, tiny_cache, tmp_path):
    """mixtral / qwen3_moe are saved with per-expert keys (transformers' converter stacks them on load);
    gpt_oss is saved fused. bf16 from an fp32 checkpoint: the dtype cast is from_pretrained's too."""
    tiny_cache(arch).save_pretrained(tmp_path)
    per_expert = any(".experts.0." in k for k in _keys(tmp_path))
    assert per_expert == (arch != "gpt_oss")  # what save_pretrained writes (transformers 5)
    # the same experts kernel as the lazy model (moeprune's CPU default): grouped_mm rounds differently from
    # eager on some CPUs (seen under MKL_ENABLE_INSTRUCTIONS=SSE4_2, the AMD-like path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, experts_implementation="eager")
    realign_tensors_(ref)  # mmapped tensors are 8-byte aligned; MKL picks other kernels on some CPUs
    lazy, _ = load_layerwise_model(str(tmp_path), dtype=dtype)
    layers, L = lazy.model.layers, lazy_layers(lazy)
    assert L.resident() == [] and all(p.device.type == "meta" for p in layers.parameters())
    rest = {k: v for k, v in (dict(lazy.named_parameters()) | dict(lazy.named_buffers())).items()
            if not k.startswith("model.layers.")}
    full = dict(ref.named_parameters()) | dict(ref.named_buffers())
    assert rest.keys() == {k for k in full if not k.startswith("model.layers.")}
    for k, t in rest.items():  # embeddings, norm, lm_head, rotary inv_freq
        assert t.dtype == full[k].dtype and torch.equal(t, full[k]), k
    for i in range(len(layers)):
        with L.held(i) as layer:
            assert L.resident() == [i]
            _assert_module_equal(layer, ref.model.layers[i], f"layer {i}")
        assert L.resident() == []
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the whole lazy model runs (each layer loaded for its forward, released after)
        torch.testing.assert_close(lazy(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert L.resident() == []


def test_tied_embeddings_and_pruned_folder(tmp_path):
    """A tied lm_head stays tied; a moeprune-pruned folder (per-layer expert counts in config.moe_pruning)
    loads lazily with load_pruned's shapes and values."""
    from moeprune.apply import apply_plan, load_pruned, save_pruned
    from moeprune.testing import example_plan

    cfg = tiny_config("qwen3_moe")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "tied")
    lazy, _ = load_layerwise_model(str(tmp_path / "tied"))
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    assert torch.equal(lazy.lm_head.weight, model.lm_head.weight)

    pruned = apply_plan(tiny_model("mixtral"), example_plan(tiny_model("mixtral")))  # 6/5/4 experts by layer
    save_pruned(pruned, tmp_path / "pruned")
    ref = load_pruned(tmp_path / "pruned")
    lazy, _ = load_layerwise_model(str(tmp_path / "pruned"))
    L = lazy_layers(lazy)
    for i in range(len(L.layers)):
        with L.held(i) as layer:
            _assert_module_equal(layer, ref.model.layers[i], f"pruned layer {i}")


def test_layerwise_run_writes_only_activations_and_resumes(tiny_cache, tmp_path):
    """Nothing but the resumable activations/accumulators is written (no copy of the weights), at most one
    decoder layer is materialised at any layer's forward, and an interrupted run resumes after the last
    committed layer with the same statistics as the full pass of from_pretrained's model."""
    src = tmp_path / "ckpt"
    tiny_cache("qwen3_moe").save_pretrained(src)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, experts_implementation="eager")
    realign_tensors_(ref)  # the lazy layers own aligned copies: same CPU kernels (see realign_tensors_)
    full = observe(ref, _batches(), features=FEATS, progress=False)
    work = tmp_path / "work"
    lazy, _ = load_layerwise_model(str(src), experts_implementation="eager")
    layers = lazy.model.layers
    seen: list[tuple[int, dict[str, int]]] = []  # (layers materialised, {file under work: bytes})

    def spy(mod, args):
        files = {os.path.relpath(os.path.join(d, f), work): os.path.getsize(os.path.join(d, f))
                 for d, _, fs in os.walk(work) for f in fs}
        seen.append((sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in layers), files))
    hooks = [lay.self_attn.register_forward_pre_hook(spy) for lay in layers]

    def fail(mod, args):
        raise RuntimeError("interrupted")
    stop = layers[2].mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        observe_layerwise(lazy, _batches(), features=FEATS, progress=False, checkpoint_dir=work)
    stop.remove()
    assert json.loads((work / "progress.json").read_text())["next_layer"] == 2
    assert lazy_layers(lazy).resident() == []  # released on the error too
    seen.clear()
    resumed = observe_layerwise(lazy, _batches(), features=FEATS, progress=False, checkpoint_dir=work)
    for h in hooks:
        h.remove()
    assert [n for n, _ in seen] == [1, 1]  # only layer 2 ran (2 batches), alone in memory
    for fa, fb in zip(full[2].values(), resumed[2].values()):
        assert torch.equal(fa, fb)
    for li in full.moe_layers:
        for name, t in full[li].items():
            assert torch.equal(resumed[li][name], t), f"L{li} {name}"
    hidden_bytes = sum(b["input_ids"].numel() if isinstance(b, dict) else b.numel() for b in _batches()) * 64 * 4
    for _, files in seen:
        assert all(f == "progress.json" or f.startswith(("acts_", "observer_")) for f in files), files
        acts = sum(n for f, n in files.items() if f.startswith("acts_"))
        assert acts <= 2 * (hidden_bytes + 2 * 1024)  # inputs + outputs of one layer (+ safetensors headers)
    weights = os.path.getsize(src / "model.safetensors")
    assert max(sum(f.values()) for _, f in seen) < weights / 2, "the run wrote about as much as the weights"


def test_whole_forward_of_a_lazy_model_keeps_one_layer(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    lazy, tok = load_layerwise_model(str(tmp_path))
    assert tok is not None and tok.pad_token is not None
    counts = []
    hooks = [lay.register_forward_pre_hook(
        lambda m, a: counts.append(len(lazy_layers(lazy).resident()))) for lay in lazy.model.layers]
    hooks += [lay.self_attn.register_forward_pre_hook(
        lambda m, a: counts.append(len(lazy_layers(lazy).resident()))) for lay in lazy.model.layers]
    with torch.no_grad():
        lazy(torch.randint(3, 250, (1, 8)))
    for h in hooks:
        h.remove()
    assert counts == [1] * 6  # at each layer's (and its attention's) forward: that layer alone in memory
    assert lazy_layers(lazy).resident() == []


def test_bin_checkpoint_loads_whole_with_a_reason(tmp_path, caplog):
    """``.bin`` pickles cannot be read one layer at a time: loaded whole, and the log says why."""
    model = tiny_model("mixtral")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with caplog.at_level("WARNING", logger="moeprune"):
        m, _ = load_layerwise_model(str(tmp_path))
    assert lazy_layers(m) is None and "loads" in caplog.text and ".bin" in caplog.text
    assert all(p.device.type == "cpu" for p in m.parameters())


def test_open_handles_keeps_at_most_keep_shards_mapped(tmp_path):
    """The streaming rewrite's handle cache: closed shards leave the process's memory maps (and its RSS)."""
    from moeprune.apply.shards import open_handles

    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.safetensors"
        save_file({"w": torch.full((4,), float(i))}, p)
        paths.append(str(p))
    get = open_handles(keep=2)
    for p in paths:
        assert get(p).get_tensor("w")[0] == float(paths.index(p))

    def mapped() -> set[str]:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if line.rstrip().endswith(".safetensors")}
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps on this platform")
    assert mapped() & set(paths) == set(paths[1:])
    get(paths[1])  # most recently used now: opening s0 again closes s2
    get(paths[0])
    assert mapped() & set(paths) == {paths[0], paths[1]}


def test_accelerate_offloaded_model_still_observed_layer_by_layer(tiny_cache, tmp_path):
    """A model a user dispatched with accelerate (layers offloaded to disk) is onloaded once per layer."""
    tiny_cache("mixtral").save_pretrained(tmp_path / "ckpt")
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
            "model.layers": "disk"}
    off = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=dmap,
                                                            offload_folder=tmp_path / "off",
                                                            experts_implementation="eager")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", experts_implementation="eager")
    full = observe(ref, _batches(), features=FEATS, progress=False)
    got = observe_layerwise(off, _batches(), features=FEATS, progress=False)
    assert all(p.device.type == "meta" for p in off.model.layers.parameters())  # offloaded again
    for li in full.moe_layers:
        for name, t in full[li].items():
            # onloaded weights may sit at other addresses than from_pretrained's: CPU GEMM kernels chosen by
            # alignment can round differently (see realign_tensors_), so fp32 rounding-level tolerance
            torch.testing.assert_close(got[li][name], t, rtol=1e-5, atol=1e-6, msg=f"L{li} {name}")


def test_free_space_for_the_activations_checked(tiny_cache, tmp_path, monkeypatch):
    """What a layer-wise run writes (one layer's inputs + outputs) is checked before writing it."""
    import shutil

    import moeprune.atomic

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(moeprune.atomic.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="not enough disk space for the layer-wise activations"):
        observe_layerwise(tiny_cache("qwen3_moe"), _batches(), progress=False, checkpoint_dir=tmp_path / "w")
    assert not list((tmp_path / "w").glob("acts_*"))


def test_auto_dtype_is_the_checkpoint_dtype(tmp_path):
    """``dtype: auto`` reads the checkpoint's dtype from its config, as from_pretrained(dtype="auto")."""
    tiny_model("qwen3_moe", dtype=torch.bfloat16).save_pretrained(tmp_path)
    lazy, _ = load_layerwise_model(str(tmp_path), dtype="auto")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert ref.dtype == torch.bfloat16 and lazy.model.embed_tokens.weight.dtype == torch.bfloat16
    with lazy_layers(lazy).held(1) as layer:
        _assert_module_equal(layer, ref.model.layers[1], "layer 1")
