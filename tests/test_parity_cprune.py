"""C-Prune parity: ``cprune`` == an independent oracle of the released code (Fighoture/MoE_unsupervised_pruning
@65719c5, pruning_mask.py + utils/uns_utils.py), written from its formulas: SciPy Ward on
``squareform(pdist(V))`` of fp16 batch features, fp16 distances to the cluster mean, the dynamic coefficient,
stable-sort ties (the lowest id / pool position goes first), ``int(rate * n)`` counts and the per-layer cap
``int(n_layer // layer_rate * 0.9)``. Equal pruned sets in every layer are asserted (bitwise: both sides run
the same deterministic numpy / SciPy arithmetic on the same inputs)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _stats_factory import make_stats
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from moeprune.methods.cprune import CPrune
from moeprune.methods.target import Target


# ---------------------------------------------------------------------------- oracle (reference formulas)
def oracle_coef(length: int, total: int) -> float:
    p = length / total
    c = math.exp(0.5 - p) - math.exp(p - 0.5) / (math.exp(p - 0.5) + math.exp(0.5 - p))
    return c * 0.6 + 0.5


def oracle_cluster(emb: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """emb [M, D] -> fcluster labels (1..k) and ||emb_i - mean of its cluster|| in emb's dtype."""
    with warnings.catch_warnings():  # the square matrix as observations is what the code does
        warnings.simplefilter("ignore")
        lab = fcluster(linkage(squareform(pdist(emb)), method="ward"), t=k, criterion="maxclust").tolist()
    centre = {c: emb[np.array(lab) == c].mean(axis=0) for c in set(lab)}
    return lab, [float(np.linalg.norm(emb[i] - centre[lab[i]])) for i in range(len(lab))]


def oracle_selected(out: np.ndarray, k: int, rate: float, total: int, bs: int, dtype) -> dict[int, int]:
    """out [M, N, H] -> {candidate: number of batches whose clustering selected it}."""
    sel = {i: 0 for i in range(out.shape[0])}
    for start in range(0, out.shape[1], bs):
        lab, dist = oracle_cluster(out[:, start : start + bs].reshape(out.shape[0], -1).astype(dtype), k)
        clusters: dict[int, dict[int, float]] = {}
        for i, (c, d) in enumerate(zip(lab, dist)):
            clusters.setdefault(c, {})[i] = d
        for info in clusters.values():
            items = list(info.items())
            if len(info) >= 3:
                items = sorted(items, key=lambda x: x[1])[
                    : int(oracle_coef(len(info), total) * (1 - rate) * len(info))
                ]
            for i, _ in items:
                sel[i] += 1
    return sel


