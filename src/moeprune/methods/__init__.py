"""Built-in pruning methods; importing this package registers them (see ``registry.METHODS``)."""
from moeprune.methods import baselines, cprune, naee, pathfinder, tenp, unified  # noqa: F401
from moeprune.methods.registry import METHODS, MethodConfig, get_method, register_method
from moeprune.methods.target import Target

__all__ = ["METHODS", "MethodConfig", "Target", "get_method", "register_method"]
