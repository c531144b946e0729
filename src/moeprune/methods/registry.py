"""Method registry: a frozen config class per method, registered by name with a decorator.

A method turns saved statistics (``ExpertStats``) into a ``PruningPlan`` for a ``Target``. Methods
that only rank experts implement ``score`` and inherit ``plan`` (ranking + allocation); methods that
decide allocation themselves (Pathfinder, C-Prune, NAEE, TENP) override ``plan``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan

METHODS: dict[str, type["MethodConfig"]] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("reap")`` on a frozen dataclass subclass of MethodConfig."""

    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are ``@dataclass(frozen=True)`` with their knobs."""

    name: ClassVar[str] = "base"
    needs: ClassVar[tuple[str, ...]] = ("routed",)  # observe feature groups (see observe.stats.FEATURES)

    def score(self, stats: "ExpertStats") -> dict[int, torch.Tensor]:
        """Per-layer importance ``[E]`` (higher = keep)."""
        raise NotImplementedError(f"method {self.name!r} plans directly and has no per-expert score")

    def plan(self, stats: "ExpertStats", target: "Target") -> "PruningPlan":
        from moeprune.methods.allocation import plan_from_scores

        return plan_from_scores(stats, self.score(stats), target, method=self.name, method_config=self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def get_method(name: str, **kwargs) -> MethodConfig:
    """Build a registered method config by name, with a helpful error for unknown names/options."""
    import moeprune.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kwargs) - fields)
    if bad:
        raise ValueError(f"method {name!r} has no option(s) {bad}; its options are {sorted(fields)}")
    return cls(**kwargs)
