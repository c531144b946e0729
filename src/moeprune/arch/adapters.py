"""Architecture adapters: what each supported ``model_type`` stores where, as plain data.

Module structure (blocks, routers, fused tensors) is discovered generically by ``structure.py``;
what cannot be discovered from modules lives here: config keys (to rewrite a pruned config), the
norm that feeds the MoE block (to capture the residual stream), and how router logits become the
applied gate weights (``router_info``, written into stats meta). A family without an adapter is
refused with ``UnsupportedModelError`` rather than pruned on guesswork.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from moeprune.arch.structure import get_router, iter_moe_blocks

SCORES = ("softmax", "sigmoid", "probs")


class UnsupportedModelError(ValueError):
    """The model family has no adapter (or is known not to be prunable by moeprune)."""


@dataclass(frozen=True)
class Adapter:
    """Per-family record. Config keys may be dotted (``ffn_config.moe_num_experts``) and refer to the
    text config. Router attributes (``renormalize``/``scale`` given as names) are looked up on the
    router, then the block, then the config."""

    model_type: str
    num_experts: str                      # config key: routed experts per MoE layer
    top_k: str                            # config key: experts per token
    intermediate: str                     # config key: per-expert intermediate size
    block: str = "mlp"                    # decoder-layer attribute holding the MoE block ("" = the layer)
    norm: str | None = "post_attention_layernorm"  # decoder-layer submodule whose output feeds the experts
    score: str = "softmax"                # softmax | sigmoid | probs (router output 0 already holds probs)
    renormalize: bool | str = True        # top-k weights renormalised to sum 1 (or the flag's attribute name)
    scale: str | None = None              # attribute holding the routed scaling factor
    groups: tuple[str, str] | None = None  # config keys (n_group, topk_group) of group-limited routing
    intermediate_shared: bool = False     # the intermediate key also sizes shared/dense MLPs
    selection_bias: bool = False          # a selection-only bias (e_score_correction_bias/expert_bias)
    zero_experts: str | None = None       # config key of identity ("zero-compute") experts
    scale_on_output: bool = False         # scale multiplies the summed routed output, not the weights
    exact: bool = True                    # router_info reproduces the applied weights exactly
    layout: str = "fused"                 # expert storage (arch/routing.py LAYOUTS): fused|longcat|dbrx|llama4|jetmoe
    info: Callable[[nn.Module], dict[str, Any]] | None = field(default=None, compare=False)
    notes: str = ""


def _cohere2_info(block: nn.Module) -> dict[str, Any]:
    r = get_router(block)
    if r.expert_selection_fn == "sigmoid":
        return {"score": "sigmoid", "renormalize": bool(r.norm_topk_prob)}
    return {"score": "softmax", "renormalize": True}  # softmax over the top-k logits


def _dbrx_info(block: nn.Module) -> dict[str, Any]:
    p = block.moe_normalize_expert_weights
    return {"renormalize": p == 1, "norm_p": p}


def _qwen(mt: str, inter: str = "moe_intermediate_size", **kw) -> Adapter:
    return Adapter(mt, "num_experts", "num_experts_per_tok", inter, renormalize="norm_topk_prob", **kw)


def _mixtral(mt: str, **kw) -> Adapter:
    return Adapter(mt, "num_local_experts", "num_experts_per_tok", "intermediate_size", **kw)


def _dsv3(mt: str, num: str = "n_routed_experts", shared: bool = True, **kw) -> Adapter:
    """DeepSeek-V3 routing: sigmoid + selection bias + group-limited top-k + renorm + routed scaling."""
    kw.setdefault("scale", "routed_scaling_factor")
    return Adapter(mt, num, "num_experts_per_tok", "moe_intermediate_size", score="sigmoid",
                   renormalize="norm_topk_prob", groups=("n_group", "topk_group"),
                   intermediate_shared=shared, selection_bias=True, **kw)


_LIST = [
    _mixtral("mixtral"),
    _mixtral("minimax", notes="lightning/full attention layers; routing as Mixtral"),
    _qwen("qwen2_moe", notes="gated shared_expert sized by shared_expert_intermediate_size"),
    _qwen("qwen3_moe"),
    _qwen("qwen3_next", notes="hybrid Gated-DeltaNet; gated shared_expert"),
    _qwen("olmoe", inter="intermediate_size"),
    _qwen("flex_olmo", inter="intermediate_size", norm=None,
          notes="post-norm layer: the MoE block reads the raw residual stream"),
    _qwen("mellum"),
    Adapter("qwen3_5_moe_text", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            notes="hybrid Gated-DeltaNet; gated shared_expert; top-k weights always renormalised"),
    _mixtral("phimoe", exact=False, notes="sparsemixer routing is hard-wired top-2 (keep >= 2 experts); "
              "weights are per-round softmaxes within a jitter threshold, approximated as softmax+renorm"),
    _mixtral("gpt_oss", notes="top-k on biased logits, softmax over the k (== softmax + renorm); "
             "interleaved transposed gate_up with biases; hub weights are MXFP4"),
    _mixtral("granitemoe", block="block_sparse_moe"),
    _mixtral("granitemoeshared", block="block_sparse_moe", notes="shared_mlp lives in the decoder layer"),
    _mixtral("jetmoe", layout="jetmoe", notes="num_local_experts/num_experts_per_tok also size the MoA attention experts, so "
             "even uniform expert pruning needs config.moe_pruning; the MoE adds mlp.bias after combining"),
    _mixtral("minimax_m2", score="sigmoid", selection_bias=True),
    _mixtral("minimax_m3_vl_text", score="sigmoid", selection_bias=True, scale="routed_scaling_factor",
             scale_on_output=True),
    _mixtral("llama4_text", block="feed_forward", score="sigmoid", renormalize=False, intermediate_shared=True,
             layout="llama4",
             notes="the sigmoid gate multiplies the expert INPUT; every expert computes every token; "
             "intermediate_size also sizes the shared expert"),
    Adapter("dbrx", "ffn_config.moe_num_experts", "ffn_config.moe_top_k", "ffn_config.ffn_hidden_size",
            block="ffn", norm="norm_attn_norm.norm_2", info=_dbrx_info, layout="dbrx",
            notes="2-D [E*I, H] expert tensors; weights divided by their p-norm (p=1: renorm)"),
    Adapter("ernie4_5_moe", "moe_num_experts", "moe_k", "moe_intermediate_size", intermediate_shared=True,
            selection_bias=True, notes="selection bias in gate.moe_statics [1, E]; renorm clamps at moe_norm_min"),
    Adapter("hunyuan_v1_moe", "num_experts", "moe_topk", "intermediate_size", intermediate_shared=True,
            notes="moe_topk may be a per-layer list"),
    Adapter("deepseek_v2", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            renormalize=False, scale="routed_scaling_factor", groups=("n_group", "topk_group"),
            intermediate_shared=True, notes="groups only with topk_method='group_limited_greedy' (max per group)"),
    _dsv3("deepseek_v3"),
    _dsv3("glm4_moe"),
    _dsv3("glm4_moe_lite", notes="MLA attention"),
    _dsv3("dots1"),
    _dsv3("exaone_moe", num="num_experts"),
    _dsv3("mimo_v2_flash", shared=False, notes="no shared experts"),
    _dsv3("solar_open"),
    _dsv3("hy_v4", notes="hyper-connections: the norm input is a mix of residual streams"),
    _dsv3("axk1", notes="post_mlp_layernorm inside the MoE block"),
    _dsv3("nemotron_h", shared=False, block="mixer", norm="norm",
          notes="hybrid Mamba; experts have no gate (up_proj, relu^2)"),
    _dsv3("beam", num="num_experts", shared=False, norm="pre_feedforward_layernorm", scale_on_output=True),
    Adapter("longcat_flash", "n_routed_experts", "moe_topk", "expert_ffn_hidden_size", norm="post_attention_layernorm.0",
            renormalize=False, scale="routed_scaling_factor", selection_bias=True, zero_experts="zero_expert_num",
            layout="longcat",
            notes="identity experts after the real ones are never pruned; 2 sub-layers per layer"),
    Adapter("afmoe", "num_experts", "num_experts_per_tok", "moe_intermediate_size", norm="pre_mlp_layernorm",
            score="sigmoid", scale="route_scale", intermediate_shared=True, selection_bias=True),
    Adapter("hy_v3", "num_experts", "num_experts_per_tok", "moe_intermediate_size", score="sigmoid",
            scale="router_scaling_factor", intermediate_shared=True, selection_bias=True),
    Adapter("lfm2_moe", "num_experts", "num_experts_per_tok", "moe_intermediate_size", block="feed_forward",
            norm="ffn_norm", score="sigmoid", renormalize="norm_topk_prob", scale="routed_scaling_factor",
            selection_bias=True),
    Adapter("kolibri1", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", score="sigmoid",
            renormalize="norm_topk_prob", selection_bias=True, notes="top-k on logits + bias, sigmoid of the k"),
    Adapter("laguna", "num_experts", "num_experts_per_tok", "moe_intermediate_size", score="sigmoid",
            scale="routed_scaling_factor", scale_on_output=True, selection_bias=True,
            notes="optional tanh softcap (already applied to the returned logits)"),
    Adapter("cohere2_moe", "num_experts", "num_experts_per_tok", "intermediate_size", norm="input_layernorm",
            info=_cohere2_info, notes="parallel attention+MoE from the same normed input"),
    Adapter("inkling_text", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", score="sigmoid",
            scale="route_scale", intermediate_shared=True, selection_bias=True, exact=False,
            notes="router rows = E routed + shared; weights normalised jointly with the shared experts "
            "(logsigmoid-softmax), approximated as sigmoid+renorm"),
    Adapter("aria_text", "moe_num_experts", "moe_topk", "intermediate_size", intermediate_shared=True,
            notes="transposed experts; softmax over the top-k logits"),
    Adapter("gemma4_text", "num_experts", "top_k_experts", "moe_intermediate_size", block="",
            norm="pre_feedforward_layernorm_2", score="probs", exact=False,
            notes="router and experts live in the decoder layer next to a dense MLP; the router normalises "
            "the raw residual itself; per_expert_scale multiplies the weights; top_k is read from the config"),
]
ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in _LIST}
ADAPTERS["llama4"] = replace(ADAPTERS["llama4_text"], model_type="llama4")  # reads config.text_config

KNOWN_UNSUPPORTED: dict[str, str] = {
    "zaya": "its router is an MLP with state passed between layers (EDA) plus a skip class; pruning would "
            "need to rewrite that state",
    "deepseek_v4": "hash layers route by token id (gate.tid2eid); pruning needs a remap of that table",
    "switch_transformers": "experts are a ModuleList of per-expert MLPs with capacity routing (encoder-decoder)",
    "nllb_moe": "experts are a ModuleList of per-expert MLPs with capacity routing (encoder-decoder)",
    "muse_spark": "a norm over the expert output (has_post_expert_norm) is not channel-separable",
}


def text_config(config: Any) -> Any:
    """The text (decoder) config of a possibly composite config (Llama4, VLMs)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    obj = text_config(config)
    for part in key.split("."):
        obj = obj.get(part, default) if isinstance(obj, dict) else getattr(obj, part, default)
    return obj


