"""Adapters are checked against the modules they describe: config keys, shared intermediate sizes,
the norm that feeds the experts, and how router logits become applied weights."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers

from moeprune.apply.config import layer_shapes
from moeprune.apply.experts import moe_blocks
from moeprune.arch.adapters import (
    ADAPTERS,
    UnsupportedModelError,
    cfg_get,
    get_adapter,
    moe_norm,
    router_info,
    text_config,
)
from moeprune.arch.structure import get_experts, get_router, inter_layout
from moeprune.arch.tiny import ALL_TINY_ARCHS, tiny_config


def test_every_tiny_family_has_an_adapter():
    assert set(ALL_TINY_ARCHS) <= set(ADAPTERS)
    assert len(ALL_TINY_ARCHS) >= 40


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_config_keys_match_modules(arch, tiny_cache):
    model = tiny_cache(arch)
    ad = get_adapter(model)
    assert ad.model_type == arch
    for s in layer_shapes(model).values():
        assert cfg_get(model.config, ad.num_experts) == s["num_experts"]
        assert cfg_get(model.config, ad.top_k) == s["top_k"]
        assert cfg_get(model.config, ad.intermediate) == s["intermediate_size"]
        if ad.groups:
            assert [cfg_get(model.config, k) for k in ad.groups] == s["n_group"]
        if ad.zero_experts:
            assert cfg_get(model.config, ad.zero_experts) > 0


def _meta_shapes(config):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expert = {id(getattr(o, a)) for b in moe_blocks(model).values() for o, a, _, _ in inter_layout(b)}
    return {n: tuple(p.shape) for n, p in model.named_parameters() if id(p) not in expert}


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_intermediate_shared_flag(arch):
    """``intermediate_shared`` <=> changing the key also resizes a non-expert tensor."""
    config = tiny_config(arch)
    ad = get_adapter(config)
    other = copy.deepcopy(config)
    node = text_config(other)
    *path, last = ad.intermediate.split(".")
    for p in path:
        node = getattr(node, p)
    setattr(node, last, 16)
    assert (_meta_shapes(config) != _meta_shapes(other)) == ad.intermediate_shared


def _capture(model, li, ad):
    """One forward; records router output, the (hidden, ids, weights) the experts get, and the
    norm output next to the experts' input."""
    block = moe_blocks(model)[li]
    experts, rec, hooks = get_experts(block), {}, []
    sig = inspect.signature(getattr(type(experts).forward, "__wrapped__", type(experts).forward))

    def keep(name, value):
        rec.setdefault(name, value)

    hooks.append(get_router(block).register_forward_hook(lambda m, a, o: keep("router", o)))
    if experts is not block:
        hooks.append(experts.register_forward_pre_hook(
            lambda m, a, k: keep("call", list(sig.bind(m, *a, **k).arguments.values())[1:]), with_kwargs=True))
    feed = experts if not ad.block else block
    hooks.append(feed.register_forward_pre_hook(lambda m, a, k: keep("input", a[0] if a else next(iter(k.values()))),
                                                with_kwargs=True))
    norm = moe_norm(model, li, ad)
    if norm is not None:
        hooks.append(norm.register_forward_hook(lambda m, a, o: keep("norm", o)))
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    return rec


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_norm_and_router_info(arch, tiny_cache):
    model = tiny_cache(arch)
    ad = get_adapter(model)
    li = min(moe_blocks(model))
    rec = _capture(model, li, ad)
    if ad.norm is not None:  # the named norm's output is exactly what the experts receive
        a, b = rec["norm"], rec["input"]
        torch.testing.assert_close(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), atol=0, rtol=0)
    info = router_info(moe_blocks(model)[li], ad, model.config)
    assert info["score"] in ("softmax", "sigmoid", "probs") and info["scale"] > 0
    call = rec.get("call", [])
    if len(call) < 3 or not torch.is_tensor(call[1]) or call[1].dim() != 2:
        pytest.skip(f"{arch}: experts are not called with (hidden, ids, weights); weights not observable")
    ids, weights = call[1], call[2]
    out = rec["router"]
    logits = out[0] if isinstance(out, (tuple, list)) else out  # DBRX's router returns the logits alone
    logits = logits.reshape(-1, logits.shape[-1]).double()
    p = {"softmax": logits.softmax(-1), "sigmoid": logits.sigmoid(), "probs": logits}[info["score"]]
    g = p.gather(1, ids.long())
    if info["renormalize"]:
        g = g / g.sum(-1, keepdim=True)
    if not info["scale_on_output"]:
        g = g * info["scale"]
    err = float((g - weights.double()).abs().max())
    assert (err < 1e-5) == info["exact"], (info, err)


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"'zaya'.*EDA.*Supported: .*mixtral"):
        get_adapter(transformers.ZayaConfig())
    with pytest.raises(UnsupportedModelError, match=r"'deepseek_v4'.*tid2eid"):
        get_adapter(transformers.DeepseekV4Config())
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        get_adapter(transformers.SwitchTransformersConfig())
    dense = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64))
    for obj in (dense, dense.config):
        with pytest.raises(UnsupportedModelError, match=r"'llama' has no sparse-MoE blocks"):
            get_adapter(obj)
    with pytest.raises(UnsupportedModelError, match=r"'jamba' has no moeprune adapter.*Supported: .*qwen3_moe"):
        get_adapter(transformers.JambaConfig())
    assert issubclass(UnsupportedModelError, ValueError)


