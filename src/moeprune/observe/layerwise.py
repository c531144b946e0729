"""Layer-by-layer calibration: models larger than memory, resumable after an interruption.

Route (and why): a checkpoint folder is opened with ``moeprune.models.load_layerwise_model``
(``observe.lazy``): the model on the META device, decoder layer i read from the source safetensors
(memory-mapped) and converted by transformers' own loading code only while it runs, so nothing is copied
to disk. Models dispatched by accelerate with offloaded layers work too (their hooks onload a layer once).
``observe_layerwise`` then
1. records, per batch, the decoder-layer inputs with a cheap stub pass (every layer's ``forward`` is
   replaced by a recorder; the model stops after the last layer), so per-layer kwargs (attention masks of
   sliding/full layers, rotary embeddings) are exactly what the model would pass;
2. runs each decoder layer once over ALL batches: its weights are materialised once (``materialised``)
   and released after, activations live on CPU or in ``checkpoint_dir``.
Peak memory is one decoder layer plus the cached activations (one batch when they live on disk). The MoE
capture and accumulators are the full pass's (``Observer``), so the statistics equal the full pass.
With ``checkpoint_dir`` each finished layer commits its outputs and the accumulator state atomically;
a rerun resumes after the last committed layer (nothing in the folder is unpickled beyond tensors and plain
containers, so a planted folder cannot run code).
``sequential=True`` plans each MoE layer once it has been observed and re-runs it pruned (masked) to produce
the next layer's inputs (``observe/sequential.py``); its decisions are committed with the accumulators.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.arch.structure import decoder_layers
from moeprune.atomic import check_free_space
from moeprune.models import input_device
from moeprune.observe.capture import MoECapture
from moeprune.observe.layerwise_state import Checkpoint, fingerprint
from moeprune.observe.lazy import lazy_layers
from moeprune.observe.recon_cache import DEFAULT_MAX_GB
from moeprune.observe.runner import (
    Observer,
    as_batch,
    eval_mode,
    forward_kwargs,
    recon_observer,
)
from moeprune.observe.sequential import SequentialPlanner, decoder_index, recording_paused
from moeprune.observe.stats import ExpertStats

if TYPE_CHECKING:
    from moeprune.methods.registry import MethodConfig
    from moeprune.methods.target import Target


class _Stop(Exception):
    """Raised by the last stub layer: nothing after the decoder stack is needed."""


def _to(obj: Any, device, memo: dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _set_forward(layer: nn.Module, fn) -> Any:
    old = layer.__dict__.get("forward")
    layer.forward = fn
    return old


def _restore_forward(layer: nn.Module, old: Any) -> None:
    if old is None:
        layer.__dict__.pop("forward", None)
    else:
        layer.forward = old


def record_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[dict], device) -> tuple[list, list]:
    """Stub pass: ``(hidden inputs of layer 0 per batch, [per batch: [per layer: (args, kwargs)]])`` on CPU."""
    n = len(layers)
    hidden: list[torch.Tensor | None] = [None] * len(batches)
    calls: list[list[Any]] = [[None] * n for _ in batches]
    cur = [0]

    def stub(i: int):
        def fwd(*args, **kwargs):
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            memo: dict[int, Any] = {}
            calls[cur[0]][i] = (_to(rest, "cpu", memo), _to(kwargs, "cpu", memo))
            if i == 0:
                hidden[cur[0]] = h.detach().to("cpu")
            if i == n - 1:
                raise _Stop
            return h
        return fwd

    old = [_set_forward(layer, stub(i)) for i, layer in enumerate(layers)]
    extra = forward_kwargs(model)
    try:
        for b, batch in enumerate(batches):
            cur[0] = b
            try:
                model(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}, **extra)
            except _Stop:
                pass
            missing = [i for i, c in enumerate(calls[b]) if c is None]
            if missing:
                raise RuntimeError(f"decoder layers {missing} were not called by {type(model).__name__}.forward")
    finally:
        for layer, o in zip(layers, old):
            _restore_forward(layer, o)
    return hidden, calls


@contextlib.contextmanager
def onloaded(layer: nn.Module):
    """Load an accelerate-offloaded layer's weights once and keep them for every batch, then offload."""
    held = []
    try:
        for m in layer.modules():
            h = getattr(m, "_hf_hook", None)
            for hk in (getattr(h, "hooks", None) or ([h] if h is not None else [])):
                if getattr(hk, "offload", False):
                    hk.pre_forward(m)
                    hk.offload = False
                    held.append((m, hk))
        yield layer
    finally:
        for m, hk in held:
            hk.offload = True
            hk.post_forward(m, None)


