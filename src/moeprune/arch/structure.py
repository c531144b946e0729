"""Structural view of transformers 5.x MoE blocks: find them, read their shapes, slice them.

Torch and stdlib only: this file is also copied verbatim into non-uniformly pruned checkpoints as
the body of ``modeling_pruned_moe.py`` (remote code), so it must stay self-contained.

Every 5.x MoE block has a router (``gate``/``router``) returning ``(logits[T,E], w[T,k], idx[T,k])``
and one ``experts`` module with fused 3-D tensors ``gate_up_proj [E,2I,H]``, ``down_proj [E,H,I]``
(GPT-OSS / Aria / Llama4 transposed; DBRX 2-D ``[E*I,H]``; JetMoE has no experts module).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
               "num_routed_experts", "total_experts", "n_total_experts")
TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k")
INTER_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_hidden_size", "ffn_dim",
               "expert_ffn_hidden_size")
ROUTER_NAMES = ("gate", "router")


def _layer_index(name: str, fallback: int) -> int:
    m = re.search(r"(?:layers|blocks|block|h)\.(\d+)", name)
    return int(m.group(1)) if m else fallback


def is_moe_block(mod: nn.Module) -> bool:
    kids = dict(mod.named_children())
    std = "experts" in kids and any(k in kids for k in ROUTER_NAMES)
    jet = "router" in kids and "input_linear" in kids and "output_linear" in kids and hasattr(mod, "activation")
    return std or jet


def iter_moe_blocks(model: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
    """Yield ``(layer_idx, module_name, block)`` for every sparse-MoE block, in model order.

    A block is a module with an ``experts`` child and a ``gate``/``router`` child (Gemma4's decoder
    layer itself qualifies), or the JetMoE layout (``router`` + ``input_linear`` + ``output_linear``)."""
    i = 0
    for name, mod in model.named_modules():
        if is_moe_block(mod):
            yield _layer_index(name, i), name, mod
            i += 1


def get_router(block: nn.Module) -> nn.Module:
    for n in ROUTER_NAMES:
        r = getattr(block, n, None)
        if isinstance(r, nn.Module):
            return r
    raise ValueError(f"no router (gate/router child) in {type(block).__name__}")


def get_experts(block: nn.Module) -> nn.Module:
    ex = getattr(block, "experts", None)
    return ex if ex is not None else block  # JetMoE: the block owns input_linear/output_linear


def router_weight(router: nn.Module) -> torch.Tensor:
    """The ``[E_router, H]`` logit projection (``E_router = E + zero experts`` for LongCat)."""
    for sub in ("layer", "wg", "classifier", "gate", "proj"):  # dbrx/jetmoe, hunyuan, longcat, afmoe, gemma4
        m = getattr(router, sub, None)
        if isinstance(m, nn.Linear):
            return m.weight
    w = getattr(router, "weight", None)  # Mixtral-style Parameter, or nn.Linear subclass (phimoe, llama4)
    if isinstance(w, torch.Tensor):
        return w
    raise ValueError(f"cannot find the router weight in {type(router).__name__}")


def num_experts_of(block: nn.Module) -> int:
    """Number of real (parameterised) routed experts of a block."""
    ex = get_experts(block)
    if hasattr(ex, "num_routed_experts"):  # LongCat: identity experts live after the real ones
        return int(ex.num_routed_experts)
    for a in ("num_experts", "moe_num_experts"):
        if isinstance(getattr(ex, a, None), int):
            return int(getattr(ex, a))
    if hasattr(block, "input_linear"):
        return int(block.input_linear.num_experts)
    return int(router_weight(get_router(block)).shape[0])


def current_top_k(block: nn.Module) -> int | None:
    """Top-k of a block: module attributes first, then the router's config (Gemma4 reads
    ``config.top_k_experts`` at every forward, so it is a global that cannot vary per layer)."""
    router = get_router(block)
    for m in (router, block):
        for a in TOPK_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    for m in (router, block):
        v = getattr(getattr(m, "config", None), "top_k_experts", None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def group_info(block: nn.Module) -> tuple[int, int]:
    """``(n_group, topk_group)`` of group-limited routers, ``(1, 1)`` otherwise."""
    r = get_router(block)
    return (getattr(r, "num_group", None) or getattr(r, "n_group", None) or 1), (getattr(r, "topk_group", None) or 1)


def set_group_attrs(block: nn.Module, n_group: int, topk_group: int) -> None:
    r = get_router(block)
    for a in ("num_group", "n_group"):
        if hasattr(r, a):
            setattr(r, a, n_group)
    if hasattr(r, "topk_group"):
        r.topk_group = topk_group


def _all_tensors(root: nn.Module, recurse: bool = True):
    mods = root.named_modules() if recurse else [("", root)]
    for mname, mod in mods:
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            yield (f"{mname}.{pname}" if mname else pname), mod, pname, p


def replace_tensor(mod: nn.Module, attr: str, new: torch.Tensor) -> None:
    """Swap a parameter or buffer in place, keeping its kind (and a buffer's persistence)."""
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
    else:
        mod._buffers[attr] = new.contiguous()


def expert_indexed_tensors(block: nn.Module):
    """``([(qualified_name, owner, attr, dim)], n_experts, n_zero)`` for every tensor indexed by expert id.

    Experts subtree: tensors whose dim 0 is ``E`` (or ``E+Z`` for LongCat); DBRX's 2-D ``[E*I, H]``
    tensors are reported with ``dim=-1`` ("view as ``[E, I, H]``"). Router subtree and the block's own
    tensors (MiniMax-M2 ``e_score_correction_bias``, AFMoE/LFM2 ``expert_bias``): any dim equal to E."""
    n = num_experts_of(block)
    router = get_router(block)
    e_router = router_weight(router).shape[0]
    n_zero = e_router - n if e_router > n else 0
    out = []
    ex = get_experts(block)
    if ex is block:  # JetMoE
        for sub in ("input_linear", "output_linear"):
            out.append((f"{sub}.weight", getattr(block, sub), "weight", 0))
    else:
        for qn, mod, attr, t in _all_tensors(ex):
            if t.dim() >= 1 and t.shape[0] in (n, n + n_zero):
                out.append((f"experts.{qn}", mod, attr, 0))
            elif t.dim() == 2 and type(ex).__name__.startswith("Dbrx") and t.shape[0] % n == 0:
                out.append((f"experts.{qn}", mod, attr, -1))
    seen = set()
    rname = next(k for k in ROUTER_NAMES if getattr(block, k, None) is router)
    for qn, mod, attr, t in list(_all_tensors(router)):
        dims = [d for d in range(t.dim()) if t.shape[d] in (e_router, n)]
        if dims:
            out.append((f"{rname}.{qn}", mod, attr, dims[0]))
            seen.add(id(t))
    for qn, mod, attr, t in _all_tensors(block, recurse=False):
        if id(t) in seen or qn == "bias":  # JetMoE block.bias is [H]
            continue
        dims = [d for d in range(t.dim()) if t.shape[d] in (e_router, n)]
        if dims and t.dim() <= 2:
            out.append((qn, mod, attr, dims[0]))
    return out, n, n_zero


def selection_biases(block: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """``(owner, attr, expert_dim)`` of selection-only biases (not the router weight/bias, which
    are masked through the logits, nor Gemma4's multiplicative ``per_expert_scale``)."""
    out = []
    for qn, mod, attr, dim in expert_indexed_tensors(block)[0]:
        if qn.startswith("experts.") or attr in ("weight", "bias") or "scale" in attr:
            continue
        if mod is get_router(block) and attr == "weight":
            continue
        out.append((mod, attr, dim))
    return out


def _expert_rows(idx: torch.Tensor, size: int, n_old: int, n_zero: int) -> torch.Tensor:
    if size == n_old:
        return idx
    if n_zero and size == n_old + n_zero:  # LongCat: always keep the zero-compute experts
        return torch.cat([idx, torch.arange(n_old, n_old + n_zero, device=idx.device)])
    raise ValueError(f"expert dim {size} matches neither {n_old} nor {n_old}+{n_zero}")


def set_count_attrs(block: nn.Module, n_old: int, n_new: int) -> None:
    delta = n_old - n_new
    for _, m in block.named_modules():
        for a in COUNT_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v >= n_old:
                setattr(m, a, v - delta)


def set_topk_attrs(block: nn.Module, k: int) -> None:
    for _, m in block.named_modules():
        for a in TOPK_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(m, a, k)


def slice_experts_(block: nn.Module, keep: Iterable[int]) -> int:
    """Keep only experts ``keep`` (sorted ids) of one block, in place; returns the old count.

    Slices expert tensors, router rows, router/selection biases and rewrites the count attributes
    (``grouped_mm`` bins tokens with ``histc(bins=experts.num_experts)``, so they must follow)."""
    tensors, n_old, n_zero = expert_indexed_tensors(block)
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    for _qn, mod, attr, dim in tensors:
        if attr not in mod._parameters and attr not in mod._buffers:
            continue
        t = getattr(mod, attr)
        if dim == -1:  # DBRX [E*I, H]
            inter = t.shape[0] // n_old
            new = t.view(n_old, inter, -1).index_select(0, idx.to(t.device)).reshape(-1, t.shape[-1])
        else:
            new = t.index_select(dim, _expert_rows(idx, t.shape[dim], n_old, n_zero).to(t.device))
        replace_tensor(mod, attr, new)
    set_count_attrs(block, n_old, len(idx))
    k = current_top_k(block)
    if k is not None and k > len(idx):
        set_topk_attrs(block, len(idx))
    return n_old


# ---------------------------------------------------------------- intermediate (neuron) layout
def inter_layout(block: nn.Module) -> list[tuple[nn.Module, str, str, int]]:
    """Where the intermediate dim lives: ``[(owner, attr, kind, dim)]`` with kind ``gu_cat`` (gate rows
    ``0:I`` + up rows ``I:2I``), ``gu_int`` (interleaved ``2j, 2j+1``) or ``plain``."""
    ex = get_experts(block)
    name = type(ex).__name__
    if ex is block:  # JetMoE: input_linear [E, 2I, H] (chunk), output_linear [E, H, I]
        return [(block.input_linear, "weight", "gu_cat", 1), (block.output_linear, "weight", "plain", 2)]
    if name.startswith("Dbrx"):
        return [(ex.mlp, "w1", "plain", 1), (ex.mlp, "v1", "plain", 1), (ex.mlp, "w2", "plain", 1)]
    if name.startswith("Llama4"):  # gate_up [E, H, 2I] (chunk), down [E, I, H]
        return [(ex, "gate_up_proj", "gu_cat", 2), (ex, "down_proj", "plain", 1)]
    if type(ex).__name__ == "BucketedExperts":  # arch/buckets.py: one fused module per width bucket
        raise NotImplementedError("experts stored in width buckets have no single fused intermediate layout; "
                                  "prune or observe the model before bucketing (apply_plan ragged='pad')")
    if getattr(ex, "has_post_expert_norm", False):
        raise NotImplementedError(f"{name}: a norm over the expert output is not channel-separable; "
                                  "neuron pruning would not be exact")
    if not hasattr(ex, "gate_up_proj") and not hasattr(ex, "up_proj"):
        raise NotImplementedError(f"neuron pruning is not implemented for experts class {name}")
    tr, cat = getattr(ex, "is_transposed", False), getattr(ex, "is_concatenated", True)
    gate, bias = getattr(ex, "has_gate", True), getattr(ex, "has_bias", False)
    gu_kind = ("gu_cat" if cat else "gu_int") if gate else "plain"
    gu_name = "gate_up_proj" if gate else "up_proj"
    lay = [(ex, gu_name, gu_kind, 2 if tr else 1), (ex, "down_proj", "plain", 1 if tr else 2)]
    if bias:
        lay.append((ex, gu_name + "_bias", gu_kind, 1))
    return lay


def is_dbrx(block: nn.Module) -> bool:
    return type(get_experts(block)).__name__.startswith("Dbrx")


def intermediate_size_of(block: nn.Module) -> int:
    if is_dbrx(block):
        return get_experts(block).mlp.w2.shape[0] // num_experts_of(block)
    owner, attr, _kind, dim = [lay for lay in inter_layout(block) if lay[2] == "plain"][-1]  # down projection
    return getattr(owner, attr).shape[dim]


def chan_index(kind: str, j: torch.Tensor, inter: int) -> torch.Tensor:
    """Rows/columns of channels ``j`` in a tensor of the given layout kind."""
    if kind == "gu_cat":
        return torch.cat([j, j + inter])
    if kind == "gu_int":
        return torch.stack([2 * j, 2 * j + 1], 1).reshape(-1)
    return j


def slice_neurons_(block: nn.Module, keep: torch.Tensor) -> int:
    """Keep channels ``keep [E, I_new]`` (one width per layer: fused tensors cannot be ragged)."""
    lay = inter_layout(block)
    n = num_experts_of(block)
    i_old = intermediate_size_of(block)
    keep = torch.as_tensor(keep, dtype=torch.long)
    i_new = keep.shape[1]
    dbrx = is_dbrx(block)
    for owner, attr, kind, dim in lay:
        t = getattr(owner, attr)
        tt = t.view(n, i_old, -1) if dbrx else t
        d = 1 if dbrx else dim
        rows = []
        for e in range(tt.shape[0]):
            ee = min(e, n - 1) if tt.shape[0] > n else e  # LongCat gate_up carries unused zero-expert rows
            rows.append(tt[e].index_select(d - 1, chan_index(kind, keep[ee].to(t.device), i_old)))
        new = torch.stack(rows, 0)
        replace_tensor(owner, attr, new.reshape(n * i_new, -1) if dbrx else new)
    ex = get_experts(block)
    for m in [block] + ([] if ex is block else list(ex.modules())):
        for a in INTER_ATTRS:
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool) and v == i_old:
                setattr(m, a, i_new)
    if ex is block:  # JetMoE bookkeeping
        block.hidden_size = i_new
        block.input_linear.output_size = 2 * i_new
        block.output_linear.input_size = i_new
    return i_old


def kill_channels_(block: nn.Module, dead: torch.Tensor) -> None:
    """Zero channels ``dead: bool [E, I]`` in every tensor carrying the intermediate dim, so each
    contributes exactly 0 (the exact way to express ragged per-expert widths in fused tensors)."""
    n, inter = dead.shape
    dbrx = is_dbrx(block)
    with torch.no_grad():
        for owner, attr, kind, dim in inter_layout(block):
            t = getattr(owner, attr)
            tt = t.view(n, inter, -1) if dbrx else t
            d = 1 if dbrx else dim
            for e in range(n):
                j = torch.nonzero(dead[e]).reshape(-1)
                if j.numel():
                    tt[e].index_fill_(d - 1, chan_index(kind, j, inter).to(t.device), 0.0)


# ---------------------------------------------------------------- structure-only re-application
def apply_moe_pruning_structure(model: nn.Module, spec: dict | None) -> nn.Module:
    """Re-create pruned *shapes* on a freshly built full-size model (meta or random), before loading.

    ``spec = config.moe_pruning = {"num_experts": {layer: n}, "top_k": {layer: k},
    "n_group": {layer: [n_group, topk_group]}, "intermediate_size": {layer: I}}``. Prefix slicing is
    enough: the values are loaded from the checkpoint afterwards."""
    if not spec:
        return model

    def g(key):
        return {int(k): v for k, v in (spec.get(key) or {}).items()}

    ne, tk, ng, inter = g("num_experts"), g("top_k"), g("n_group"), g("intermediate_size")
    for li, _, block in iter_moe_blocks(model):
        if li in ne:
            slice_experts_(block, range(int(ne[li])))
        if li in tk:
            set_topk_attrs(block, int(tk[li]))
        if li in ng:
            set_group_attrs(block, int(ng[li][0]), int(ng[li][1]))
        if li in inter:
            slice_neurons_(block, torch.arange(int(inter[li])).expand(num_experts_of(block), -1))
    return model


# ---------------------------------------------------------------- memory layout after loading
ALIGN_BYTES = 64  # torch's CPU allocator alignment: what every tensor built in memory gets


def realign_tensors_(model: nn.Module, align: int = ALIGN_BYTES) -> int:
    """Copy every CPU parameter/buffer whose address is not ``align``-byte aligned into a fresh
    allocation; returns how many were copied.

    Why: ``from_pretrained`` memory-maps safetensors, whose tensors start only 8-byte aligned (the
    header is padded to 8). CPU GEMM libraries choose kernels by alignment (MKL on non-AVX-512 paths,
    e.g. AMD EPYC; torch <= 2.10 ``grouped_mm`` falls back to a loop), so a reloaded model could round
    differently from the identical in-memory one. After this both run the same kernels."""
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None or t.device.type != "cpu" or t.numel() == 0 or t.data_ptr() % align == 0:
                        continue
                    fresh = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
                    if isinstance(t, nn.Parameter):
                        t.data = fresh  # same Parameter object: tied weights stay tied
                    else:
                        store[name] = fresh
                    n += 1
    return n


def decoder_layers(model: nn.Module, block_names: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the decoder layers holding the MoE blocks."""
    names = list(block_names)
    for lname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and all(
                n.startswith(lname + ".") and n[len(lname) + 1:].split(".")[0].isdigit() for n in names):
            return lname, mod
    raise NotImplementedError(f"{type(model).__name__}: no ModuleList holds every MoE block ({names[:3]}...); "
                              "layer-wise calibration needs a stack of decoder layers")
