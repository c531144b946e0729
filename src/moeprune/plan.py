"""The pruning plan: the one artifact that links score/plan to apply.

A plan lists, per MoE layer, the experts to keep (original ids, sorted) and optionally, per kept
expert, the intermediate channels to keep. It is plain JSON so it can be inspected, edited, diffed
and applied to a model in memory or to a checkpoint on disk.
"""
from __future__ import annotations

import json
import logging
import operator
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from moeprune.atomic import atomic_write_text

PLAN_FORMAT = "moeprune.plan/v1"
log = logging.getLogger("moeprune")


def _ids(values, what: str) -> tuple[int, ...]:
    """Integer ids: ``0.5`` or ``"1"`` is refused, not rounded (a silent wrong expert otherwise)."""
    out = []
    for v in values:
        if isinstance(v, bool):
            raise ValueError(f"{what}: {v!r} is not an integer id")  # noqa: TRY004 (CLI reports ValueError)
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what}: {v!r} ({type(v).__name__}) is not an integer id; ids are whole numbers "
                             "like 0, 1, 2") from None
    return tuple(out)


@dataclass(frozen=True)
class LayerPlan:
    """Plan of one MoE layer. ``keep``: sorted original expert ids; ``neurons``: original expert id ->
    sorted kept channel ids (experts absent from it keep every channel)."""

    num_experts: int
    keep: tuple[int, ...]
    neurons: dict[int, tuple[int, ...]] | None = None
    intermediate_size: int | None = None
    scores: tuple[float, ...] | None = None

    def __post_init__(self):
        keep = tuple(sorted(_ids(self.keep, "keep")))
        object.__setattr__(self, "keep", keep)
        if len(set(keep)) != len(keep):
            raise ValueError(f"duplicate expert ids in keep={list(keep)}")
        if keep and (keep[0] < 0 or keep[-1] >= self.num_experts):
            raise ValueError(f"expert ids {list(keep)} out of range [0, {self.num_experts})")
        if self.neurons is not None:
            neurons = {_ids([e], "neurons")[0]: tuple(sorted(_ids(v, f"neurons of expert {e}")))
                       for e, v in self.neurons.items()}
            bad = sorted(set(neurons) - set(keep))
            if bad:
                raise ValueError(f"neuron keeps given for experts {bad} that the plan removes")
            object.__setattr__(self, "neurons", neurons)
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))

    @property
    def removed(self) -> tuple[int, ...]:
        kept = set(self.keep)
        return tuple(e for e in range(self.num_experts) if e not in kept)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (plan files, layer-wise checkpoints): unset fields left out, neuron keys as strings."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["keep"] = list(self.keep)
        if self.neurons is not None:
            d["neurons"] = {str(e): list(v) for e, v in self.neurons.items()}
        if self.scores is not None:
            d["scores"] = list(self.scores)
        return d

    @classmethod
    def from_dict(cls, ld: dict[str, Any], li: Any = "?") -> LayerPlan:
        """Parse ``to_dict``'s form (``li``: the layer, for messages)."""
        missing = [k for k in ("num_experts", "keep") if k not in ld]
        if missing:
            raise ValueError(f"plan layer {li} lacks {missing}")
        neurons = ld.get("neurons")
        return cls(num_experts=_ids([ld["num_experts"]], f"layer {li} num_experts")[0], keep=tuple(ld["keep"]),
                   neurons={_ids([int(e)], "expert")[0]: tuple(v) for e, v in neurons.items()}
                   if neurons is not None else None,
                   intermediate_size=ld.get("intermediate_size"),
                   scores=tuple(ld["scores"]) if ld.get("scores") is not None else None)