def oracle_cprune(so: dict[int, torch.Tensor], lr, gr, k1, k2, bs, dtype=np.float16) -> dict[int, list[int]]:
    """so = {layer: sentence_out [N, E, H]} -> {layer: pruned expert ids} as the released code computes."""
    layers = sorted(so)
    out = {li: so[li].permute(1, 0, 2).numpy() for li in layers}  # [E, N, H]
    E = out[layers[0]].shape[0]
    lp = {}
    for li in layers:
        sel = oracle_selected(out[li], k1, lr, E, bs, dtype)
        lp[li] = sorted(i for i, _ in sorted(sel.items(), key=lambda x: x[1])[: int(lr * E)])
    remain = {li: [e for e in range(E) if e not in lp[li]] for li in layers}
    R = len(remain[layers[0]])
    sel = oracle_selected(np.concatenate([out[li][remain[li]] for li in layers]), k2, gr, E, bs, dtype)
    gl: dict[int, list[int]] = {li: [] for li in layers}
    for idx, _ in sorted(sel.items(), key=lambda x: x[1])[: int(gr * len(sel))]:
        gl[layers[idx // R]].append(remain[layers[idx // R]][idx % R])
    final = {}
    for li in layers:
        cap = int(len(lp[li]) // lr * 0.9)
        g = gl[li][:cap] if len(gl[li]) + len(lp[li]) > cap else gl[li]
        final[li] = sorted(g + lp[li])
    return final


def product_pruned(stats, **kw) -> dict[int, list[int]]:
    with warnings.catch_warnings():  # the achieved-vs-target sparsity note is expected here
        warnings.simplefilter("ignore")
        plan = CPrune(**kw).plan(stats, Target(expert_sparsity=0.19, allocation="method"))
    return {li: sorted(set(range(stats.num_experts(li))) - set(k)) for li, k in plan.keep().items()}


# ---------------------------------------------------------------------------- synthetic statistics
def clustered(L=3, E=32, N=70, H=8, seed=0, scale=1.0) -> dict[int, torch.Tensor]:
    """Experts in a few tight groups (Ward has real structure to find) plus per-sample noise; N = 70 gives
    two full batches of 32 and a partial one of 6 (the code keeps the partial batch)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for li in range(L):
        centres = torch.randn(5, N, H, generator=g, dtype=torch.float64)
        which = torch.randint(0, 5, (E,), generator=g)
        out[li] = scale * (
            centres[which] + 0.3 * torch.randn(E, N, H, generator=g, dtype=torch.float64)
        ).permute(1, 0, 2)
    return out


def stats_of(so: dict[int, torch.Tensor], top_k: int = 2):
    return make_stats(
        {li: {"count": [1.0] * t.shape[1], "sentence_out": t} for li, t in so.items()}, top_k=top_k
    )


CASES = [  # (layer_rate, global_rate, layer clusters, global clusters, batch size)
    (0.1, 0.1, 12, 6, 32),  # the released script's settings
    (0.25, 0.2, 12, 6, 32),
    (0.1, 0.3, 4, 3, 16),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_equals_reference(case, seed):
    lr, gr, k1, k2, bs = case
    so = clustered(seed=seed)
    want = oracle_cprune(so, lr, gr, k1, k2, bs)
    got = product_pruned(
        stats_of(so), layer_rate=lr, global_rate=gr, layer_clusters=k1, global_clusters=k2, batch_size=bs
    )
    assert got == want
    # the float64 option equals the oracle run without fp16 rounding
    want64 = oracle_cprune(so, lr, gr, k1, k2, bs, dtype=np.float64)
    got64 = product_pruned(
        stats_of(so),
        layer_rate=lr,
        global_rate=gr,
        layer_clusters=k1,
        global_clusters=k2,
        batch_size=bs,
        precision="float64",
    )
    assert got64 == want64


def test_cap_equals_reference():
    """One layer of near-identical experts loses most of them globally; the code cuts its global list to
    int(1 // 0.1 * 0.9) = 8 entries (while the cut-off experts are not re-assigned elsewhere)."""
    so = clustered(L=2, E=12, N=40, seed=3)
    so[1] = so[1][:, :1].expand(-1, 12, -1) + 1e-3 * torch.arange(12, dtype=torch.float64).view(1, 12, 1)
    want = oracle_cprune(so, 0.1, 0.5, 4, 3, 8)
    got = product_pruned(
        stats_of(so, top_k=1),
        layer_rate=0.1,
        global_rate=0.5,
        layer_clusters=4,
        global_clusters=3,
        batch_size=8,
    )
    assert got == want and len(want[1]) == 1 + 8  # layer-wise 1 + the capped 8


# ---------------------------------------------------------------------------- real statistics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_stats_equal_reference(dtype):
    from moeprune.arch.tiny import tiny_model
    from moeprune.observe import observe

    model = tiny_model("qwen3_moe", num_experts=16, dtype=dtype)
    ids = torch.randint(3, 256, (32, 12), generator=torch.Generator().manual_seed(0))
    stats = observe(model, list(ids.split(8)), features=("cluster",), progress=False)
    so = {li: stats.get(li, "sentence_out") for li in stats.moe_layers}
    for lr, gr, k1, k2, bs in [(0.1, 0.1, 12, 6, 32), (0.25, 0.25, 4, 3, 8)]:
        want = oracle_cprune(so, lr, gr, k1, k2, bs)
        got = product_pruned(
            stats, layer_rate=lr, global_rate=gr, layer_clusters=k1, global_clusters=k2, batch_size=bs
        )
        assert got == want, (lr, gr, k1, k2, bs)
