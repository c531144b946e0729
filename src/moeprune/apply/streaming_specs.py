"""What the out-of-core rewrite writes: one ``Spec`` per output tensor, planned from headers alone.

Every on-disk key is mapped to its module parameter with the model family's checkpoint conversion
mapping (``rename_source_key``; e.g. Mixtral ``block_sparse_moe.experts.3.w1.weight`` ->
``mlp.experts.gate_up_proj``, expert 3), and the MoE structure (expert-indexed tensors, intermediate
channel layout) is read from the model built on the META device. A spec says how its output tensor is
made from one source tensor (copied, expert rows selected, one per-expert key renumbered, channels
sliced) and its output shape, which ``check_against_meta`` compares with what ``save_pretrained`` of
the pruned meta model would write.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from moeprune.apply.neurons import neuron_index
from moeprune.apply.shards import read_headers
from moeprune.arch import structure as S
from moeprune.plan import LayerPlan, PruningPlan

log = logging.getLogger("moeprune")

_EXPERT_ID = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass
class Layer:
    """Structure of one planned MoE layer, read from the unpruned meta model."""

    name: str  # block module name, e.g. model.layers.3.mlp
    n_old: int
    n_zero: int
    keep: list[int]
    tensors: dict[str, int]  # expert-indexed tensor (relative name) -> dim (-1: DBRX view)
    inter: dict[str, tuple[str, int]]  # tensor -> (layout kind, channel dim in the module tensor)
    i_old: int | None = None
    idx: torch.Tensor | None = None  # [n_new, I_new] kept channels (padded), None: no neuron plan
    dead: torch.Tensor | None = None  # [n_new, I_new] padding channels to zero

    def rows(self, size: int) -> list[int]:
        return S._expert_rows(torch.tensor(self.keep), size, self.n_old, self.n_zero).tolist()


@dataclass
class Spec:
    """How one output tensor is made from one source tensor."""

    src: str  # source key
    file: str  # source shard path
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: Layer | None = None
    mode: str = "copy"  # copy | fused | dbrx | select | expert
    dim: int = 0  # select: the expert dim
    expert_pos: int = 0  # expert: new position of this expert
    chan: tuple[str, int] | None = None  # (kind, dim within one expert's slab) when channels are sliced

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _kept_channels(lp: LayerPlan, inter: int) -> list[list[int]]:
    """Kept channels of each kept expert, by new position (experts without a neuron plan keep all)."""
    pos = {e: i for i, e in enumerate(lp.keep)}
    per = {pos[e]: sorted(ch) for e, ch in lp.neurons.items()}
    return [per.get(e, list(range(inter))) for e in range(len(lp.keep))]


def plan_layers(model: torch.nn.Module, plan: PruningPlan) -> dict[int, Layer]:
    """``Layer`` of every planned MoE layer of the (unpruned, meta) ``model``."""
    out = {}
    for li, name, block in S.iter_moe_blocks(model):
        if li not in plan.layers:
            continue
        lp = plan.layers[li]
        tensors, n_old, n_zero = S.expert_indexed_tensors(block)
        names = {id(m): n for n, m in block.named_modules()}
        L = Layer(
            name=name,
            n_old=n_old,
            n_zero=n_zero,
            keep=list(lp.keep),
            tensors={q: d for q, _m, _a, d in tensors},
            inter={},
        )
        if lp.neurons:
            L.inter = {
                (f"{names[id(o)]}.{a}" if names[id(o)] else a): (k, d) for o, a, k, d in S.inter_layout(block)
            }
            L.i_old = S.intermediate_size_of(block)
            L.idx, L.dead = neuron_index(_kept_channels(lp, L.i_old), L.i_old)  # apply_plan's rule
        out[li] = L
    return out


def _expert_index(key: str) -> int:
    hits = list(_EXPERT_ID.finditer(key))
    if not hits:
        raise NotImplementedError(f"cannot find the expert index in the per-expert key {key!r}")
    return int(hits[-1].group(1))


def _renumber(key: str, pos: int) -> str:
    m = list(_EXPERT_ID.finditer(key))[-1]
    return key[: m.start(1)] + str(pos) + key[m.end(1) :]


def _chan_out(kind: str, size: int, i_old: int, i_new: int, key: str) -> tuple[str, int]:
    """Layout kind of a channel dim of ``size`` and its new size (per-expert keys split gate/up)."""
    if size == i_old:
        return "plain", i_new
    if size == 2 * i_old and kind in ("gu_cat", "gu_int"):
        return kind, 2 * i_new
    raise NotImplementedError(f"{key}: channel dim of size {size} matches neither I={i_old} nor 2I")


def source_specs(files: dict[str, str]) -> dict[str, Spec]:
    """Copy specs (shape, dtype) of every source tensor, read from the shard headers only."""
    return {key: Spec(key, files[key], shape, dtype) for key, (shape, dtype) in read_headers(files).items()}


def plan_specs(sources: dict[str, Spec], model: torch.nn.Module, layers: dict[int, Layer]) -> dict[str, Spec]:
    """Output key -> spec, for every source tensor (removed experts' keys are dropped)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    meta_sd = model.state_dict()
    by_name = sorted(layers.values(), key=lambda L: -len(L.name))
    hit: set[tuple[str, str]] = set()
    specs: dict[str, Spec] = {}
    for key, src in sources.items():
        path, shape, dtype = src.file, src.shape, src.dtype
        mkey, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        L = next((L for L in by_name if mkey.startswith(L.name + ".")), None)
        rel = mkey[len(L.name) + 1 :] if L else None
        if L is None or rel not in L.tensors:
            specs[key] = Spec(key, path, shape, dtype)
            continue
        hit.add((L.name, rel))
        dim = L.tensors[rel]
        kind, cdim = L.inter.get(rel, (None, None))
        n_new = len(L.keep)
        i_new = L.idx.shape[1] if L.idx is not None else None
        if pattern is not None and "*" in pattern:  # one expert of a fused module tensor
            if dim != 0:
                raise NotImplementedError(f"{key}: per-expert key of a tensor indexed on dim {dim}")
            j = _expert_index(key)
            rows = L.rows(L.n_old + L.n_zero if j >= L.n_old else L.n_old)
            if j not in rows:
                continue  # a removed expert
            pos = rows.index(j)
            spec = Spec(key, path, shape, dtype, L, "expert", expert_pos=pos)
            if kind is not None:
                ck, size = _chan_out(kind, shape[cdim - 1], L.i_old, i_new, key)
                spec.chan = (ck, cdim - 1)
                spec.shape = shape[: cdim - 1] + (size,) + shape[cdim:]
            specs[_renumber(key, pos)] = spec
            continue
        if dim == -1:  # DBRX [E*I, H] viewed as [E, I, H]
            inter = shape[0] // L.n_old
            i_out = i_new if kind is not None else inter
            spec = Spec(key, path, (n_new * i_out,) + shape[1:], dtype, L, "dbrx")
            if kind is not None:
                spec.chan = ("plain", 0)
        elif dim == 0:
            out = (len(L.rows(shape[0])),) + shape[1:]
            spec = Spec(key, path, out, dtype, L, "fused")
            if kind is not None:
                ck, size = _chan_out(kind, shape[cdim], L.i_old, i_new, key)
                spec.chan = (ck, cdim - 1)
                spec.shape = out[:cdim] + (size,) + out[cdim + 1 :]
        else:  # router-side tensor indexed on another dim (Ernie moe_statics [1, E])
            n_rows = len(L.rows(shape[dim]))
            spec = Spec(key, path, shape[:dim] + (n_rows,) + shape[dim + 1 :], dtype, L, "select", dim=dim)
        specs[key] = spec
    missing = [(L.name, t) for L in layers.values() for t in L.tensors if (L.name, t) not in hit]
    if missing:
        raise ValueError(
            f"expert tensors {missing[:4]} were not found in the checkpoint; its keys do not follow "
            "the transformers layout of this model_type"
        )
    return specs


def check_against_meta(model: torch.nn.Module, specs: dict[str, Spec]) -> None:
    """Output keys/shapes must equal what ``save_pretrained`` of the pruned model would write: the
    pruned meta model's state dict reverted to the legacy on-disk format or, for checkpoints stored
    with module names (``save_original_format=False``), as is."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        sd = remove_tied_weights_from_state_dict(model.state_dict(), model)
        layouts = [
            {k: tuple(v.shape) for k, v in d.items()} for d in (revert_weight_conversion(model, dict(sd)), sd)
        ]
    except Exception as e:  # noqa: BLE001 - a transformers internals change must not block the rewrite
        log.warning("could not derive the expected on-disk layout (%s); skipping the shape check", e)
        return
    expected = max(layouts, key=lambda d: len(d.keys() & specs.keys()))
    bad = [
        (k, s.shape, expected.get(k))
        for k, s in specs.items()
        if (k in expected and expected[k] != s.shape) or (k not in expected and s.layer is not None)
    ]
    bad += [(k, None, v) for k, v in expected.items() if k not in specs and _EXPERT_ID.search(k)]
    if bad:
        raise RuntimeError(
            f"rewritten tensors disagree with the pruned model's layout (key, written, expected): {bad[:5]}"
        )


def dominant_dtype(specs: dict[str, Spec]) -> torch.dtype:
    """The floating dtype holding the most bytes (the checkpoint's ``dtype``)."""
    by: dict[torch.dtype, int] = {}
    for s in specs.values():
        if s.dtype.is_floating_point:
            by[s.dtype] = by.get(s.dtype, 0) + s.nbytes
    return max(by, key=by.get) if by else torch.float32
