"""Out-of-core apply: rewrite a checkpoint's safetensors shards by a plan, without loading the model.

Peak memory is at most one tensor, usually far less: tensors are read with ``safe_open`` as
zero-copy views of the mmapped shards (fused expert tensors as runs of kept expert slabs through
``get_slice``; only channel slicing materialises a slab) and streamed into the output shard, whose
safetensors header is computed beforehand from the shapes alone (``apply/shards.py``).

Which on-disk tensor is what comes from transformers itself: every key is mapped to its module
parameter with the model family's checkpoint conversion mapping (``rename_source_key``; e.g. Mixtral
``block_sparse_moe.experts.3.w1.weight`` -> ``mlp.experts.gate_up_proj``, expert 3), and the MoE
structure (expert-indexed tensors, intermediate-channel layout) is read from a model built on the
META device (``apply/streaming_specs.py``). So both layouts work: per-expert legacy keys (kept
experts renumbered contiguously in original-id order) and fused keys (slice dim 0; DBRX ``[E*I, H]``
views; GPT-OSS transposed + biases), plus router rows/biases and selection biases. The config is produced by applying the plan
to that meta model (``apply_plan`` + ``finalize_config``), exactly as ``save_pruned`` does, and the
output keys and shapes are checked against the pruned meta model's state dict reverted to the
on-disk format (what ``save_pretrained`` would write).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from moeprune.apply.buckets import MIN_WASTE, RAGGED, padding_waste
from moeprune.apply.checkpoint import PLAN_FILE, REMOTE_CODE_FILE, pruned_class, write_config
from moeprune.apply.config import is_per_layer
from moeprune.apply.inplace import apply_plan, check_plan
from moeprune.apply.shards import is_weight_file, open_handles, source_files, write_shards
from moeprune.apply.streaming_specs import (
    Layer,
    Spec,
    check_against_meta,
    dominant_dtype,
    plan_layers,
    plan_specs,
    source_specs,
)
from moeprune.arch import structure as S
from moeprune.atomic import atomic_dir, check_free_space, check_output_dir, output_lock
from moeprune.plan import PruningPlan

_SKIP_FILES = {"config.json", PLAN_FILE, REMOTE_CODE_FILE}


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


# ---------------------------------------------------------------- materialise
def _channels(t: torch.Tensor, chan: tuple[str, int], L: Layer, pos: int) -> torch.Tensor:
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


def _chunks(spec: Spec, f) -> Iterator[torch.Tensor]:
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


def apply_overrides(sources: dict[str, Spec], overrides: dict[str, str]) -> None:
    """Point the specs of ``overrides``' keys at their override files, checked against the source headers."""
    unknown = sorted(k for k in overrides if k not in sources)
    if unknown:
        raise ValueError(f"overrides name keys {unknown[:4]} that the source checkpoint does not hold; an "
                         "override replaces an existing tensor (pass on-disk keys)")
    got = source_specs(dict(overrides))
    bad = [(k, (s.shape, s.dtype), (sources[k].shape, sources[k].dtype)) for k, s in got.items()
           if (s.shape, s.dtype) != (sources[k].shape, sources[k].dtype)]
    if bad:
        raise ValueError(f"override tensors differ from the source in shape or dtype (key, override, source): "
                         f"{bad[:4]}; an override must have the source tensor's shape and dtype")
    for k, s in got.items():
        sources[k].file = s.file


STREAMING_PAD_ONLY = ("--streaming (rewrite_checkpoint) writes ragged neuron plans in the pad layout only "
                      "(narrower experts zero-padded to the widest, no memory saved for the padding)")


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
    ragged: str = "auto",
    overrides: dict[str, str] | None = None,
) -> str:
    """Write ``out_dir``: the checkpoint ``src_dir`` pruned by ``plan`` (original expert ids), without
    loading the model. Same folder as ``save_pruned`` of the in-memory pruned model (tensors,
    ``config.json``, ``pruning_plan.json``, remote code for per-layer shapes), plus the source's
    other files (tokenizer, generation config...). Shards follow huggingface_hub's naming
    (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``). Atomic; refuses to
    write into ``src_dir``. Returns the output folder.

    Ragged neuron plans are written in the pad layout only (one fused width per layer, narrower
    experts zero-padded): ``ragged="buckets"`` is refused, ``"auto"`` warns when padding wastes
    memory; the in-memory ``apply_plan`` + ``save_pruned`` writes width buckets instead.

    ``overrides``: ``{source key: safetensors file}``: those tensors are read from that file instead of the
    source shard (same shape and dtype required), then sliced by the plan like the source's: how
    out-of-core recovery (``recover.layerwise``) hands over its recovered weights."""
    src = Path(src_dir).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint {src} is not a folder")
    out = check_output_dir(out_dir, sources=[src], overwrite=overwrite)
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.load(plan)
    if ragged not in RAGGED:
        raise ValueError(f"ragged={ragged!r}; expected one of {RAGGED}")
    if ragged == "buckets":
        raise NotImplementedError(STREAMING_PAD_ONLY + "; drop --streaming (rewrite_checkpoint) to apply in memory "
                                  "(apply_plan + save_pruned write width buckets), or pass ragged='pad'")
    sources = source_specs(source_files(src))
    if overrides:
        apply_overrides(sources, overrides)
    dtype = dominant_dtype(sources)
    model = _meta_model(src, dtype)
    check_plan(model, plan)  # refuse a plan that does not fit before reading any weight
    specs = plan_specs(sources, model, plan_layers(model, plan))
    apply_plan(model, plan, regroup=regroup, ragged="pad")  # meta shapes + config, as in memory (pad layout)
    check_against_meta(model, specs)
    wasted = {li: round(w, 3) for li, w in padding_waste(model).items() if w > MIN_WASTE}
    if ragged == "auto" and wasted:
        warnings.warn(f"{STREAMING_PAD_ONLY}: padding is this fraction of the routed experts of layers {wasted}; "
                      "apply without --streaming (in memory) to store width buckets and save that memory",
                      stacklevel=2)

    handle = open_handles(keep=2)  # mapped pages of closed shards leave the RSS
    with output_lock(out), atomic_dir(out) as tmp:
        check_output_dir(out, sources=[src], overwrite=overwrite)  # under the lock, again
        check_free_space(tmp, sum(s.nbytes for s in specs.values()), f"the pruned checkpoint {out}")
        write_shards(
            tmp, specs, lambda s: _chunks(s, handle(s.file)), max_shard_size=max_shard_size, progress=progress
        )
        write_config(model, tmp, dtype=dtype, remote_code=remote_code)  # config.json (+ remote code)
        plan.save(tmp / PLAN_FILE)
        for p in sorted(src.iterdir()):  # tokenizer, generation config...
            if p.is_file() and not (
                p.name.startswith(".") or p.name in _SKIP_FILES or is_weight_file(p.name)
            ):
                shutil.copy2(p, tmp / p.name)
    return str(out)
