"""Sequential (error-propagating) calibration: prune each layer before the next one is observed.

One-shot calibration observes every MoE layer on the ORIGINAL model's activations. Sequential calibration
(llm-compressor's ``REAPPruningModifier`` pipeline, offered here for every method) plans MoE layer ``l`` as
soon as it has been observed over all batches, then re-runs layer ``l`` with its dropped experts masked
(router ``-inf``, neuron plans by zeroed channels: ``apply/masking.py::mask_experts``) so layer ``l + 1`` is
observed on the inputs the PRUNED model will give it: each layer's choice sees the upstream error.

Rules (each enforced before the pass, with the fix in the message):

* the count kept in each layer must be fixed before the layer is observed: ``allocation: uniform`` only,
  and a budget whose per-layer count does not depend on later layers (``expert_sparsity``,
  ``param_ratio``; ``memory_gb`` is refused: its budget includes every layer);
* layer ``l``'s decision is the method's own ``plan`` on layer ``l``'s statistics alone; methods whose
  plan links layers (``needs`` ``paths`` or ``transitions``: MoE Pathfinder's paths run through all layers)
  plan on ALL layers and take layer ``l``'s row: layers ``0..l`` carry the sequential statistics (pruned
  upstream), layers after ``l`` (and layer ``l``'s pairs with ``l + 1``) those of a one-shot look-ahead
  pass run first (unpruned model; one extra layer-wise pass, resumable in ``checkpoint_dir/lookahead``). Paths cut at layer
  ``l`` instead would degenerate: with ``m`` >= the number of paths of the prefix (16 experts, ``m = 100``
  at layer 0) every expert ties and the lowest ids are kept;
* TENP's neuron plans (``param_ratio``: trapezoid and shared width over all ``L`` layers) plan on all layers
  with the look-ahead as well; layer ``l``'s narrowed experts are masked by zeroing their dropped channels;
* refused: REAP's super-expert guard (``preserve_super_experts``: a quantile over all layers' maxima).

The statistics of layer ``l`` are those of its observation pass only (the masked re-run records nothing),
so re-planning the final statistics with a per-layer method gives the same plan. The decisions are part
of the layer-wise checkpoint's committed state (a resumed run keeps them).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moeprune.apply.masking import mask_experts
from moeprune.observe.runner import Observer, build_meta
from moeprune.observe.stats import ExpertStats
from moeprune.plan import LayerPlan, PruningPlan

if TYPE_CHECKING:
    from moeprune.methods.registry import MethodConfig
    from moeprune.methods.target import Target
    from moeprune.observe.capture import MoECapture

CROSS_LAYER_FEATURES = ("paths", "transitions")  # methods needing these plan on all layers (look-ahead)
_LAYER_KEYS = ("num_experts", "top_k", "intermediate_size", "n_group", "router", "expert_params")


def _layers_meta(meta: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """``meta`` with its per-layer entries restricted to ``layers``."""
    keep = {str(li) for li in layers}
    for key in _LAYER_KEYS:
        if isinstance(meta.get(key), dict):
            meta[key] = {k: v for k, v in meta[key].items() if k in keep}
    return meta


def restrict_stats(obs: Observer, model: nn.Module, data: Mapping[str, Any] | None,
                   layers: list[int]) -> ExpertStats:
    """The statistics of ``layers`` (observed so far) with their metadata, as if the model had only them."""
    meta = _layers_meta(build_meta(model, obs, data), layers)
    keep = {str(li) for li in layers}
    meta["moe_layers"] = list(layers)
    meta["next_moe_layer"] = {a: b for a, b in meta["next_moe_layer"].items() if a in keep and str(b) in keep}
    out: dict[int, dict[str, torch.Tensor]] = {}
    for li in layers:
        d: dict[str, torch.Tensor] = {}
        for a in obs.acc[li].values():
            d.update(a.result())
        if li in obs.trans and obs.next_layer[li] in layers:  # the last layer's pairs are not complete yet
            d.update(obs.trans[li].result())
        out[li] = d
    return ExpertStats(layers=out, meta=meta)


def _skeleton(obs: Observer, model: nn.Module, layers: list[int]) -> ExpertStats:
    """Metadata-only stats (no tensors) of ``layers``: enough to resolve a target's per-layer counts."""
    meta = _layers_meta(build_meta(model, obs), layers)
    for li in layers:  # top_k only sets floors (feasibility is checked by the method's plan); 1 is safe here
        meta["top_k"][str(li)] = meta["top_k"].get(str(li)) or 1
    return ExpertStats(layers={li: {} for li in layers}, meta=meta)