def cfg_set(config: Any, key: str, value: Any) -> None:
    *path, last = key.split(".")
    obj = text_config(config)
    for part in path:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def get_adapter(model_or_config: Any) -> Adapter:
    """The adapter of a model or config; ``UnsupportedModelError`` names the type and the options."""
    config = getattr(model_or_config, "config", model_or_config)
    outer = getattr(config, "model_type", None)
    mt = getattr(text_config(config), "model_type", None) or outer
    for t in (mt, outer):
        if t in ADAPTERS:
            return ADAPTERS[t]
    supported = ", ".join(sorted(ADAPTERS))
    if mt in KNOWN_UNSUPPORTED or outer in KNOWN_UNSUPPORTED:
        why = KNOWN_UNSUPPORTED.get(mt) or KNOWN_UNSUPPORTED[outer]
        raise UnsupportedModelError(f"model_type {mt!r} is not supported: {why}. Supported: {supported}")
    if isinstance(model_or_config, nn.Module):
        dense = next(iter_moe_blocks(model_or_config), None) is None
    else:
        tc = text_config(config)
        dense = not any(getattr(tc, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts",
                                                       "moe_num_experts", "ffn_config"))
    if dense:
        raise UnsupportedModelError(f"model_type {mt!r} has no sparse-MoE blocks (a dense model?): nothing to "
                                    f"prune. Supported MoE families: {supported}")
    raise UnsupportedModelError(f"model_type {mt!r} has no moeprune adapter (not validated). Supported: "
                                f"{supported}. Add an Adapter in moeprune/arch/adapters.py and run tests/test_arch.py")


