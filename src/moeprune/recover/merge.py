"""``merge``: fold each dropped expert into its most similar kept expert (M-SMoE / HC-SMoE spirit).

* gate mass ``m_e``: the unpruned router's gate weight of ``e`` summed over the captured tokens.
* similarity: cosine of the FLATTENED outputs ``f_a(X), f_b(X) [N*H]`` of every expert on every captured
  token (not a mean of per-token cosines: tokens where both outputs are tiny would count as much as the
  rest); each dropped expert joins the kept expert of highest cosine.
* ``align``: before averaging, the dropped expert's intermediate neurons are permuted onto the survivor's
  by a maximum-weight matching (``scipy.optimize.linear_sum_assignment``) of the Pearson correlation of
  their activations ``act(gate) * up`` on the captured tokens (ties keep the identity).
* new survivor = ``sum_j a_j W_j`` over the cluster (survivor included), ``a_j = m_j / sum m``, for every
  tensor of the experts (gate/up, down, biases); router rows (and router bias) follow the same rule.
  A cluster whose mass is 0 is left as it was.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from moeprune.arch.structure import chan_index, expert_indexed_tensors, inter_layout, selection_biases
from moeprune.observe.experts import ExpertBank
from moeprune.plan import LayerPlan
from moeprune.recover.routed import Routed

CHUNK_ELEMS = 2**24  # elements of one all-experts pass [n, E, H] (128 MiB in float64)


def gate_mass(full: Routed, num_experts: int) -> torch.Tensor:
    """``[E]`` float64 summed gate weight of each expert (unpruned routing)."""
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, full.idx.reshape(-1), full.w.reshape(-1))


@torch.no_grad()
def output_cosine(bank: ExpertBank, x: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` cosine of the flattened expert outputs on ``x [N, H]`` (float64 Gram, chunked)."""
    gram = torch.zeros(bank.num_experts, bank.num_experts, dtype=torch.float64)
    chunk = max(1, CHUNK_ELEMS // (bank.num_experts * bank.hidden_size))
    for i in range(0, x.shape[0], chunk):
        o = bank.all_outputs(x[i:i + chunk]).double()  # [n, E, H]
        gram += torch.einsum("neh,nfh->ef", o, o)
    d = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / d[:, None] / d[None, :]


@torch.no_grad()
def align_perm(bank: ExpertBank, survivor: int, other: int, x: torch.Tensor) -> torch.Tensor:
    """``perm [I]``: survivor neuron ``i`` is matched with neuron ``perm[i]`` of ``other``."""
    def z(e):
        h = bank.expert_forward(e, x, want_inter=True)[1].double()  # [N, I]
        h = h - h.mean(0)
        return h / h.norm(dim=0).clamp_min(1e-300)

    corr = z(survivor).T @ z(other)  # [I, I] Pearson correlation
    corr = torch.nan_to_num(corr) + 1e-9 * torch.eye(corr.shape[0], dtype=corr.dtype)  # ties: identity
    _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def check_mergeable(bank: ExpertBank, lp: LayerPlan) -> None:
    if lp.neurons:
        raise NotImplementedError(f"recovery 'merge' on layer {bank.layer}: the plan prunes neurons inside experts "
                                  "(e.g. TENP), so survivors have per-expert channel sets to merge into; use "
                                  "recovery 'compensate' for neuron plans")
    if selection_biases(bank.block):
        raise NotImplementedError(f"recovery 'merge' on layer {bank.layer}: the router has selection biases "
                                  f"({type(bank.router).__name__}), whose merge rule is not defined; use "
                                  "recovery 'compensate'")


def _permuted(t: torch.Tensor, lay: tuple | None, perm: torch.Tensor | None, inter: int) -> torch.Tensor:
    """One expert's slice ``t [..]`` with its intermediate dim permuted by ``perm``."""
    if perm is None or lay is None:
        return t
    _, _, kind, dim = lay
    return t.index_select(dim - 1, chan_index(kind, perm, inter).to(t.device))


@torch.no_grad()
def merge_cluster(bank: ExpertBank, survivor: int, members: dict[int, float],
                  perms: dict[int, torch.Tensor]) -> None:
    """Survivor's tensors and router row := ``sum_j a_j W_j`` (``members``: id -> ``a_j``, summing to 1)."""
    lays = {(id(o), a): (o, a, k, d) for o, a, k, d in inter_layout(bank.block)}
    inter = bank.intermediate_size
    for qn, mod, attr, dim in expert_indexed_tensors(bank.block)[0]:
        t = getattr(mod, attr)
        if qn.startswith("experts."):
            lay = lays.get((id(mod), attr))
            acc = sum(a * _permuted(t[j], lay, perms.get(j), inter).double() for j, a in members.items())
            t[survivor] = acc.to(t.dtype)
        else:  # router weight rows / router bias entries: the same average, no permutation
            src = t.movedim(dim, 0)
            src[survivor] = sum(a * src[j].double() for j, a in members.items()).to(t.dtype)


def merge_layer(bank: ExpertBank, lp: LayerPlan, full: Routed, align: bool) -> dict:
    """Merge every dropped expert of one layer in place; the record says where each went and whether
    alignment changed its neuron order."""
    check_mergeable(bank, lp)
    x = full.xin  # the experts' input [N, H]
    mass = gate_mass(full, bank.num_experts)
    cos = output_cosine(bank, x)
    kept = torch.as_tensor(lp.keep, dtype=torch.long)
    assign = {d: int(kept[cos[d, kept].argmax()]) for d in lp.removed}
    rec: dict = {"assign": {str(d): k for d, k in assign.items()},
                 "similarity": {str(d): round(float(cos[d, k]), 6) for d, k in assign.items()},
                 "gate_mass": {str(e): round(float(m), 6) for e, m in enumerate(mass.tolist())}, "aligned": {}}
    for k in lp.keep:
        cluster = [k] + [d for d, s in assign.items() if s == k]
        total = float(mass[cluster].sum())
        if len(cluster) == 1 or total <= 0:
            continue
        perms = {}
        if align:
            for d in cluster[1:]:
                perms[d] = align_perm(bank, k, d, x)
                rec["aligned"][str(d)] = bool((perms[d] != torch.arange(perms[d].numel())).any())
        merge_cluster(bank, k, {j: float(mass[j]) / total for j in cluster}, perms)
    return rec