def test_composite_llama4_config_uses_text_config():
    cfg = transformers.Llama4Config(text_config=tiny_config("llama4_text").to_dict())
    ad = get_adapter(cfg)
    assert ad.num_experts == "num_local_experts" and cfg_get(cfg, ad.num_experts) == 8


# ---------------------------------------------------------------------------- layouts and router recipes as data
LAYOUT = {"dbrx": "dbrx", "longcat_flash": "longcat", "llama4_text": "llama4", "jetmoe": "jetmoe"}


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_layout_is_adapter_data(arch, tiny_cache):
    """Every family's expert layout comes from its adapter and matches its modules."""
    from moeprune.arch.routing import expert_layout

    model = tiny_cache(arch)
    ad = get_adapter(model)
    assert ad.layout == LAYOUT.get(arch, "fused")
    for block in moe_blocks(model).values():
        assert expert_layout(block, ad) == ad.layout


def test_wrong_layout_is_a_clear_error(tiny_cache):
    from dataclasses import replace

    from moeprune.arch.routing import expert_layout

    block = next(iter(moe_blocks(tiny_cache("mixtral")).values()))
    with pytest.raises(UnsupportedModelError, match=r"MixtralExperts.*'dbrx' expert layout.*fix `layout`"):
        expert_layout(block, replace(ADAPTERS["mixtral"], layout="dbrx"))
    with pytest.raises(ValueError, match=r"layout 'moe' unknown"):
        expert_layout(block, replace(ADAPTERS["mixtral"], layout="moe"))


def test_observe_refuses_a_model_without_adapter(fresh_tiny):
    """No guessing from source text or numbers: an unadapted MoE model is refused with the adapter error."""
    from moeprune.observe.experts import build_banks

    model = fresh_tiny("qwen3_moe")
    model.config.model_type = "qwen3_moe_fork"
    with pytest.raises(UnsupportedModelError, match=r"'qwen3_moe_fork' has no moeprune adapter.*Supported: "):
        build_banks(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_router_meta_is_the_adapters_in_every_dtype(dtype, tiny_cache, caplog):
    """bf16 gates wobble (their top-k sums are not constant to 1e-4), yet qwen3_moe is recorded as
    renormalised: the recipe is the adapter's, and the observed weights agree with it within the dtype's
    tolerance (no warning)."""
    from moeprune.observe import observe

    model = tiny_cache("qwen3_moe", dtype)
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(5))
    with caplog.at_level("WARNING"):
        st = observe(model, [ids], progress=False)
    assert not [r for r in caplog.records if "router recipe" in r.getMessage()]
    for r in st.meta["router"].values():
        assert r["renormalize"] is True and r["scale"] == 1.0 and r["score"] == "softmax" and r["source"] == "adapter"


def test_contradicting_adapter_warns_and_keeps_its_record(tiny_cache, caplog, monkeypatch):
    """A consistency check, never a silent change: observed weights that contradict the adapter warn
    (naming the layer and the difference) and the meta keeps the adapter's values."""
    from dataclasses import replace

    from moeprune.arch import adapters
    from moeprune.observe import observe

    monkeypatch.setitem(adapters.ADAPTERS, "qwen3_moe", replace(adapters.ADAPTERS["qwen3_moe"], renormalize=False))
    with caplog.at_level("WARNING"):
        st = observe(tiny_cache("qwen3_moe", torch.bfloat16), [torch.randint(3, 250, (2, 9))], progress=False)
    msgs = [r.getMessage() for r in caplog.records if "router recipe" in r.getMessage()]
    assert len(msgs) == len(st.moe_layers) and "renormalize=False" in msgs[0] and "MoE layer 1" in msgs[0]
    assert all(r["renormalize"] is False for r in st.meta["router"].values())


def test_weight_tolerance_by_dtype():
    from moeprune.arch.routing import weight_tolerance

    assert weight_tolerance(torch.bfloat16) == 4 * 2.0 ** -7 and weight_tolerance(torch.float16) == 4 * 2.0 ** -10
    assert weight_tolerance(torch.float32) == 1e-5 and weight_tolerance(torch.float64) == 1e-5