@contextlib.contextmanager
def materialised(model: nn.Module, i: int, layer: nn.Module):
    """Decoder layer ``i``'s weights in memory for every batch, released after: read from the checkpoint
    (a ``load_layerwise_model`` model), onloaded (accelerate offload), or already there."""
    lazy = lazy_layers(model)
    with (lazy.held(i) if lazy is not None else onloaded(layer)):
        yield layer


def execution_device(layer: nn.Module, default) -> torch.device:
    for m in layer.modules():
        h = getattr(m, "_hf_hook", None)
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    p = next((p for p in layer.parameters() if p.device.type != "meta"), None)
    return p.device if p is not None else default


def run_layer(layer: nn.Module, i: int, batches: list[dict], hidden: list, calls: list, ckpt: Checkpoint | None,
               cap: MoECapture, dev, keep_inputs: bool) -> list:
    """Layer ``i`` over every batch; outputs go to ``acts_{i+1}`` (checkpoint) or the returned list (CPU).
    ``keep_inputs``: leave ``hidden`` intact (a sequential pass re-runs the layer masked)."""
    out_list = list(hidden) if keep_inputs else hidden
    for b, batch in enumerate(batches):
        h = hidden[b] if hidden[b] is not None else ckpt.read_act(i, b)
        args, kwargs = _to(calls[b][i], dev, {})
        ref = batch.get("input_ids", batch.get("inputs_embeds"))
        cap.set_batch(batch.get("attention_mask"), shape=tuple(ref.shape[:2]), index=b)
        out = layer(h.to(dev), *args, **kwargs)
        out = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        if ckpt:
            ckpt.write_act(i + 1, b, out)
            out_list[b] = None
        else:
            out_list[b] = out.to("cpu")
    return out_list