class SequentialPlanner:
    """Per-layer decisions of ``method`` for ``target`` during a layer-wise pass (see the module docstring)."""

    def __init__(self, method: MethodConfig, target: Target, obs: Observer, model: nn.Module):
        self.method, self.target = method, target
        # TENP's neuron plan: trapezoid and shared width resolved over all layers; it keeps every expert
        self.neuron_plan = method.name == "tenp" and target.expert_sparsity is None
        self.cross_layer = bool(set(method.needs) & set(CROSS_LAYER_FEATURES)) or self.neuron_plan
        self.layers = list(obs.layers)
        self.lookahead: ExpertStats | None = None  # one-shot statistics of every layer (cross-layer methods)
        self.decisions: dict[int, LayerPlan] = {}
        self.layer_meta: dict[int, dict[str, Any]] = {}
        self.counts = self._check(obs, model)

    def _scope(self, li: int) -> list[int]:
        return list(self.layers) if self.cross_layer else [li]

    def _stats(self, li: int, obs: Observer, model: nn.Module, data: Mapping[str, Any] | None) -> ExpertStats:
        """What layer ``li`` is planned from (see the module docstring)."""
        if not self.cross_layer:
            return restrict_stats(obs, model, data, [li])
        if self.lookahead is None:
            raise RuntimeError(f"{self.method.name} plans on all layers: run the look-ahead pass first")
        seen = restrict_stats(obs, model, data, [x for x in self.layers if x <= li])
        rows = {x: dict(self.lookahead[x]) for x in self.layers}
        for x, d in seen.layers.items():
            rows[x] = {**d, **({"transition": rows[x]["transition"]} if x == li and "transition" in rows[x] else {})}
        return ExpertStats(layers=rows, meta=dict(self.lookahead.meta))

    def _check(self, obs: Observer, model: nn.Module) -> dict[int, int]:
        """Refuse what a layer-by-layer decision cannot reproduce; the per-layer kept counts."""
        m, t = self.method, self.target
        if t.allocation != "uniform":
            raise ValueError(f"sequential calibration decides each layer before the next one is observed, so "
                             f"every layer's count must be fixed in advance: allocation={t.allocation!r} is not "
                             "supported; use allocation: uniform (or one-shot calibration)")
        if getattr(m, "preserve_super_experts", False):
            raise ValueError(f"{m.name}: preserve_super_experts takes a quantile over all layers, which a "
                             "layer-by-layer decision cannot see; set preserve_super_experts=false or use "
                             "one-shot calibration (sequential: false)")
        full = t.resolve(_skeleton(obs, model, self.layers), check=False).uniform_keep
        for li in self.layers:
            part = t.resolve(_skeleton(obs, model, self._scope(li)), check=False).uniform_keep[li]
            if part != full[li]:
                raise ValueError(f"{t.kind}={getattr(t, t.kind)} keeps {full[li]} experts in layer {li} when "
                                 f"resolved on all layers but {part} on the layers seen so far: its budget spans "
                                 "every layer; use expert_sparsity or param_ratio for sequential calibration")
        return dict(full)

    def fingerprint(self) -> dict[str, Any]:
        return {"method": self.method.to_dict(), "target": self.target.to_dict()}

    def decide(self, li: int, obs: Observer, model: nn.Module, data: Mapping[str, Any] | None) -> LayerPlan:
        """Plan layer ``li`` from the statistics gathered so far (its own; or all layers, with look-ahead)."""
        plan = self.method.plan(self._stats(li, obs, model, data), self.target)
        lp = plan.layers[li]
        if len(lp.keep) != self.counts[li] and not self.neuron_plan:
            raise RuntimeError(f"{self.method.name} kept {len(lp.keep)} experts in layer {li}, the target fixes "
                               f"{self.counts[li]}; sequential calibration needs a fixed per-layer count")
        self.decisions[li] = lp
        self.layer_meta[li] = json.loads(json.dumps(plan.meta, default=str))  # plain containers (checkpoint)
        return lp

    @contextlib.contextmanager
    def masked(self, model: nn.Module, li: int) -> Iterator[nn.Module]:
        """Layer ``li`` runs as pruned by its decision (router -inf / zeroed channels)."""
        with mask_experts(model, PruningPlan(layers={li: self.decisions[li]})):
            yield model

    # ---- committed state (layer-wise checkpoint) and result
    def state_dict(self) -> dict[str, Any]:
        return {"decisions": {li: lp.to_dict() for li, lp in self.decisions.items()},
                "layer_meta": dict(self.layer_meta)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.decisions = {int(li): LayerPlan.from_dict(d, li) for li, d in sd.get("decisions", {}).items()}
        self.layer_meta = {int(li): m for li, m in sd.get("layer_meta", {}).items()}

    def plan(self, model_type: str | None) -> PruningPlan:
        """The recorded per-layer decisions as one plan (``meta.sequential: true``)."""
        missing = [li for li in self.layers if li not in self.decisions]
        if missing:
            raise RuntimeError(f"sequential calibration has no decision for MoE layers {missing}")
        meta = {"sequential": True, "rule": "all layers, look-ahead after l" if self.cross_layer else "layer l alone",
                "layers": {str(li): m for li, m in self.layer_meta.items()}}
        return PruningPlan(layers=dict(self.decisions), method=self.method.name,
                           method_config=self.method.to_dict(), target=self.target.to_dict(),
                           model_type=model_type, meta=meta)


@contextlib.contextmanager
def recording_paused(cap: MoECapture) -> Iterator[None]:
    """The masked re-run of a layer only produces the next layer's inputs: its records are dropped."""
    old = cap.on_record
    cap.on_record = lambda rec: None
    try:
        yield
    finally:
        cap.on_record = old


def sequential_plan(stats: ExpertStats) -> PruningPlan:
    """The plan a sequential calibration recorded in ``stats.meta["sequential_plan"]``."""
    d = stats.meta.get("sequential_plan")
    if d is None:
        raise ValueError("these statistics come from a one-shot calibration (no sequential_plan in their "
                         "metadata); plan them with `moeprune plan`, or calibrate with sequential: true")
    plan = PruningPlan.from_dict(d)
    if "recon_path" in stats.meta:  # set by calibrate after the pass: which NAEE path scored the keep sets
        plan.meta.setdefault("recon_path", stats.meta["recon_path"].get("path"))
    return plan


def decoder_index(layer_list_name: str, banks: Mapping[int, Any]) -> dict[int, int]:
    """``{decoder layer index: MoE layer id}`` from the blocks' module names (``model.layers.3.mlp`` -> 3)."""
    out = {}
    for li, bank in banks.items():
        out[int(bank.name[len(layer_list_name) + 1:].split(".")[0])] = li
    return out
