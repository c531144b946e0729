"""Saved calibration statistics: the contract between ``observe`` and every method.

``ExpertStats`` holds, per MoE layer, named float64 tensors (schema below) plus JSON metadata.
Methods are pure functions of it; it saves as ``stats.safetensors`` + ``stats.json`` and merges
across data shards / ranks (sums add, maxima max, per-sample rows concatenate).

Notation (per layer): E experts, H hidden, I expert intermediate size, N calibration samples,
T_s cached tokens. ``g`` is the gate weight the model *actually applied* to the expert output
(after top-k renormalisation / routed scaling), ``f = f_j(x_t)`` the un-gated expert output,
``p`` the full router probability (softmax, or sigmoid for sigmoid routers) over all experts.
Only valid (non-padding) tokens count.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moeprune.atomic import atomic_write, atomic_write_text
from moeprune.observe.partials import is_partial, merge_partial_layer

STATS_FORMAT = "moeprune.stats/v1"

# name -> (feature group, reduction, shape, meaning)
SCHEMA: dict[str, tuple[str, str, str, str]] = {
    # --- routed: cheap, always collected (unified family, frequency, REAP, EAN, MAN, MSAN, soft freq)
    "tokens": ("routed", "sum", "[]", "number of valid tokens seen by the layer"),
    "count": ("routed", "sum", "[E]", "N_j: tokens routed to j (top-k hits)"),
    "gate_sum": ("routed", "sum", "[E]", "sum over routed tokens of g"),
    "norm_sum": ("routed", "sum", "[E]", "sum over routed tokens of ||f||_2"),
    "norm_sq_sum": ("routed", "sum", "[E]", "sum over routed tokens of ||f||_2^2"),
    "gate_norm_sum": ("routed", "sum", "[E]", "sum over routed tokens of g*||f||"),
    "gate_norm_sq_sum": ("routed", "sum", "[E]", "sum over routed tokens of (g*||f||)^2"),
    "max_act": ("routed", "max", "[E]", "max over routed tokens of max_i |f_i| (0 if never routed)"),
    "max_act_signed": ("routed", "max", "[E]",
                       "max(0, max over routed tokens of max_i f_i) (signed, REAP's max_activations)"),
    "prob_sum": ("routed", "sum", "[E]", "sum over all tokens of p (full router probability)"),
    # REAP's reference gates (observer convention): q = softmax over ALL router outputs of the raw logits
    # (even for sigmoid routers); q_r = q / sum of q over the token's routed experts, clamped >= fp32 eps
    "softmax_gate_sum": ("routed", "sum", "[E]", "sum over routed tokens of q"),
    "softmax_gate_norm_sum": ("routed", "sum", "[E]", "sum over routed tokens of q*||f||"),
    "softmax_gate_norm_sq_sum": ("routed", "sum", "[E]", "sum over routed tokens of (q*||f||)^2"),
    "renorm_gate_sum": ("routed", "sum", "[E]", "sum over routed tokens of q_r"),
    "renorm_gate_norm_sum": ("routed", "sum", "[E]", "sum over routed tokens of q_r*||f||"),
    "renorm_gate_norm_sq_sum": ("routed", "sum", "[E]", "sum over routed tokens of (q_r*||f||)^2"),
    # --- direction: TENP and EASY-EP
    "gate_norm_dir_sum": ("direction", "sum", "[E]", "TENP: sum over routed of g*||f||*(1-cos(x_t, f))"),
    "easyep_sum": ("direction", "sum", "[E]",
                   ("EASY-EP: sum over routed of g*||f||*max(1-cos(h_t, h_t+r_t), 0); h_t residual stream "
                    "before the block, r_t the routed output (shared experts excluded)")),
    # --- neurons: TENP expert-neuron pruning
    "neuron_proj_sum": ("neurons", "sum", "[E, I]",
                        "sum over routed tokens of a_{t,k} * <W_down[:,k], f> / ||f|| (signed projection)"),
    "neuron_l2_sum": ("neurons", "sum", "[E, I]", "sum over routed tokens of |a_{t,k}| * ||W_down[:,k]||"),
    # --- transitions: co-routing between this MoE layer and the next one
    "transition": ("transitions", "sum", "[E, E_next]",
                   "tokens routed to i here and to j in the next MoE layer (all slot pairs)"),
    # --- paths: MoE Pathfinder, needs every expert on every token (E x expert FLOPs)
    "sample_tokens": ("paths", "cat", "[N]", "valid tokens per calibration sample"),
    "sample_prob_mean": ("paths", "cat", "[N, E]", "r: mean over the sample's tokens of p"),
    "sample_norm_mean": ("paths", "cat", "[N, E]", "a: mean over ALL the sample's tokens of ||f_j(x_t)||"),
    "sample_recon_loss": ("paths", "cat", "[N, E]",
                          "L: ||Y - F_j||_F per sample, Y routed block output, F_j = f_j(X) (only j kept)"),
    "sample_out_norm": ("paths", "cat", "[N]", "||Y||_F per sample (Pathfinder l_norm='relative')"),
    # --- cluster: C-Prune (sentence-level expert outputs)
    "sentence_out": ("cluster", "cat", "[N, E, H]", "f_j(mean over the sample's valid tokens of x_t)"),
    # --- reconstruction: NAEE enumeration over the cached tokens (all by default; pure function of these).
    # Cached rows are float32 (float64 for float64 models); meta["recon"] records the cache policy.
    "recon_logits": ("reconstruction", "cat", "[T_s, E]", "router logits of cached tokens"),
    "recon_expert_out": ("reconstruction", "cat", "[T_s, E, H]", "f_j(x_t) for every expert on cached tokens"),
    "recon_target": ("reconstruction", "cat", "[T_s, H]", "routed block output (sum_k g*f) of cached tokens"),
    "recon_batch": ("reconstruction", "cat", "[T_s]",
                    "global calibration batch index of each cached token (int64; NAEE sums per-batch norms)"),
    "recon_input": ("reconstruction", "cat", "[T_s, H]",
                    "block input of cached tokens (only for routers with identity experts, LongCat)"),
    "selection_bias": ("reconstruction", "max", "[E_router]",
                       ("selection-only router bias (e_score_correction_bias, expert_bias, moe_statics) added "
                        "to the scores for top-k choice only; zeros when the router has none")),
    # --- naee_online: NAEE's loss of every candidate keep set, accumulated during observe (no token cache).
    # C candidates = the layer's keep sets of meta["naee_online"][layer]["keep"] experts in NAEE's order.
    "naee_loss": ("naee_online", "sum", "[C]", "sum over batches b of ||Y_b - Y'_b(K)||_F (the reference's loss)"),
    "naee_sq": ("naee_online", "sum", "[C]", "sum over batches b of ||Y_b - Y'_b(K)||_F^2 (loss='pooled')"),
    "naee_full_sq": ("naee_online", "sum", "[]", "||Y - Y'(all experts)||_F^2: the routing simulation's miss"),
    "naee_target_sq": ("naee_online", "sum", "[]", "||Y||_F^2 over every valid token"),
    "naee_batches": ("naee_online", "sum", "[]", "calibration batches whose norms were added"),
}
# Per-batch partials of the cheap groups are saved beside the totals as ``<name>@batch`` [B, ...] plus
# ``batch_index@batch`` [B] (observe/partials.py); they concatenate (in batch order) on merge.


def reduction(name: str) -> str:
    """``sum`` / ``max`` / ``cat`` of a saved statistic (partials ``<name>@batch`` concatenate)."""
    return "cat" if is_partial(name) else SCHEMA.get(name, ("", "sum"))[1]


FEATURES = ("routed", "direction", "neurons", "transitions", "paths", "cluster", "reconstruction", "naee_online")


@dataclass
class ExpertStats:
    """Per-layer statistics ``layers[layer_idx][name] -> Tensor`` plus ``meta``.

    ``meta`` keys written by observe: model_type, moe_layers, num_experts {layer: E}, top_k {layer},
    intermediate_size {layer}, hidden_size, n_group {layer: [n_group, topk_group]},
    router {layer: {"score": softmax|sigmoid|probs, "renormalize": bool, "scale": float, "gate_on_input": bool
    (Llama4: g = 1 and f = expert(s * x)), "router_width": E + zero experts (LongCat; width of recon_logits),
    "output_scale": float (factor on the summed routed output), "exact": bool, "source": "adapter"}},
    norm_topk_prob (the model config's flag, False when absent: REAP's reference gate renormalises iff set),
    expert_params {layer: parameters per expert}, other_params (all non-routed-expert parameters),
    dtype_bytes, features [...], num_samples, num_tokens, next_moe_layer {layer: next layer},
    data (source, hash, seq_len, seed), recon (with ``reconstruction``: the NAEE cache decision
    ``observe/recon_cache.py::ReconCachePlan`` - tokens_per_batch (None = all), max_gb, estimate_gb, cached_gb,
    tokens_total, tokens_cached, subsampled (None / "explicit" / "memory bound")), naee_online {layer: {keep,
    candidates}} (with ``naee_online``), and from ``calibrate``: recon_path (path "online" / "cache", mode,
    reason) when NAEE's reconstruction was requested, memory_estimate {group: bytes} (``observe/memory.py``)."""

    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> dict[str, torch.Tensor]:
        return self.layers[layer]

    def get(self, layer: int, name: str) -> torch.Tensor:
        """``layers[layer][name]`` with an error that says which observe feature produces it."""
        try:
            return self.layers[layer][name]
        except KeyError:
            group = SCHEMA.get(name, ("?",))[0]
            have = sorted(self.layers.get(layer, {}))
            raise KeyError(f"statistic {name!r} missing for layer {layer} (have {have}); "
                           f"re-run observe with feature {group!r} enabled") from None

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layers)

    def num_experts(self, layer: int) -> int:
        n = (self.meta.get("num_experts") or {}).get(str(layer))
        return int(n) if n is not None else int(self.get(layer, "count").numel())

    # ---- merging (data-parallel ranks, data shards)
    def merge(self, other: ExpertStats) -> ExpertStats:
        """In place: add ``other``'s statistics (same model and features)."""
        if set(self.layers) != set(other.layers):
            raise ValueError(f"cannot merge stats of layers {sorted(self.layers)} and {sorted(other.layers)}")
        for li, d in other.layers.items():
            mine = self.layers[li]
            if set(mine) != set(d):
                raise ValueError(f"layer {li}: statistics differ: {sorted(set(mine) ^ set(d))}")
            merge_partial_layer(mine, d)
            for name, t in d.items():
                red = reduction(name)
                if red == "cat" and is_partial(name):
                    continue  # concatenated in batch order by merge_partial_layer
                if red == "sum":
                    mine[name] = mine[name] + t
                elif red == "max":
                    mine[name] = torch.maximum(mine[name], t)
                else:
                    mine[name] = torch.cat([mine[name], t], 0)
        for key in ("num_samples", "num_tokens"):
            if key in other.meta:
                self.meta[key] = self.meta.get(key, 0) + other.meta[key]
        return self

    # ---- disk
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{li}.{name}": t.contiguous() for li, d in self.layers.items() for name, t in d.items()}

    def save(self, folder: str | os.PathLike) -> str:
        """``folder/stats.safetensors`` + ``folder/stats.json``, each written atomically."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "stats.safetensors"),
                     lambda p: save_file(self.state_dict(), p, metadata={"format": STATS_FORMAT}))
        meta = {"format": STATS_FORMAT, **self.meta}
        atomic_write_text(os.path.join(folder, "stats.json"), json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ExpertStats:
        folder = os.fspath(folder)
        tp, jp = os.path.join(folder, "stats.safetensors"), os.path.join(folder, "stats.json")
        if not (os.path.exists(tp) and os.path.exists(jp)):
            raise FileNotFoundError(f"{folder} holds no moeprune statistics (stats.safetensors + stats.json); "
                                    "create them with `moeprune observe`")
        try:
            with open(jp, encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{jp} is not valid JSON ({e}); re-run `moeprune observe` to recreate it") from None
        if not isinstance(meta, dict) or meta.pop("format", None) != STATS_FORMAT:
            raise ValueError(f"{jp} is not in format {STATS_FORMAT}")
        try:
            tensors = load_file(tp)
        except Exception as e:  # noqa: BLE001 (safetensors raises SafetensorError, OSError, ...)
            raise ValueError(f"{tp} is unreadable ({type(e).__name__}: {e}); it is truncated or not a safetensors "
                             "file: re-run `moeprune observe` to recreate it") from None
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            li, _, name = key.partition(".")
            if not li.isdigit() or not name:
                raise ValueError(f"{tp}: tensor {key!r} is not named '<layer>.<statistic>'; not moeprune statistics")
            layers.setdefault(int(li), {})[name] = t
        stats = cls(layers=layers, meta=meta)
        stats.check_finite(tp)
        return stats

    def check_finite(self, where: str = "statistics") -> None:
        """Refuse NaN/inf statistics: every method would turn them into arbitrary scores (a plan keeping
        experts 0..k-1), so the error points at the layer and statistic instead."""
        for li, d in sorted(self.layers.items()):
            for name, t in sorted(d.items()):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise ValueError(f"{where}: {bad} of {t.numel()} values of {name!r} in layer {li} are NaN/inf; "
                                     "re-run `moeprune observe` (in float32, or with fewer overflowing tokens)")
