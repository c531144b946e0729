"""Decoder layers materialised on demand from the source safetensors: models larger than memory.

``load_lazy(path)`` builds the model on the META device, loads the small non-layer weights (embeddings,
final norm, lm_head, rotary buffers) once, and records which checkpoint keys belong to each decoder layer.
``LazyLayers.load(i)`` then reads layer i's keys from the memory-mapped shards and runs them through
transformers' own loading (``convert_and_load_state_dict_in_model`` with the model's weight conversion
mapping: per-expert keys stacked into fused 3-D tensors, renamings, dtype casting), so a layer's
parameters are exactly ``from_pretrained``'s; ``release(i)`` puts them back on META (memory freed).
Nothing is copied to disk. Forward pre/post hooks make a lazy model runnable as a whole (each layer is
loaded for its forward and released after), so evaluation of the original model still works, slowly.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

from moeprune.apply.shards import source_files
from moeprune.arch.structure import decoder_layers, iter_moe_blocks

log = logging.getLogger("moeprune")


@contextlib.contextmanager
def _no_progress_bar():
    """transformers' "Loading weights" bar, once per layer, would flood the run's output."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class LazyLayers:
    """The decoder layers of a META model, each loadable from the checkpoint and releasable."""

    def __init__(self, model: nn.Module, files: dict[str, str], layer_keys: dict[int, list[str]],
                 load_config, layer_prefix: str, layers: nn.ModuleList):
        self.model, self.files, self.layer_keys, self.load_config = model, files, layer_keys, load_config
        self.layer_prefix, self.layers = layer_prefix, layers
        self.pinned: set[int] = set()
        self.auto = True  # load a layer for its forward when it is not loaded (off during stub passes)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: self._auto(i))
            layer.register_forward_hook(lambda m, a, o, i=i: self._auto_release(i))
        self._auto_loaded: set[int] = set()

    def is_loaded(self, i: int) -> bool:
        return not any(p.device.type == "meta" for p in self.layers[i].parameters())

    def resident(self) -> list[int]:
        """Indices of the decoder layers holding any materialised parameter."""
        return [i for i, lay in enumerate(self.layers) if any(p.device.type != "meta" for p in lay.parameters())]

    def load(self, i: int) -> None:
        """Read layer ``i``'s keys from the mmapped shards and convert them as ``from_pretrained`` does."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        keys = self.layer_keys.get(i, [])
        handles = {f: safe_open(f, "pt", device="cpu") for f in sorted({self.files[k] for k in keys})}
        sd = {k: handles[self.files[k]].get_slice(k) for k in keys}
        try:
            kept = list(getattr(self.model, "_weight_conversions", None) or [])
            with _no_progress_bar():
                info, _ = convert_and_load_state_dict_in_model(self.model, sd, self.load_config)
            # transformers keeps the conversions used (for saving): the union over all loads, not the last
            self.model._weight_conversions = kept + [c for c in self.model._weight_conversions if c not in kept]
        finally:
            sd.clear()
            handles.clear()
        self._own(i)
        prefix = f"{self.layer_prefix}.{i}."
        missing = sorted(k for k in info.missing_keys if k.startswith(prefix)
                         and self.model.get_parameter_or_buffer(k).device.type == "meta")
        if missing or info.mismatched_keys:
            raise ValueError(f"decoder layer {i} could not be loaded from the checkpoint: missing {missing[:4]}, "
                             f"shape mismatches {sorted(info.mismatched_keys)[:4]}; the checkpoint's keys do not "
                             "follow the transformers layout of this model_type")

    def _own(self, i: int) -> None:
        """Copy layer ``i``'s tensors that are views of the memory-mapped shard (renamed-only keys: attention,
        norms, router) into their own allocations, so no mapping outlives ``load``: pages read through a
        mapping count in the RSS while it is mapped (the fused experts are fresh stacks already)."""
        with torch.no_grad():
            for mod in self.layers[i].modules():
                for store in (mod._parameters, mod._buffers):
                    for name, t in store.items():
                        if t is None or t.device.type != "cpu" or t.untyped_storage().resizable():
                            continue
                        fresh = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
                        store[name] = nn.Parameter(fresh, requires_grad=t.requires_grad) if isinstance(
                            t, nn.Parameter) else fresh

    def release(self, i: int) -> None:
        """Put layer ``i``'s parameters and persistent buffers back on META (non-persistent buffers stay)."""
        for mod in self.layers[i].modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                         requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None and name not in mod._non_persistent_buffers_set and b.device.type != "meta":
                    mod._buffers[name] = torch.empty_like(b, device="meta")

    @contextlib.contextmanager
    def held(self, i: int):
        """Layer ``i`` materialised for the whole block (all batches), released after (also on errors)."""
        self.pinned.add(i)
        try:
            self.load(i)
            yield self.layers[i]
        finally:
            self.pinned.discard(i)
            self.release(i)

    @contextlib.contextmanager
    def manual(self):
        """No loading on forward: the caller loads and releases layers itself (``held``)."""
        old, self.auto = self.auto, False
        try:
            yield self
        finally:
            self.auto = old

    def _auto(self, i: int) -> None:
        if self.auto and not self.is_loaded(i):
            self.load(i)
            self._auto_loaded.add(i)

    def _auto_release(self, i: int) -> None:
        if i in self._auto_loaded and i not in self.pinned:
            self._auto_loaded.discard(i)
            self.release(i)


