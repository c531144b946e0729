"""Out-of-core apply: rewrite a checkpoint's safetensors shards by a plan, without loading the model.

Peak memory is at most one tensor, usually far less: tensors are read with ``safe_open`` as
zero-copy views of the mmapped shards (fused expert tensors as runs of kept expert slabs through
``get_slice``; only channel slicing materialises a slab) and streamed into the output shard, whose
safetensors header is computed beforehand from the shapes alone.

Which on-disk tensor is what comes from transformers itself: every key is mapped to its module
parameter with the model family's checkpoint conversion mapping (``rename_source_key``; e.g. Mixtral
``block_sparse_moe.experts.3.w1.weight`` -> ``mlp.experts.gate_up_proj``, expert 3), and the MoE
structure (expert-indexed tensors, intermediate-channel layout) is read from a model built on the
META device. So both layouts work: per-expert legacy keys (kept experts renumbered contiguously in
original-id order) and fused keys (slice dim 0; DBRX ``[E*I, H]`` views; GPT-OSS transposed +
biases), plus router rows/biases and selection biases. The config is produced by applying the plan
to that meta model (``apply_plan`` + ``finalize_config``), exactly as ``save_pruned`` does, and the
output keys and shapes are checked against the pruned meta model's state dict reverted to the
on-disk format (what ``save_pretrained`` would write).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from safetensors import safe_open
from tqdm.auto import tqdm

from moeprune.apply.checkpoint import PLAN_FILE, REMOTE_CODE_FILE, pruned_class, write_config
from moeprune.apply.config import is_per_layer
from moeprune.arch import structure as S
from moeprune.plan import PruningPlan

log = logging.getLogger("moeprune")

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_WEIGHT_FILES = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.safetensors\.index\.json$|"
    r".*\.bin\.index\.json$"
)
_SKIP_FILES = {"config.json", PLAN_FILE, REMOTE_CODE_FILE}


@dataclass
class _Layer:
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
class _Spec:
    """How one output tensor is made from one source tensor."""

    src: str  # source key
    file: str  # source shard path
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: _Layer | None = None
    mode: str = "copy"  # copy | fused | dbrx | select | expert
    dim: int = 0  # select: the expert dim
    expert_pos: int = 0  # expert: new position of this expert
    chan: tuple[str, int] | None = None  # (kind, dim within one expert's slab) when channels are sliced

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _neuron_index(lp, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, dead)`` ``[n_new, I_new]`` of a layer plan, the rule of ``apply.neurons.prune_neurons_``:
    widest kept count; narrower experts padded with their lowest removed channels, then zeroed."""
    pos = {e: i for i, e in enumerate(lp.keep)}
    per = {pos[e]: sorted(ch) for e, ch in lp.neurons.items()}
    rows = [per.get(e, list(range(inter))) for e in range(len(lp.keep))]
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    dead = torch.zeros(len(rows), width, dtype=torch.bool)
    for e, r in enumerate(rows):
        kept = set(r)
        pad = [j for j in range(inter) if j not in kept][: width - len(r)]
        idx[e] = torch.as_tensor(r + pad, dtype=torch.long)
        dead[e, len(r) :] = True
    return idx, dead


