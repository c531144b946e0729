"""Ragged expert widths stored for real: a layer's experts grouped into a few width buckets.

Fused 3-D expert tensors hold one intermediate width per layer, so neuron pruning with different
widths per expert (TENP) pads every expert to the widest and saves no memory. ``BucketedExperts``
replaces a block's ``experts`` by a few instances of the family's OWN experts class (shallow
clones sharing ``config``/activation, each with its own fused tensors ``[n_b, 2*w_b, H]`` /
``[n_b, H, w_b]``), so the per-token maths (activation, ``_apply_gate``, biases, transposed or
interleaved layouts, the configured ``experts_implementation``) is the family's code. It routes each
(token, slot) pair to its bucket and row, and ends like ``grouped_mm_experts_forward``: per-slot
outputs weighted by the routing weights, summed over the top-k slots.

Torch and stdlib only: in saved checkpoints this file follows ``structure.py`` in the remote code
``modeling_pruned_moe.py`` (the marked imports below are then dropped: the names already exist).
"""
import copy

import torch
from torch import nn

# moeprune:package-imports (dropped in remote code, where structure.py precedes this file)
from moeprune.arch.structure import (
    COUNT_ATTRS,
    INTER_ATTRS,
    apply_moe_pruning_structure,
    chan_index,
    get_experts,
    inter_layout,
    intermediate_size_of,
    iter_moe_blocks,
    num_experts_of,
    replace_tensor,
)

# moeprune:end-package-imports


class BucketedExperts(nn.Module):
    """Experts of one MoE layer stored in width buckets; same call as the family's experts module:
    ``forward(hidden [T,H], top_k_index [T,k], top_k_weights [T,k]) -> [T,H]`` (weighted, summed).

    Bucket 0 (the narrowest) keeps the family's tensor names at this level (``experts.gate_up_proj``
    ``[n_0, 2*w_0, H]``...: its parameter dicts ARE this module's), buckets 1.. live in ``wider``. So a
    checkpoint loaded without ``load_pruned``/remote code fails loudly on the size mismatch
    (``n_0 < E``) instead of silently re-initialising the missing fused tensors."""

    def __init__(self, buckets: list[nn.Module], members: list[list[int]], widths: list[int]):
        super().__init__()
        first = buckets[0]
        self._parameters, self._buffers = first._parameters, first._buffers  # shared dicts, see above
        self._non_persistent_buffers_set = first._non_persistent_buffers_set
        self.__dict__["_first"] = first  # not a child: its tensors are registered here already
        self.wider = nn.ModuleList(buckets[1:])
        self.members = [[int(e) for e in m] for m in members]  # current expert ids per bucket
        self.widths = [int(w) for w in widths]
        self.num_experts = sum(len(m) for m in self.members)
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def bucket_modules(self) -> list[nn.Module]:
        """The family experts module of every bucket, in bucket order."""
        return [self.__dict__["_first"], *self.wider]

    def layout(self) -> dict:
        """What ``config.moe_pruning["buckets"][layer]`` records to rebuild this module."""
        return {"widths": list(self.widths), "experts": [list(m) for m in self.members]}

    def _routing(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bucket [E], row [E])`` of every expert id, cached per device (not in the state dict)."""
        key = str(device)
        if key not in self._maps:
            bucket = torch.empty(self.num_experts, dtype=torch.long)
            row = torch.empty(self.num_experts, dtype=torch.long)
            for b, ids in enumerate(self.members):
                bucket[ids] = b
                row[ids] = torch.arange(len(ids))
            self._maps[key] = (bucket.to(device), row.to(device))
        return self._maps[key]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        t, k = top_k_index.shape
        flat = top_k_index.reshape(-1)  # [S] with S = T*k, slot-major per token
        bucket, row = self._routing(flat.device)
        b_of, r_of = bucket[flat], row[flat]  # [S]
        tok = torch.arange(t * k, device=flat.device) // k  # [S] token of each slot
        per_slot = hidden_states.new_zeros(t * k, hidden_states.shape[-1])  # [S, H] unweighted f_e(x)
        for b, mod in enumerate(self.bucket_modules()):
            sel = torch.nonzero(b_of == b).reshape(-1)  # [S_b]
            if sel.numel() == 0:
                continue
            ones = top_k_weights.new_ones(sel.numel(), 1)  # weight 1: the bucket returns f_e(x) exactly
            out = mod(hidden_states[tok[sel]], r_of[sel].unsqueeze(1), ones)  # [S_b, H]
            per_slot.index_copy_(0, sel, out.to(per_slot.dtype))
        weighted = per_slot * top_k_weights.reshape(-1, 1)  # [S, H], dtype promoted as the family does
        impl = getattr(getattr(self.__dict__["_first"], "config", None), "_experts_implementation", None)
        if impl not in (None, "eager"):  # grouped_mm / batched_mm: one sum over the k slots, then cast
            return weighted.view(t, k, -1).sum(dim=1).to(hidden_states.dtype)
        # eager: index_add_ per expert in ascending id order, rounding to the hidden dtype at every add
        slots = weighted.to(hidden_states.dtype).view(t, k, -1)  # [T, k, H]
        order = top_k_index.argsort(dim=1)  # [T, k] slots by ascending expert id
        acc = torch.zeros_like(hidden_states)
        for j in range(k):
            acc = acc + slots.gather(1, order[:, j, None, None].expand(-1, 1, slots.shape[-1])).squeeze(1)
        return acc


def _shell(ex: nn.Module) -> nn.Module:
    """A shallow clone of an experts module with its own parameter/buffer/hook dicts (shared config,
    activation and submodules): the family's forward, ready for its own bucket tensors."""
    sub = copy.copy(ex)
    for key, val in list(vars(sub).items()):
        if isinstance(val, (dict, set)):
            vars(sub)[key] = copy.copy(val)
    return sub