def observe_layerwise(model: nn.Module, batches: Iterable[Any], *, features: Iterable[str] | str = ("routed",),
                      checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
                      seed: int = 0, recon_tokens: int | None = None,
                      recon_max_gb: float | None = DEFAULT_MAX_GB, implementation: str = "auto",
                      data: Mapping[str, Any] | None = None, naee: Mapping[int, Any] | None = None,
                      cluster_dtype: str = "float64", sequential: bool = False,
                      method: MethodConfig | None = None, target: Target | None = None) -> ExpertStats:
    """Same statistics as ``observe`` computed one decoder layer at a time (see the module docstring).

    ``checkpoint_dir``: activations on disk + per-layer commits (resumable); without it activations are
    kept on CPU. ``resume=False`` restarts from scratch in an existing ``checkpoint_dir``. ``recon_tokens`` /
    ``recon_max_gb``: the NAEE cache, as in ``observe``. ``sequential=True`` (with ``method`` and ``target``):
    each MoE layer is planned as soon as it is observed and re-run pruned before the next layer is observed
    (``observe/sequential.py``); the plan is in ``stats.meta["sequential_plan"]`` (``sequential_plan``)."""
    batches = [as_batch(b) for b in batches]
    obs, _ = recon_observer(model, batches, features, seed=seed, recon_tokens=recon_tokens,
                            recon_max_gb=recon_max_gb, naee=naee, cluster_dtype=cluster_dtype)
    lname, layers = decoder_layers(model, [b.name for b in obs.banks.values()])
    device = input_device(model)
    seq = _planner(sequential, method, target, obs, model)
    ckpt = Checkpoint(checkpoint_dir, fingerprint(model, batches, obs, len(layers),
                                                   seq.fingerprint() if seq else None)) if checkpoint_dir else None
    start = ckpt.next_layer() if (ckpt and resume) else None
    moe_at = decoder_index(lname, obs.banks) if seq else {}
    if seq and seq.cross_layer:  # cross-layer methods see the later layers through a one-shot look-ahead pass
        ahead = os.path.join(checkpoint_dir, "lookahead") if checkpoint_dir else None  # resumable as well
        seq.lookahead = observe_layerwise(model, batches, features=features, progress=progress, seed=seed,
                                          recon_tokens=recon_tokens, recon_max_gb=recon_max_gb,
                                          implementation=implementation, data=data, checkpoint_dir=ahead,
                                          resume=resume, naee=naee, cluster_dtype=cluster_dtype)
    lazy = lazy_layers(model)
    with eval_mode(model), torch.no_grad(), (lazy.manual() if lazy else contextlib.nullcontext()), MoECapture(
            model, obs, banks=obs.banks, intermediates=obs.needs_intermediates, residual=obs.needs_residual,
            implementation=implementation) as cap:
        if start is None:
            hidden, calls = record_inputs(model, layers, batches, device)
            start = 0
            if ckpt:
                ckpt.reset()
                # a layer's inputs and outputs are on disk at once (the weights are never copied)
                check_free_space(ckpt.folder, 2 * sum(h.numel() * h.element_size() for h in hidden),
                                 f"the layer-wise activations in {ckpt.folder}")
                for b, h in enumerate(hidden):
                    ckpt.write_act(0, b, h)
                ckpt.commit(0, obs.state_dict())
        else:
            # the per-layer call kwargs are re-recorded (a cheap stub pass), never unpickled: they can hold
            # transformers objects (caches) that a safe load refuses
            _, calls = record_inputs(model, layers, batches, device)
            state = ckpt.load_observer(start)
            obs.load_state_dict(state)
            if seq:
                seq.load_state_dict(state.get("sequential", {}))
            hidden = [None] * len(batches)
        for i in tqdm(range(start, len(layers)), desc="observe (layer-wise)", disable=not progress):
            layer = layers[i]
            dev = execution_device(layer, device)
            with materialised(model, i, layer):
                out = run_layer(layer, i, batches, hidden, calls, ckpt, cap, dev, keep_inputs=i in moe_at)
                if i in moe_at:  # sequential: plan this MoE layer, re-run it pruned for the next layer's inputs
                    seq.decide(moe_at[i], obs, model, data)
                    with seq.masked(model, moe_at[i]), recording_paused(cap):
                        out = run_layer(layer, i, batches, hidden, calls, ckpt, cap, dev, keep_inputs=True)
            hidden = out
            if ckpt:
                ckpt.commit(i + 1, {**obs.state_dict(), **({"sequential": seq.state_dict()} if seq else {})})
    stats = obs.result(model, data)
    if seq:
        stats.meta["sequential_plan"] = seq.plan(stats.meta.get("model_type")).to_dict()
    return stats


def _planner(sequential: bool, method: MethodConfig | None, target: Target | None, obs: Observer,
             model: nn.Module) -> SequentialPlanner | None:
    if not sequential:
        if method is not None or target is not None:
            raise ValueError("method/target are only used by sequential calibration; pass sequential=True")
        return None
    if method is None or target is None:
        raise ValueError("sequential=True plans each layer during the pass: pass method= (e.g. "
                         "get_method('reap')) and target= (e.g. Target(expert_sparsity=0.5))")
    return SequentialPlanner(method, target, obs, model)
