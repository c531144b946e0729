"""The calibration pass: ``observe(model, batches, features) -> ExpertStats``.

``Observer`` turns the capture records of every MoE layer into the accumulators of the requested feature
groups (``routed`` always), pairs consecutive MoE layers for ``transitions`` and writes the metadata
methods need (``ExpertStats.meta``). The same Observer drives the full-model pass (here), the layer-wise
pass (``layerwise.py``) and each rank of the distributed pass (``distributed.py``).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.arch.structure import expert_indexed_tensors
from moeprune.models import input_device
from moeprune.observe.accumulators import (
    Accumulator,
    DirectionAccumulator,
    NeuronAccumulator,
    RoutedAccumulator,
    TransitionAccumulator,
    _sel,
)
from moeprune.observe.accumulators_dense import (
    ClusterAccumulator,
    PathsAccumulator,
    ReconstructionAccumulator,
)
from moeprune.observe.accumulators_naee import NaeeLayerSpec, NaeeOnlineAccumulator
from moeprune.observe.capture import MoECapture, MoERecord
from moeprune.observe.experts import ExpertBank, build_banks
from moeprune.observe.recon_cache import DEFAULT_MAX_GB, ReconCachePlan, check_recon_options, plan_recon_cache
from moeprune.observe.stats import FEATURES, ExpertStats


def normalize_features(features: Iterable[str] | str) -> tuple[str, ...]:
    """Validated feature groups in canonical order, ``routed`` always included."""
    feats = (features,) if isinstance(features, str) else tuple(features)
    bad = [f for f in feats if f not in FEATURES]
    if bad:
        raise ValueError(f"unknown observe feature(s) {bad}; choose from {list(FEATURES)}")
    return tuple(f for f in FEATURES if f == "routed" or f in feats)


class Observer:
    """Per-layer accumulators of the requested features; callable on each ``MoERecord``."""

    def __init__(self, banks: dict[int, ExpertBank], features: Iterable[str] | str = ("routed",), *,
                 seed: int = 0, recon_tokens: int | None = None, recon: ReconCachePlan | None = None,
                 partials: bool = True, naee: Mapping[int, NaeeLayerSpec] | None = None,
                 cluster_dtype: str = "float64"):
        self.banks, self.features = banks, normalize_features(features)
        self.cluster_dtype = cluster_dtype  # storage of the cluster rows (accumulators_dense.CLUSTER_DTYPES)
        if ("naee_online" in self.features) != (naee is not None):
            raise ValueError("the naee_online feature and its candidates (naee={layer: NaeeLayerSpec}, from "
                             "NAEE.online_spec) go together; pass both or neither")
        missing = sorted(set(banks) - set(naee or banks))
        if missing:
            raise ValueError(f"naee_online: no candidates for MoE layers {missing}")
        self.naee = dict(naee) if naee is not None else None  # candidate keep sets per layer (naee_online)
        self.partials = partials  # per-batch partials of the cheap groups (observe/partials.py)
        self.seed, self.recon = seed, recon  # recon: the cache decision, recorded in meta["recon"]
        self.recon_tokens = recon.tokens_per_batch if recon is not None else recon_tokens
        self.layers = sorted(banks)
        self.next_layer = dict(zip(self.layers, self.layers[1:]))
        self.prev_layer = {b: a for a, b in self.next_layer.items()}
        self.acc = {li: self._make(bank) for li, bank in banks.items()}
        self.trans = ({li: TransitionAccumulator(banks[li].num_experts, banks[nx].num_experts)
                       for li, nx in self.next_layer.items()} if "transitions" in self.features else {})
        self.pending: dict[int, torch.Tensor] = {}  # batch index -> idx of the previous MoE layer (valid tokens)
        self.top_k_seen: dict[int, int] = {}
        self.num_tokens = 0
        self.num_samples = 0

    @property
    def needs_intermediates(self) -> bool:
        return "neurons" in self.features

    @property
    def needs_residual(self) -> bool:
        return "direction" in self.features

    def _make(self, bank: ExpertBank) -> dict[str, Accumulator]:
        e, h = bank.num_experts, bank.hidden_size
        acc: dict[str, Accumulator] = {"routed": RoutedAccumulator(e, self.partials)}
        if "direction" in self.features:
            acc["direction"] = DirectionAccumulator(e, self.partials)
        if "neurons" in self.features:
            if bank.intermediate_size is None or bank.post_norm:
                raise ValueError(f"layer {bank.layer} ({type(bank.experts).__name__}): expert neurons are not "
                                 "separable (norm over the expert output); drop the 'neurons' feature")
            acc["neurons"] = NeuronAccumulator(e, bank.intermediate_size)
        if "paths" in self.features:
            acc["paths"] = PathsAccumulator(e)
        if "cluster" in self.features:
            acc["cluster"] = ClusterAccumulator(e, h, self.cluster_dtype)
        if "reconstruction" in self.features:
            acc["reconstruction"] = ReconstructionAccumulator(e, bank.router_width, h, self.recon_tokens, self.seed)
        if self.naee is not None:
            acc["naee_online"] = NaeeOnlineAccumulator(e, self.naee[bank.layer])
        return acc

    def __call__(self, rec: MoERecord) -> None:
        li = rec.layer
        for acc in self.acc[li].values():
            acc.update(rec)
        self.top_k_seen[li] = int(rec.idx.shape[1])
        if li == self.layers[0]:
            rows = rec.rows[rec.valid]
            self.num_tokens += int(rows.numel())
            self.num_samples += int((torch.bincount(rows, minlength=rec.num_rows) > 0).sum())
        if self.trans:
            idx = _sel(rec.idx, rec.valid_index)
            prev = self.prev_layer.get(li)
            if prev is not None:
                got = self.pending.pop(rec.batch_index, None)
                if got is None:
                    raise RuntimeError(f"transitions: MoE layer {prev} was not observed for batch "
                                       f"{rec.batch_index} before layer {li}")
                self.trans[prev].update_pair(got.to(idx.device).long(), idx)
            if li in self.next_layer:
                self.pending[rec.batch_index] = idx.to("cpu", torch.int32)

    # ---- persistence / merging
    def state_dict(self) -> dict[str, Any]:
        return {"layers": {li: {g: a.state_dict() for g, a in d.items()} for li, d in self.acc.items()},
                "trans": {li: a.state_dict() for li, a in self.trans.items()},
                "pending": dict(self.pending), "top_k_seen": dict(self.top_k_seen),
                "num_tokens": self.num_tokens, "num_samples": self.num_samples}

    def load_state_dict(self, sd: dict[str, Any]) -> Observer:
        for li, d in sd["layers"].items():
            for g, s in d.items():
                self.acc[li][g].load_state_dict(s)
        for li, s in sd["trans"].items():
            self.trans[li].load_state_dict(s)
        self.pending = dict(sd["pending"])
        self.top_k_seen = dict(sd["top_k_seen"])
        self.num_tokens, self.num_samples = sd["num_tokens"], sd["num_samples"]
        return self

    def merge(self, other: Observer) -> Observer:
        for li, d in other.acc.items():
            for g, a in d.items():
                self.acc[li][g].merge(a)
        for li, a in other.trans.items():
            self.trans[li].merge(a)
        self.num_tokens += other.num_tokens
        self.num_samples += other.num_samples
        self.top_k_seen = {**other.top_k_seen, **self.top_k_seen}
        return self

    def result(self, model: nn.Module, data: Mapping[str, Any] | None = None) -> ExpertStats:
        layers = {}
        for li in self.layers:
            d: dict[str, torch.Tensor] = {}
            for a in self.acc[li].values():
                d.update(a.result())
            if li in self.trans:
                d.update(self.trans[li].result())
            layers[li] = d
        return ExpertStats(layers=layers, meta=build_meta(model, self, data))


def expert_param_count(block: nn.Module) -> int:
    """Parameters one expert of ``block`` owns (expert tensors' slices, router row, per-expert biases)."""
    tensors, n, _ = expert_indexed_tensors(block)
    total = 0
    for _qn, mod, attr, dim in tensors:
        if attr in mod._parameters:
            t = getattr(mod, attr)
            total += t.numel() // (n if dim == -1 else t.shape[dim])
    return int(total)


def build_meta(model: nn.Module, obs: Observer, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``ExpertStats.meta`` (see the stats.py docstring); layer keys are strings (JSON)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    banks = obs.banks
    per = {li: expert_param_count(b.block) for li, b in banks.items()}
    total = sum(p.numel() for p in model.parameters())
    first = next(iter(banks.values()))
    ex_param = next(iter(first.experts.parameters()), None)

    def router(b: ExpertBank) -> dict[str, Any]:  # the adapter's recipe (arch/routing.py), never a numeric guess
        r = b.routing
        return {**r, "renormalize": bool(r["renormalize"]), "scale": float(r["scale"]), "router_width": b.router_width}

    return {
        "model_type": getattr(text, "model_type", None) or getattr(cfg, "model_type", None),
        "moe_layers": list(obs.layers),
        "num_experts": {str(li): b.num_experts for li, b in banks.items()},
        "top_k": {str(li): int(b.top_k or obs.top_k_seen.get(li, 0)) for li, b in banks.items()},
        "intermediate_size": {str(li): b.intermediate_size for li, b in banks.items()},
        "hidden_size": first.hidden_size,
        "n_group": {str(li): b.n_group for li, b in banks.items()},
        "router": {str(li): router(b) for li, b in banks.items()},
        "norm_topk_prob": bool(getattr(text, "norm_topk_prob", False)),  # REAP renormalises its gate iff set
        "expert_params": {str(li): n for li, n in per.items()},
        "other_params": int(total - sum(per[li] * banks[li].num_experts for li in banks)),
        "dtype_bytes": ex_param.element_size() if ex_param is not None else None,
        "features": list(obs.features),
        "num_samples": obs.num_samples,
        "num_tokens": obs.num_tokens,
        "next_moe_layer": {str(a): b for a, b in obs.next_layer.items()},
        "data": dict(data) if data else {},
        **({"recon": obs.recon.meta()} if obs.recon is not None and "reconstruction" in obs.features else {}),
        **({"naee_online": {str(li): sp.meta() for li, sp in obs.naee.items()}} if obs.naee is not None else {}),
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Calibrate in eval(): router jitter / sampling is active in training mode (and edits inputs in place)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def as_batch(b: Any) -> dict[str, Any]:
    """A batch as forward kwargs: a tensor of input ids, or a mapping with ``input_ids``/``inputs_embeds``."""
    if isinstance(b, torch.Tensor):
        return {"input_ids": b if b.dim() == 2 else b.unsqueeze(0)}
    if isinstance(b, Mapping) and ("input_ids" in b or "inputs_embeds" in b):
        return dict(b)
    raise TypeError(f"a calibration batch must be a LongTensor [B, S] or a mapping with input_ids; got "
                    f"{type(b).__name__}{sorted(b) if isinstance(b, Mapping) else ''}")


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """No KV cache, and only the last position's logits when the head supports it (saves the [B,S,V] matmul)."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


def recon_observer(model: nn.Module, batches: Iterable[Any], features: Iterable[str] | str, *, seed: int,
                   recon_tokens: int | None, recon_max_gb: float | None, recon: ReconCachePlan | None = None,
                   partials: bool = True, naee: Mapping[int, NaeeLayerSpec] | None = None,
                   cluster_dtype: str = "float64") -> tuple[Observer, list[dict[str, Any]] | Iterable[Any]]:
    """The Observer, with the ``reconstruction`` cache decided from ALL ``batches`` before calibration
    (``recon`` given: a decision already made on the full data, e.g. by ``observe_distributed``)."""
    check_recon_options(recon_tokens, recon_max_gb)
    banks, feats = build_banks(model), normalize_features(features)
    if "reconstruction" in feats and recon is None:
        batches = [as_batch(b) for b in batches]
        recon = plan_recon_cache(banks, batches, tokens_per_batch=recon_tokens, max_gb=recon_max_gb)
    obs = Observer(banks, feats, seed=seed, recon_tokens=recon_tokens, recon=recon, partials=partials, naee=naee,
                   cluster_dtype=cluster_dtype)
    return obs, batches


def observe(model: nn.Module, batches: Iterable[Any], *, features: Iterable[str] | str = ("routed",),
            progress: bool = True, seed: int = 0, recon_tokens: int | None = None,
            recon_max_gb: float | None = DEFAULT_MAX_GB, implementation: str = "auto",
            data: Mapping[str, Any] | None = None, batch_offset: int = 0,
            recon: ReconCachePlan | None = None, partials: bool = True,
            naee: Mapping[int, NaeeLayerSpec] | None = None, cluster_dtype: str = "float64") -> ExpertStats:
    """One calibration pass over ``batches`` collecting ``features`` (see ``observe/stats.py::SCHEMA``).

    ``batches``: LongTensors ``[B, S]`` or dicts with ``input_ids`` (+ ``attention_mask``; 0 = padding,
    excluded from every statistic). ``reconstruction`` (NAEE) caches every token, as the reference, unless
    that exceeds ``recon_max_gb`` GB (then a seeded subsample per batch, with a warning) or ``recon_tokens``
    (tokens per batch, ``seed`` seeds the choice) asks for a subsample; see ``observe/recon_cache.py``.
    ``data`` is recorded in ``meta["data"]``; ``batch_offset`` is the global index of the first batch (for
    shards). ``partials`` keeps each batch's own ``routed`` / ``direction`` sums next to the totals
    (``observe/partials.py``: ``8 B (16 E + 1)`` bytes per layer for ``routed``), for ``moeprune stability``.
    ``naee``: with the ``naee_online`` feature, the candidate keep sets scored per layer during the pass
    (``observe/accumulators_naee.py``; from ``NAEE.online_spec``). ``cluster_dtype="float16"`` stores C-Prune's
    rows in float16 (``ClusterAccumulator``)."""
    obs, batches = recon_observer(model, batches, features, seed=seed, recon_tokens=recon_tokens,
                                  recon_max_gb=recon_max_gb, recon=recon, partials=partials, naee=naee,
                                  cluster_dtype=cluster_dtype)
    run_batches(model, batches, obs, progress=progress, implementation=implementation, batch_offset=batch_offset)
    return obs.result(model, data)


def run_batches(model: nn.Module, batches: Iterable[Any], obs: Observer, *, progress: bool = True,
                implementation: str = "auto", batch_offset: int = 0) -> None:
    device, extra = input_device(model), forward_kwargs(model)
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(model), torch.no_grad(), MoECapture(
            model, obs, banks=obs.banks, intermediates=obs.needs_intermediates, residual=obs.needs_residual,
            implementation=implementation) as cap:
        for i, b in enumerate(tqdm(batches, total=total, desc="observe", disable=not progress)):
            b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in as_batch(b).items()}
            cap.next_index = batch_offset + i
            model(**b, **extra)