def bucket_block_(block: nn.Module, members: list[list[int]], widths: list[int]) -> nn.Module:
    """Replace ``block.experts`` (fused, every expert's live channels FIRST, as ``neuron_index``
    stores them) by a ``BucketedExperts``: bucket ``b`` holds experts ``members[b]`` (current ids)
    with their first ``widths[b]`` channels. Works on meta tensors (load-time rebuild)."""
    ex = get_experts(block)
    n, i_pad = num_experts_of(block), intermediate_size_of(block)
    lay = [(attr, kind, dim) for owner, attr, kind, dim in inter_layout(block) if owner is ex]
    if len(lay) != len(inter_layout(block)) or sorted(e for m in members for e in m) != list(range(n)):
        raise ValueError(f"{type(ex).__name__}: cannot bucket {members} (every expert exactly once, "
                         "intermediate tensors owned by the experts module)")
    if any(w < 1 or w > i_pad for w in widths):
        raise ValueError(f"bucket widths {widths} must lie in [1, {i_pad}]")
    subs = []
    for ids, w in zip(members, widths):
        sub = _shell(ex)
        rows = torch.as_tensor(ids, dtype=torch.long)
        for name, t in list(ex.named_parameters(recurse=False)) + list(ex.named_buffers(recurse=False)):
            if t.dim() >= 1 and t.shape[0] == n:  # [E, ...] -> [n_b, ...]
                replace_tensor(sub, name, t.index_select(0, rows.to(t.device)))
        chans = torch.arange(w)
        for attr, kind, dim in lay:  # intermediate dim: keep the first w channels (live ones first)
            t = getattr(sub, attr)
            replace_tensor(sub, attr, t.index_select(dim, chan_index(kind, chans, i_pad).to(t.device)))
        for a in COUNT_ATTRS:
            if getattr(sub, a, None) == n:
                setattr(sub, a, len(ids))
        for a in INTER_ATTRS:
            if getattr(sub, a, None) == i_pad:
                setattr(sub, a, w)
        subs.append(sub)
    block.experts = BucketedExperts(subs, members, widths)
    return block


def bucket_layout(block: nn.Module) -> dict | None:
    """The bucket layout of a block, or None when its experts are one fused module."""
    ex = getattr(block, "experts", None)
    return ex.layout() if isinstance(ex, BucketedExperts) else None


def apply_bucket_structure(model: nn.Module, buckets: dict | None) -> nn.Module:
    """Re-create bucketed experts on a freshly built model (meta or random), before the weights load:
    ``buckets = config.moe_pruning["buckets"] = {layer: {"widths": [...], "experts": [[ids], ...]}}``."""
    spec = {int(k): v for k, v in (buckets or {}).items()}
    for li, _, block in iter_moe_blocks(model):
        if li in spec:
            bucket_block_(block, spec[li]["experts"], spec[li]["widths"])
    return model


def apply_pruned_structure(model: nn.Module, spec: dict | None) -> nn.Module:
    """``apply_moe_pruning_structure`` (expert counts, top-k, groups, fused widths), then buckets."""
    apply_moe_pruning_structure(model, spec)
    return apply_bucket_structure(model, (spec or {}).get("buckets"))