def _source_files(src: Path) -> dict[str, str]:
    """``{tensor key: shard path}`` of a safetensors checkpoint folder."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: str(src / f) for k, f in weight_map.items()}
    single = src / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {k: str(single) for k in f.keys()}
    if any(src.glob("*.bin")):
        raise ValueError(
            f"{src} holds PyTorch .bin weights; rewrite_checkpoint reads safetensors only "
            "(re-save the model with save_pretrained(safe_serialization=True) first)"
        )
    raise FileNotFoundError(f"{src} has no model.safetensors or model.safetensors.index.json")


def _meta_model(src: Path, dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(src)
    arch = (getattr(cfg, "base_architectures", None) or getattr(cfg, "architectures", None) or [None])[0]
    base = getattr(transformers, arch, None) if arch else None
    if base is None:
        base = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    if is_per_layer(cfg):  # a source that is itself pruned per layer
        base = pruned_class(base)
    with torch.device("meta"):
        model = base._from_config(cfg, dtype=dtype)
    return model.eval()


def _layers(model: torch.nn.Module, plan: PruningPlan) -> dict[int, _Layer]:
    out = {}
    for li, name, block in S.iter_moe_blocks(model):
        if li not in plan.layers:
            continue
        lp = plan.layers[li]
        tensors, n_old, n_zero = S.expert_indexed_tensors(block)
        names = {id(m): n for n, m in block.named_modules()}
        L = _Layer(
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
            L.idx, L.dead = _neuron_index(lp, L.i_old)
        out[li] = L
    return out


_EXPERT_ID = re.compile(r"(?:^|\.)experts\.(\d+)\.")


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


def _source_specs(files: dict[str, str]) -> dict[str, _Spec]:
    """Copy specs (shape, dtype) of every source tensor, read from the shard headers only."""
    handle, out = _handles(), {}
    for key in sorted(files):
        sl = handle(files[key]).get_slice(key)
        out[key] = _Spec(key, files[key], tuple(sl.get_shape()), _dtype(sl.get_dtype(), key))
    return out


def _plan_specs(
    sources: dict[str, _Spec], model: torch.nn.Module, layers: dict[int, _Layer]
) -> dict[str, _Spec]:
    """Output key -> spec, for every source tensor (removed experts' keys are dropped)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    meta_sd = model.state_dict()
    by_name = sorted(layers.values(), key=lambda L: -len(L.name))
    hit: set[tuple[str, str]] = set()
    specs: dict[str, _Spec] = {}
    for key, src in sources.items():
        path, shape, dtype = src.file, src.shape, src.dtype
        mkey, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        L = next((L for L in by_name if mkey.startswith(L.name + ".")), None)
        rel = mkey[len(L.name) + 1 :] if L else None
        if L is None or rel not in L.tensors:
            specs[key] = _Spec(key, path, shape, dtype)
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
            new_key = _renumber(key, pos)
            spec = _Spec(key, path, shape, dtype, L, "expert", expert_pos=pos)
            if kind is not None:
                ck, size = _chan_out(kind, shape[cdim - 1], L.i_old, i_new, key)
                spec.chan = (ck, cdim - 1)
                spec.shape = shape[: cdim - 1] + (size,) + shape[cdim:]
            specs[new_key] = spec
            continue
        if dim == -1:  # DBRX [E*I, H] viewed as [E, I, H]
            inter = shape[0] // L.n_old
            i_out = i_new if kind is not None else inter
            spec = _Spec(key, path, (n_new * i_out,) + shape[1:], dtype, L, "dbrx")
            if kind is not None:
                spec.chan = ("plain", 0)
        elif dim == 0:
            rows = L.rows(shape[0])
            out = (len(rows),) + shape[1:]
            spec = _Spec(key, path, out, dtype, L, "fused")
            if kind is not None:
                ck, size = _chan_out(kind, shape[cdim], L.i_old, i_new, key)
                spec.chan = (ck, cdim - 1)
                spec.shape = out[:cdim] + (size,) + out[cdim + 1 :]
        else:  # router-side tensor indexed on another dim (Ernie moe_statics [1, E])
            rows = L.rows(shape[dim])
            spec = _Spec(
                key, path, shape[:dim] + (len(rows),) + shape[dim + 1 :], dtype, L, "select", dim=dim
            )
        specs[key] = spec
    missing = [(L.name, t) for L in layers.values() for t in L.tensors if (L.name, t) not in hit]
    if missing:
        raise ValueError(
            f"expert tensors {missing[:4]} were not found in the checkpoint; its keys do not follow "
            "the transformers layout of this model_type"
        )
    return specs


def _dtype(name: str, key: str) -> torch.dtype:
    for dt, st in _ST_DTYPES.items():
        if st == name:
            return dt
    raise ValueError(f"{key}: unsupported safetensors dtype {name}")


# ---------------------------------------------------------------- materialise and write
def _channels(t: torch.Tensor, chan: tuple[str, int], L: _Layer, pos: int) -> torch.Tensor:
    """Keep the planned channels of one expert's slab ``t`` and zero its padding channels (the
    in-memory rule: rows past the real experts, LongCat's zero experts, reuse the last kept row)."""
    kind, d = chan
    n_new, i_new = L.idx.shape
    t = t.index_select(d, S.chan_index(kind, L.idx[min(pos, n_new - 1)], L.i_old))
    if pos < n_new and bool(L.dead[pos].any()):
        t.index_fill_(d, S.chan_index(kind, torch.nonzero(L.dead[pos]).reshape(-1), i_new), 0)
    return t


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Consecutive ``rows`` as ``[start, stop)`` ranges (one zero-copy read each)."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _chunks(spec: _Spec, f) -> Iterator[torch.Tensor]:
    """The output tensor of ``spec`` as consecutive pieces whose bytes concatenate to it. Reads of
    contiguous row ranges are zero-copy views of the mmapped shard, so a fused tensor is streamed
    slab by slab and only channel slicing allocates (one expert slab at a time)."""
    L = spec.layer
    if spec.mode == "copy":
        yield f.get_tensor(spec.src)
        return
    if spec.mode == "select":
        t = f.get_tensor(spec.src)
        yield t.index_select(spec.dim, torch.tensor(L.rows(t.shape[spec.dim])))
        return
    if spec.mode == "expert":
        t = f.get_tensor(spec.src)
        yield _channels(t, spec.chan, L, spec.expert_pos) if spec.chan else t
        return
    sl = f.get_slice(spec.src)
    n_src = sl.get_shape()[0]
    if spec.mode == "fused":
        rows = L.rows(n_src)
        if spec.chan is None:
            for a, b in _runs(rows):
                yield sl[a:b]
        else:
            for p, r in enumerate(rows):
                yield _channels(sl[r : r + 1][0], spec.chan, L, p)
        return
    inter = n_src // L.n_old  # dbrx: [E*I, H] as E slabs of I rows
    if spec.chan is None:
        for a, b in _runs(L.keep):
            yield sl[a * inter : b * inter]
    else:
        for p, r in enumerate(L.keep):
            yield _channels(sl[r * inter : (r + 1) * inter], spec.chan, L, p)


def _write_safetensors(path: Path, items: list[tuple[str, _Spec]], produce, bar) -> None:
    """Write a safetensors file piece by piece: the header (names, dtypes, shapes, offsets) is known
    from the specs, so at most one expert slab is ever materialised. Larger element sizes first
    keeps every tensor aligned to its element size."""
    order = sorted(items, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, spec in order:
        header[name] = {
            "dtype": _ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [off, off + spec.nbytes],
        }
        off += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, spec in order:
            written = 0
            for piece in produce(spec):
                if piece.dtype != spec.dtype:
                    raise RuntimeError(f"{name}: produced {piece.dtype}, header says {spec.dtype}")
                buf = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
                fh.write(buf)
                written += buf.nbytes
                del piece, buf
            if written != spec.nbytes:
                raise RuntimeError(
                    f"{name}: produced {written} bytes, header says {spec.shape} = {spec.nbytes}"
                )
            bar.update(1)


def _check_against_meta(model: torch.nn.Module, specs: dict[str, _Spec]) -> None:
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


def _dominant_dtype(specs: dict[str, _Spec]) -> torch.dtype:
    by: dict[torch.dtype, int] = {}
    for s in specs.values():
        if s.dtype.is_floating_point:
            by[s.dtype] = by.get(s.dtype, 0) + s.nbytes
    return max(by, key=by.get) if by else torch.float32


def _handles():
    """A cache of open ``safe_open`` handles, one per shard."""
    cache: dict[str, Any] = {}

    def get(path: str):
        if path not in cache:
            cache[path] = safe_open(path, "pt")
        return cache[path]

    return get


def rewrite_checkpoint(
    src_dir: str | os.PathLike,
    plan: PruningPlan | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    regroup: str = "auto",
    remote_code: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write ``out_dir``: the checkpoint ``src_dir`` pruned by ``plan`` (original expert ids), without
    loading the model. Same folder as ``save_pruned`` of the in-memory pruned model (tensors,
    ``config.json``, ``pruning_plan.json``, remote code for per-layer shapes), plus the source's
    other files (tokenizer, generation config...). Shards follow huggingface_hub's naming
    (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``). Atomic; refuses to
    write into ``src_dir``. Returns the output folder."""
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint {src} is not a folder")
    if out == src or src in out.parents or out in src.parents:
        raise ValueError(
            f"refusing to write into (or replace a folder holding) the source checkpoint {src}; "
            "choose another output directory"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; pass overwrite=True to replace it")
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.load(plan)
    from moeprune.apply import apply_plan, check_plan

    sources = _source_specs(_source_files(src))
    dtype = _dominant_dtype(sources)
    model = _meta_model(src, dtype)
    check_plan(model, plan)  # refuse a plan that does not fit before reading any weight
    specs = _plan_specs(sources, model, _layers(model, plan))
    apply_plan(model, plan, regroup=regroup)  # meta shapes + finalize_config, as the in-memory path
    _check_against_meta(model, specs)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        split = split_state_dict_into_shards_factory(
            specs,
            get_storage_size=lambda s: s.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        handle = _handles()
        with tqdm(total=len(specs), desc="rewrite", unit="tensor", disable=not progress) as bar:
            for fname, names in split.filename_to_tensors.items():
                _write_safetensors(
                    tmp / fname, [(n, specs[n]) for n in names], lambda s: _chunks(s, handle(s.file)), bar
                )
        if split.is_sharded:
            n_params = sum(math.prod(s.shape) for s in specs.values())
            index = {
                "metadata": {"total_parameters": n_params, **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        write_config(
            model, tmp, dtype=dtype, remote_code=remote_code
        )  # config.json (+ remote code) as save_pruned
        plan.save(tmp / PLAN_FILE)
        for p in sorted(src.iterdir()):
            if (
                p.is_file()
                and not p.name.startswith(".")
                and p.name not in _SKIP_FILES
                and not _WEIGHT_FILES.fullmatch(p.name)
            ):
                shutil.copy2(p, tmp / p.name)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "dir")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