@dataclass(frozen=True)
class PruningPlan:
    """Per-layer kept experts (and neurons) plus where they came from."""

    layers: dict[int, LayerPlan]
    method: str = "manual"
    method_config: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    model_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "layers", {int(k): v for k, v in sorted(self.layers.items())})

    # ---- views
    def keep(self) -> dict[int, list[int]]:
        return {li: list(lp.keep) for li, lp in self.layers.items()}

    def kept_counts(self) -> dict[int, int]:
        return {li: len(lp.keep) for li, lp in self.layers.items()}

    @property
    def is_uniform(self) -> bool:
        return len(set(self.kept_counts().values())) <= 1

    @property
    def has_neurons(self) -> bool:
        return any(lp.neurons for lp in self.layers.values())

    def expert_sparsity(self) -> float:
        total = sum(lp.num_experts for lp in self.layers.values())
        return 1.0 - sum(len(lp.keep) for lp in self.layers.values()) / max(total, 1)

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        layers = {str(li): lp.to_dict() for li, lp in self.layers.items()}
        return {"format": PLAN_FORMAT, "method": self.method, "method_config": self.method_config,
                "target": self.target, "model_type": self.model_type,
                "summary": {"expert_sparsity": round(self.expert_sparsity(), 6), "kept": self.kept_counts()},
                "layers": layers, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        """Parse a plan JSON, refusing edits that would silently prune the wrong thing: a missing
        ``model_type`` key (write ``null`` to apply to any model), layers that disagree with the summary."""
        fmt = d.get("format") if isinstance(d, dict) else None
        if fmt != PLAN_FORMAT:
            raise ValueError(f"not a moeprune plan: format={fmt!r}, expected {PLAN_FORMAT!r}")
        if "model_type" not in d:
            raise ValueError("the plan has no 'model_type' key, so it cannot be checked against the model; set it "
                             "to the model's model_type (or to null to apply it to any model with matching shapes)")
        if not isinstance(d.get("layers"), dict) or not d["layers"]:
            raise ValueError("the plan has no 'layers' mapping (layer index -> {num_experts, keep})")
        layers = {_ids([int(li)], "layer")[0]: LayerPlan.from_dict(ld, li) for li, ld in d["layers"].items()}
        _check_summary(d.get("summary"), layers)
        if d["model_type"] is None:
            log.warning("the plan has model_type null: it is applied to any model whose MoE shapes match")
        return cls(layers=layers, method=d.get("method", "manual"), method_config=d.get("method_config") or {},
                   target=d.get("target") or {}, model_type=d["model_type"], meta=d.get("meta") or {})

    def uncovered_layers(self, moe_layers) -> list[int]:
        """MoE layers of a model that the plan leaves unpruned (it has no entry for them)."""
        return sorted({int(li) for li in moe_layers} - set(self.layers))

    def save(self, path: str | os.PathLike) -> str:
        """Write atomically (temp file + rename): a crash never leaves a half-written plan."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"plan file {path!r} does not exist; write one with `moeprune plan`")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"plan file {path!r} is not valid JSON ({e}); write one with `moeprune plan`") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"plan file {path!r}: {e}") from None

    @classmethod
    def from_keep(cls, keep: dict[int, list[int]], num_experts: dict[int, int] | int, **kw) -> PruningPlan:
        ne = num_experts if isinstance(num_experts, dict) else {li: num_experts for li in keep}
        return cls(layers={li: LayerPlan(num_experts=ne[li], keep=tuple(v)) for li, v in keep.items()}, **kw)


def _check_summary(summary: Any, layers: dict[int, LayerPlan]) -> None:
    """The summary written with the plan must still describe its layers (catches a deleted layer)."""
    kept = (summary or {}).get("kept") if isinstance(summary, dict) else None
    if kept is None:
        return
    have = {li: len(lp.keep) for li, lp in layers.items()}
    want = {int(k): int(v) for k, v in kept.items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have.get(k))
        raise ValueError(f"the plan's layers {sorted(have)} disagree with its summary {sorted(want)} (layers {diff} "
                         "differ): it was edited by hand; fix the layers, or delete 'summary' to accept them as "
                         "they are")
