"""Tiny random MoE models of every supported family, built from config classes (no hub access).

Used by the tests, the benchmarks and ``moeprune demo``. Routers are re-randomised: HF initialises
several routers and ``e_score_correction_bias`` with zeros, and random tiny models would then route
on ties, which hides pruning bugs.
"""
from __future__ import annotations

import torch
import transformers

H, E, K, INTER = 64, 8, 2, 32
COMMON = {"hidden_size": H, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": False, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2}


def _mla(**kw):
    # MLA families need num_key_value_heads == num_attention_heads: with a padded attention mask the SDPA
    # path repeats the kv heads by heads/kv_heads and the shapes no longer match.
    return dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **kw)


def tiny_config(arch: str, *, num_experts: int = E, top_k: int = K) -> transformers.PretrainedConfig:
    """A 3-layer config of family ``arch`` with ``num_experts`` experts of width 32."""
    T, n, k, i = transformers, num_experts, top_k, INTER
    c = COMMON
    builders = {
        "mixtral": lambda: T.MixtralConfig(**c, intermediate_size=i, num_local_experts=n, num_experts_per_tok=k),
        "minimax": lambda: T.MiniMaxConfig(**c, head_dim=16, intermediate_size=i, num_local_experts=n,
                                           num_experts_per_tok=k,
                                           layer_types=["linear_attention", "full_attention", "full_attention"]),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**c, intermediate_size=96, moe_intermediate_size=i,
                                              shared_expert_intermediate_size=48, num_experts=n,
                                              num_experts_per_tok=k, norm_topk_prob=False),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                              num_experts=n, num_experts_per_tok=k, norm_topk_prob=True,
                                              mlp_only_layers=[0]),
        "qwen3_next": lambda: T.Qwen3NextConfig(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                                shared_expert_intermediate_size=48, num_experts=n,
                                                num_experts_per_tok=k, layer_types=["full_attention"] * 3,
                                                linear_num_value_heads=4, linear_num_key_heads=2,
                                                linear_key_head_dim=16, linear_value_head_dim=16),
        "olmoe": lambda: T.OlmoeConfig(**c, intermediate_size=i, num_experts=n, num_experts_per_tok=k),
        "flex_olmo": lambda: T.FlexOlmoConfig(**c, intermediate_size=i, num_experts=n, num_experts_per_tok=k),
        "phimoe": lambda: T.PhimoeConfig(**c, intermediate_size=i, num_local_experts=n, num_experts_per_tok=2),
        "gpt_oss": lambda: T.GptOssConfig(**c, head_dim=16, intermediate_size=i, num_local_experts=n,
                                          num_experts_per_tok=k, sliding_window=16,
                                          layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "deepseek_v3": lambda: T.DeepseekV3Config(**{**c, "num_key_value_heads": 4}, **_mla(), intermediate_size=96, moe_intermediate_size=i,
                                                  n_routed_experts=n, num_experts_per_tok=k, n_group=2, topk_group=1,
                                                  first_k_dense_replace=1, n_shared_experts=1,
                                                  routed_scaling_factor=2.5, norm_topk_prob=True),
        "deepseek_v2": lambda: T.DeepseekV2Config(**{**c, "num_key_value_heads": 4}, **_mla(), intermediate_size=96, moe_intermediate_size=i,
                                                  n_routed_experts=n, num_experts_per_tok=k, n_group=2, topk_group=1,
                                                  topk_method="group_limited_greedy", first_k_dense_replace=1,
                                                  n_shared_experts=1),
        "glm4_moe": lambda: T.Glm4MoeConfig(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                            n_routed_experts=n, num_experts_per_tok=k, n_group=1, topk_group=1,
                                            first_k_dense_replace=1, n_shared_experts=1),
        "dots1": lambda: T.Dots1Config(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                       n_routed_experts=n, num_experts_per_tok=k, first_k_dense_replace=1,
                                       n_shared_experts=1),
        "ernie4_5_moe": lambda: T.Ernie4_5_MoeConfig(**c, intermediate_size=96, moe_intermediate_size=i,
                                                     moe_num_experts=n, moe_k=k, moe_num_shared_experts=1,
                                                     moe_layer_start_index=1),
        "hunyuan_v1_moe": lambda: T.HunYuanMoEV1Config(**c, head_dim=16, intermediate_size=i, num_experts=n,
                                                        moe_topk=k),
        "minimax_m2": lambda: T.MiniMaxM2Config(**c, head_dim=16, intermediate_size=i, num_local_experts=n,
                                                num_experts_per_tok=k),
        "granitemoe": lambda: T.GraniteMoeConfig(**c, intermediate_size=i, num_local_experts=n, num_experts_per_tok=k),
        "granitemoeshared": lambda: T.GraniteMoeSharedConfig(**c, intermediate_size=i, num_local_experts=n,
                                                             num_experts_per_tok=k, shared_intermediate_size=48),
        "jetmoe": lambda: T.JetMoeConfig(**{a: b for a, b in c.items() if a != "num_attention_heads"},
                                         intermediate_size=i, num_local_experts=n, num_experts_per_tok=k,
                                         kv_channels=16),
        "dbrx": lambda: T.DbrxConfig(d_model=H, n_heads=4, n_layers=3, vocab_size=256, max_seq_len=128,
                                     ffn_config={"ffn_hidden_size": i, "moe_num_experts": n, "moe_top_k": k},
                                     attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}),
        "llama4_text": lambda: T.Llama4TextConfig(**c, head_dim=16, intermediate_size=i, intermediate_size_mlp=96,
                                                  num_local_experts=n, num_experts_per_tok=1,
                                                  interleave_moe_layer_step=1),
        "longcat_flash": lambda: T.LongcatFlashConfig(
            **{a: b for a, b in c.items() if a not in ("num_hidden_layers", "num_key_value_heads")},
            **_mla(), num_layers=2, num_key_value_heads=4, ffn_hidden_size=96, expert_ffn_hidden_size=i,
            n_routed_experts=n, zero_expert_num=2, moe_topk=k, head_dim=8),
        "afmoe": lambda: T.AfmoeConfig(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                       num_experts=n, num_experts_per_tok=k, num_dense_layers=1),
        "hy_v3": lambda: T.HYV3Config(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                      num_experts=n, num_experts_per_tok=k),
        **_extra_builders(n, k, i),
    }
    if arch not in builders:
        raise ValueError(f"no tiny config for model_type {arch!r}; known: {sorted(builders)}")
    return builders[arch]()


