"""Recovery step configs: one frozen dataclass per step, registered by name (``compensate``, ``merge``).

Recovery runs between plan and apply: it changes the UNPRUNED model's kept experts (and router rows) in
place so that the pruned layer's output on calibration tokens is closer to the unpruned layer's; the
normal ``apply_plan`` / ``save_pruned`` then removes the dropped experts (same shapes as plain pruning).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from moeprune.methods.registry import check_option_types, registered, registrar

RECOVERIES: dict[str, type[RecoveryConfig]] = {}


def register_recovery(name: str):
    """Class decorator: ``@register_recovery("merge")`` on a frozen ``RecoveryConfig`` subclass."""
    return registrar(RECOVERIES, "recovery")(name)


@dataclass(frozen=True)
class RecoveryConfig:
    """Options every step shares: which calibration tokens are captured per MoE layer.

    ``max_tokens``: a seeded subsample of the calibration tokens (the same positions for every layer);
    ``max_gb``: bound on the captured inputs of all layers (checked before the capture pass)."""

    name: ClassVar[str] = "base"
    max_tokens: int = 4096
    max_gb: float = 4.0
    seed: int = 0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"recovery {self.name!r}: max_tokens={self.max_tokens} must be >= 1 (captured "
                             "calibration tokens per MoE layer, default 4096)")
        if not self.max_gb > 0:
            raise ValueError(f"recovery {self.name!r}: max_gb={self.max_gb} must be > 0 (GB of captured inputs)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


@register_recovery("compensate")
@dataclass(frozen=True)
class CompensateConfig(RecoveryConfig):
    """Closed-form ridge least squares (float64) so the pruned layer matches the unpruned routed output.

    ``target="down"``: each kept expert's down projection (one block-coordinate sweep in expert order);
    ``"scale"``: one output scale per kept expert (joint fit). ``ridge``: shrinkage toward the current
    weights (scale 1), relative to the Gram's mean diagonal, so it is unit-free."""

    target: str = "down"
    ridge: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.target not in ("down", "scale"):
            raise ValueError(f"recovery 'compensate': target={self.target!r} must be 'down' (fit each kept "
                             "expert's down projection) or 'scale' (one output scale per kept expert)")
        if not self.ridge >= 0:
            raise ValueError(f"recovery 'compensate': ridge={self.ridge} must be >= 0 (relative ridge; "
                             "default 0.1, 0 = plain least squares)")


@register_recovery("merge")
@dataclass(frozen=True)
class MergeConfig(RecoveryConfig):
    """Fold each dropped expert into its most similar kept expert (gate-mass-weighted average).

    ``align``: permute the dropped expert's intermediate neurons to the survivor's (Hungarian matching
    on activation correlation) before averaging."""

    align: bool = True


def get_recovery(name: str, **kwargs) -> RecoveryConfig:
    """A registered recovery config by name; unknown names/options/types name the choices."""
    cls = registered(RECOVERIES, "recovery", name, kwargs, hint=" (or null for none)")
    try:
        check_option_types(cls, kwargs)
    except ValueError as e:  # its message says "method": this is a recovery step
        raise ValueError(str(e).replace("method ", "recovery ", 1)) from None
    return cls(**kwargs)