def _lookup(name: str, block: nn.Module, config: Any, default: Any) -> Any:
    cfg = config or getattr(block, "config", None) or getattr(get_router(block), "config", None)
    for obj in (get_router(block), block, text_config(cfg) if cfg is not None else None):
        v = getattr(obj, name, None) if obj is not None else None
        if v is not None:
            return v
    return default


def router_info(block: nn.Module, adapter: Adapter, config: Any = None) -> dict[str, Any]:
    """How the block turns router logits into applied weights:
    ``{"score": softmax|sigmoid|probs, "renormalize": bool, "scale": float}`` (stats meta).

    Recipe: ``p = score(logits)`` (``probs``: already probabilities), gather ``p`` at the top-k ids,
    divide by their sum if ``renormalize``, multiply by ``scale``. ``scale_on_output``: the experts
    receive unscaled weights and the block scales their sum. ``exact`` is False where the recipe only
    approximates the applied weights (see the adapter notes); tests/test_arch.py checks both."""
    ren = adapter.renormalize
    info = {"score": adapter.score,
            "renormalize": bool(_lookup(ren, block, config, False)) if isinstance(ren, str) else bool(ren),
            "scale": float(_lookup(adapter.scale, block, config, 1.0)) if adapter.scale else 1.0,
            "scale_on_output": adapter.scale_on_output, "exact": adapter.exact}
    if adapter.info is not None:
        info.update(adapter.info(block))
    return info


def moe_norm(model: nn.Module, layer: int, adapter: Adapter | None = None) -> nn.Module | None:
    """The norm whose output feeds the experts of MoE layer ``layer`` (its input is the residual
    stream h_t), or ``None`` for post-norm families whose block reads the residual directly."""
    adapter = adapter or get_adapter(model)
    for li, name, _block in iter_moe_blocks(model):
        if li == layer:
            if adapter.norm is None:
                return None
            parent = name if not adapter.block else name.rsplit(".", 1)[0]
            return model.get_submodule(f"{parent}.{adapter.norm}")
    raise ValueError(f"layer {layer} is not an MoE layer of this {type(model).__name__}")