def _extra_builders(n: int, k: int, i: int) -> dict:
    """Families beyond the core set (layer-type lists sized for 3 layers; sliding windows of 16)."""
    T, c = transformers, COMMON
    sw = {"sliding_window": 16}
    lt3 = ["sliding_attention", "sliding_attention", "full_attention"]
    mla = _mla()
    return {
        "gemma4_text": lambda: T.Gemma4TextConfig(**c, **sw, head_dim=16, intermediate_size=96, enable_moe_block=True,
                                                  num_experts=n, top_k_experts=k, moe_intermediate_size=i,
                                                  vocab_size_per_layer_input=256, hidden_size_per_layer_input=16,
                                                  layer_types=lt3),
        "lfm2_moe": lambda: T.Lfm2MoeConfig(**c, intermediate_size=96, moe_intermediate_size=i, num_experts=n,
                                            num_experts_per_tok=k, num_dense_layers=1,
                                            layer_types=["full_attention", "conv", "full_attention"]),
        "nemotron_h": lambda: T.NemotronHConfig(
            **{a: b for a, b in c.items() if a != "num_hidden_layers"}, head_dim=16,
            layers_block_type=["moe", "full_attention", "moe"], intermediate_size=96, n_routed_experts=n,
            num_experts_per_tok=k, moe_intermediate_size=i, moe_shared_expert_intermediate_size=48,
            mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16),
        "kolibri1": lambda: T.Kolibri1Config(**c, **sw, head_dim=16, moe_intermediate_size=i,
                                             shared_expert_intermediate_size=48, num_local_experts=n,
                                             num_experts_per_tok=k, layer_types=lt3),
        "laguna": lambda: T.LagunaConfig(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                         shared_expert_intermediate_size=48, num_experts=n, num_experts_per_tok=k,
                                         moe_routed_scaling_factor=2.0, layer_types=["full_attention"] * 3, mlp_layer_types=["dense", "sparse", "sparse"],
                                         num_attention_heads_per_layer=[4, 4, 4]),
        "mellum": lambda: T.MellumConfig(**c, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                         num_local_experts=n, num_experts_per_tok=k, layer_types=["full_attention"] * 3,
                                         mlp_layer_types=["sparse"] * 3),
        "cohere2_moe": lambda: T.Cohere2MoeConfig(**c, **sw, head_dim=16, intermediate_size=i, num_experts=n,
                                                  num_experts_per_tok=k, layer_types=lt3, mlp_layer_types=["sparse"] * 3),
        "exaone_moe": lambda: T.ExaoneMoeConfig(**c, **sw, head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                                num_experts=n, num_experts_per_tok=k, first_k_dense_replace=1,
                                                layer_types=lt3, mlp_layer_types=["dense", "sparse", "sparse"]),
        "mimo_v2_flash": lambda: T.MiMoV2FlashConfig(**c, **sw, head_dim=16, v_head_dim=16, intermediate_size=96,
                                                     moe_intermediate_size=i, n_routed_experts=n, num_experts_per_tok=k,
                                                     layer_types=["full_attention", "sliding_attention", "full_attention"],
                                                     mlp_layer_types=["dense", "sparse", "sparse"]),
        "inkling_text": lambda: T.InklingTextConfig(**c, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                                                    swa_head_dim=16, intermediate_size=96, moe_intermediate_size=i,
                                                    n_routed_experts=n, num_experts_per_tok=k, n_shared_experts=1,
                                                    layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
                                                    mlp_layer_types=["sparse"] * 3),
        "solar_open": lambda: T.SolarOpenConfig(**c, head_dim=16, moe_intermediate_size=i, n_routed_experts=n,
                                                num_experts_per_tok=k),
        "aria_text": lambda: T.AriaTextConfig(**c, head_dim=16, intermediate_size=i, moe_num_experts=n, moe_topk=k,
                                              moe_num_shared_experts=1),
        "minimax_m3_vl_text": lambda: T.MiniMaxM3VLTextConfig(
            **c, head_dim=16, intermediate_size=i, num_local_experts=n, num_experts_per_tok=k, dense_intermediate_size=96,
            shared_intermediate_size=48, mlp_layer_types=["sparse"] * 3, layer_types=["full_attention"] * 3,
            index_n_heads=2, index_head_dim=16),
        "beam": lambda: T.BeamConfig(**c, **sw, head_dim=16, intermediate_size=96, moe_intermediate_size=i, num_experts=n,
                                     num_experts_per_tok=k, n_group=2, topk_group=1, layer_types=lt3,
                                     mlp_layer_types=["dense", "sparse", "sparse"]),
        "hy_v4": lambda: T.HYV4Config(**c, **{a: b for a, b in mla.items() if a != "kv_lora_rank"}, kv_lora_rank=16,
                                      head_dim=16, intermediate_size=96, moe_intermediate_size=i, n_routed_experts=n,
                                      num_experts_per_tok=k, index_topk=16, index_head_dim=16, index_n_heads=2,
                                      mlp_layer_types=["dense", "sparse", "sparse"], layer_types=["indexed_attention"] * 3,
                                      indexer_types=["full", "shared", "full"]),
        "qwen3_5_moe_text": lambda: T.Qwen3_5MoeTextConfig(
            **c, head_dim=16, moe_intermediate_size=i, shared_expert_intermediate_size=48, num_experts=n,
            num_experts_per_tok=k, layer_types=["linear_attention", "full_attention", "full_attention"],
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
        "glm4_moe_lite": lambda: T.Glm4MoeLiteConfig(**{**c, "num_key_value_heads": 4}, **mla, intermediate_size=96, moe_intermediate_size=i,
                                                     n_routed_experts=n, num_experts_per_tok=k,
                                                     mlp_layer_types=["dense", "sparse", "sparse"]),
        "axk1": lambda: T.AXK1Config(**{**c, "num_key_value_heads": 4}, **mla, head_dim=8, intermediate_size=96, moe_intermediate_size=i,
                                     n_routed_experts=n, num_experts_per_tok=k, n_group=2, topk_group=1,
                                     mlp_layer_types=["dense", "sparse", "sparse"]),
    }


TINY_ARCHS: tuple[str, ...] = ("mixtral", "minimax", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo",
                               "phimoe", "gpt_oss", "deepseek_v3", "deepseek_v2", "glm4_moe", "dots1",
                               "ernie4_5_moe", "hunyuan_v1_moe", "minimax_m2", "granitemoe", "granitemoeshared",
                               "jetmoe", "dbrx", "llama4_text", "longcat_flash", "afmoe", "hy_v3")
# Further families (same tiny sizes); kept out of TINY_ARCHS so existing parametrised suites stay fast.
EXTRA_TINY_ARCHS: tuple[str, ...] = ("gemma4_text", "lfm2_moe", "nemotron_h", "kolibri1", "laguna", "mellum",
                                     "cohere2_moe", "exaone_moe", "mimo_v2_flash", "inkling_text", "solar_open",
                                     "aria_text", "minimax_m3_vl_text", "beam", "hy_v4", "axk1", "qwen3_5_moe_text",
                                     "glm4_moe_lite")
ALL_TINY_ARCHS: tuple[str, ...] = TINY_ARCHS + EXTRA_TINY_ARCHS


def rerandomize_(model: torch.nn.Module, seed: int = 1, scale: float = 0.15) -> torch.nn.Module:
    """Deterministic non-degenerate weights: norms near 1, selection biases small, the rest N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or p.dim() == 0:
                continue
            if "norm" in n or n.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in n or "expert_bias" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "inv_freq" not in n and "scalar" not in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_model(arch: str = "qwen3_moe", *, num_experts: int = E, top_k: int = K, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A tiny random ``AutoModelForCausalLM`` of family ``arch`` in eval mode."""
    cfg = tiny_config(arch, num_experts=num_experts, top_k=top_k)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return rerandomize_(model, seed=seed + 1).to(dtype)