def lazy_layers(model: nn.Module) -> LazyLayers | None:
    """The ``LazyLayers`` of a model built by ``load_lazy`` (None for an ordinary model)."""
    return getattr(model, "_moeprune_lazy", None)


def _model_class(path: str, config, trust_remote_code: bool):
    from moeprune.models import is_pruned_folder

    if is_pruned_folder(path):  # our pruned folders: the base class re-applying config.moe_pruning shapes
        from moeprune.apply.checkpoint import pruned_class

        arch = (getattr(config, "base_architectures", None) or getattr(config, "architectures", None) or [None])[0]
        base = getattr(transformers, arch, None) if arch else None
        if base is None:
            raise ValueError(f"{path}: config.architectures={arch!r} is not a transformers class; cannot rebuild it")
        return pruned_class(base)
    from transformers.models.auto.auto_factory import _get_model_class

    auto = transformers.AutoModelForCausalLM
    if type(config) in auto._model_mapping:
        return _get_model_class(config, auto._model_mapping)
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], path)
    raise ValueError(f"{path}: model_type {config.model_type!r} has no causal-LM class in transformers "
                     "(pass trust_remote_code=True for a remote-code checkpoint)")


def build_meta(path: str, dtype: torch.dtype, experts_implementation: str | None = None,
               trust_remote_code: bool = False) -> nn.Module:
    """The model of ``path``'s config on the META device, in ``dtype`` (no weights)."""
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = _model_class(path, config, trust_remote_code)
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype, **kw)
    model.name_or_path = model.config._name_or_path = str(path)
    return model


def _split_keys(model: nn.Module, files: dict[str, str], weight_mapping, layer_prefix: str
                ) -> tuple[dict[int, list[str]], list[str]]:
    """Checkpoint keys by decoder layer (of the key they load into, after transformers' renaming) + the rest."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [c for c in weight_mapping if isinstance(c, WeightRenaming)]
    converters = [c for c in weight_mapping if isinstance(c, WeightConverter)]
    meta_sd = model.state_dict()
    pat = re.compile(rf"^{re.escape(layer_prefix)}\.(\d+)\.")
    by_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for key in files:
        renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:  # convert_and_load_state_dict_in_model's own rule
            renamed = key
        m = pat.match(renamed)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(key)
        else:
            rest.append(key)
    return by_layer, rest


def _load_rest(model: nn.Module, files: dict[str, str], keys: list[str], load_config, layer_prefix: str) -> None:
    """Load the non-layer weights and finish as ``from_pretrained`` does (non-persistent buffers such as
    rotary ``inv_freq`` initialised, missing weights initialised, tied weights tied), decoder layers excluded:
    their parameters stay on META."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model

    handles = {f: safe_open(f, "pt", device="cpu") for f in sorted({files[k] for k in keys})}
    with _no_progress_bar():
        info, _ = convert_and_load_state_dict_in_model(model, {k: handles[files[k]].get_slice(k) for k in keys},
                                                       load_config)
    handles.clear()
    info.missing_keys = {k for k in info.missing_keys if not k.startswith(layer_prefix + ".")}
    model.mark_tied_weights_as_initialized(info)
    model._move_missing_keys_from_meta_to_device(info.missing_and_mismatched(), load_config.device_map, None, None)
    model._initialize_missing_keys(False)
    model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    untied = sorted(k for k in info.missing_keys if k not in model.all_tied_weights_keys)
    if untied:
        log.warning("%s: weights %s are not in the checkpoint (randomly initialised, as from_pretrained does)",
                    model.name_or_path, untied[:4])


def load_lazy(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
              experts_implementation: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model of a safetensors checkpoint folder with its decoder layers on META, loadable one at a time
    (``lazy_layers(model)``); everything else loaded on ``device``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.modeling_utils import LoadStateDictConfig

    path = os.fspath(path)
    files = source_files(Path(path))
    model = build_meta(path, dtype, experts_implementation, trust_remote_code)
    prefix, layers = decoder_layers(model, [name for _, name, _ in iter_moe_blocks(model)])
    mapping = get_model_conversion_mapping(model)
    cfg = LoadStateDictConfig(pretrained_model_name_or_path=path, device_map={"": device}, dtype=dtype,
                              dtype_plan=model._get_dtype_plan(dtype), weight_mapping=mapping)
    by_layer, rest = _split_keys(model, files, mapping, prefix)
    _load_rest(model, files, rest, cfg, prefix)
    model._moeprune_lazy = LazyLayers(model, files, by_layer, cfg, prefix, layers)
    return model.eval()
