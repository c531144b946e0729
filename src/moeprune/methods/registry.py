"""Method registry: a frozen config class per method, registered by name with a decorator.

A method turns saved statistics (``ExpertStats``) into a ``PruningPlan`` for a ``Target``. Methods
that only rank experts implement ``score`` and inherit ``plan`` (ranking + allocation); methods that
decide allocation themselves (Pathfinder, C-Prune, NAEE, TENP) override ``plan``.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from moeprune.methods.target import Target
    from moeprune.observe.stats import ExpertStats
    from moeprune.plan import PruningPlan

METHODS: dict[str, type[MethodConfig]] = {}


def registrar(table: dict[str, type], kind: str, prepare: Callable[[type], None] | None = None):
    """The one registration rule (methods, recovery steps): a class decorator factory ``register(name)``
    that names the class, refuses a name registered twice and files the class in ``table``."""

    def register(name: str):
        def deco(cls):
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered by {table[name].__qualname__}")
            cls.name = name
            if prepare is not None:
                prepare(cls)
            table[name] = cls
            return cls

        return deco

    return register


def register_method(name: str):
    """Class decorator: ``@register_method("reap")`` on a frozen dataclass subclass of MethodConfig."""
    return registrar(METHODS, "method", lambda cls: setattr(cls, "__init__", _typed_init(cls.__init__)))(name)


@functools.cache
def _adapters(cls: type) -> dict[str, Any]:
    """Strict pydantic validators of a method config's fields, from their annotations."""
    from pydantic import ConfigDict, TypeAdapter

    hints = typing.get_type_hints(cls)
    return {f.name: TypeAdapter(hints[f.name], config=ConfigDict(strict=True)) for f in dataclasses.fields(cls)}


def check_option_types(cls: type, values: dict[str, Any]) -> None:
    """Refuse option values whose type does not match the field's annotation (strict: ``"yes"`` is no bool,
    ``True`` no int, ``"0.5"`` no float; an int is a valid float), before the method is ever used."""
    from pydantic import ValidationError

    adapters = _adapters(cls)
    for key, val in values.items():
        if key not in adapters:
            continue
        try:
            adapters[key].validate_python(val)
        except ValidationError:
            ann = typing.get_type_hints(cls)[key]
            want = getattr(ann, "__name__", None) or str(ann)
            raise ValueError(f"method {cls.name!r}: option {key}={val!r} ({type(val).__name__}) must be {want}; "
                             f"e.g. {key}={_example(dataclasses.fields(cls), key)!r}") from None


def _example(fields, key: str) -> Any:
    return next(f.default for f in fields if f.name == key)


def _typed_init(init):
    """Wrap a registered config's ``__init__`` so every construction checks the option types first."""
    if getattr(init, "_typed", False):
        return init

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(type(self))]
        check_option_types(type(self), {**dict(zip(names, args)), **kwargs})
        init(self, *args, **kwargs)

    __init__._typed = True
    return __init__


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are ``@dataclass(frozen=True)`` with their knobs."""

    name: ClassVar[str] = "base"
    needs: ClassVar[tuple[str, ...]] = ("routed",)  # observe feature groups (see observe.stats.FEATURES)

    def score(self, stats: ExpertStats) -> dict[int, torch.Tensor]:
        """Per-layer importance ``[E]`` (higher = keep)."""
        raise NotImplementedError(f"method {self.name!r} plans directly and has no per-expert score")

    def plan(self, stats: ExpertStats, target: Target) -> PruningPlan:
        from moeprune.methods.allocation import plan_from_scores

        scores = self.score(stats)
        for li, s in scores.items():
            bad = int(torch.isnan(s).sum())  # +inf is legitimate: the super-expert guard pins experts with it
            if bad:
                raise ValueError(f"method {self.name!r}: {bad} of {s.numel()} scores of layer {li} are NaN "
                                 "(statistics with NaN, or a layer no token reached); re-run observe in float32 "
                                 "with more calibration data")
        return plan_from_scores(stats, scores, target, method=self.name, method_config=self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def get_method(name: str, **kwargs) -> MethodConfig:
    """Build a registered method config by name, with a helpful error for unknown names/options."""
    import moeprune.methods  # noqa: F401  (registers the built-in methods)

    return registered(METHODS, "method", name, kwargs)(**kwargs)


def registered(table: dict[str, type], kind: str, name: str, kwargs: dict[str, Any], hint: str = "") -> type:
    """The class registered as ``name`` in ``table``; unknown names and option names are refused with the
    choices (``hint`` is appended to the list of names)."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}{hint}")
    cls = table[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kwargs) - fields)
    if bad:
        raise ValueError(f"{kind} {name!r} has no option(s) {bad}; its options are {sorted(fields)}")
    return cls
