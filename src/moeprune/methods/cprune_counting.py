"""C-Prune's per-batch clustering and selection counting, as the released code computes them
(Fighoture/MoE_unsupervised_pruning @65719c5, ``utils/uns_utils.py`` ``cluster_for_prune`` and the selection
loops of ``pruning_mask.py``); the stages and options live in ``cprune.py``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def coefficient(size: int, num_experts: int) -> float:
    """The released code's dynamic selection coefficient (precedence as written there)."""
    p = size / num_experts
    return 0.6 * (math.exp(0.5 - p) - math.exp(p - 0.5) / (math.exp(p - 0.5) + math.exp(0.5 - p))) + 0.5


def prune_order(counts: list[float], keys: list[tuple[int, int]], ties: str) -> list[int]:
    """Positions by increasing count: ``reference`` = stable (lowest key first), else highest key first."""
    if ties == "reference":
        return sorted(range(len(counts)), key=lambda i: counts[i])
    return sorted(range(len(counts)), key=lambda i: (counts[i], -keys[i][0], -keys[i][1]))


def reference_cap(n_layer: int, layer_rate: float) -> int | None:
    """The code's per-layer limit ``int(n_layer // layer_rate * 0.9)`` (None when layer_rate is 0)."""
    return None if layer_rate == 0 else int(n_layer // layer_rate * 0.9)


def cluster(V: np.ndarray, n: int, clustering: str, ward_on_distances: bool) -> tuple[np.ndarray, np.ndarray]:
    """``V [M, D]`` -> (cluster label per row, distance of each row to its cluster's centre)."""
    M = V.shape[0]
    if clustering == "kmeans":
        if n >= M:  # the code's KMeans would raise; every expert its own cluster
            return np.arange(M), np.zeros(M)
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n, random_state=0).fit(V)  # the code's seed, sklearn's default n_init
        X = V.astype(np.float64)  # fp16 - fp64 centre is fp64 in the code too
        dist = np.array([np.linalg.norm(X[i] - km.cluster_centers_[c]) for i, c in enumerate(km.labels_)])
        return km.labels_, dist
    if M < 2:
        return np.ones(M, dtype=int), np.zeros(M)
    from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    with warnings.catch_warnings():  # the square matrix read as observations is the code's (deliberate)
        warnings.simplefilter("ignore", ClusterWarning)
        X = squareform(pdist(V)) if ward_on_distances else V.astype(np.float64)
        labels = fcluster(linkage(X, method="ward"), t=n, criterion="maxclust")
    dist = np.empty(M)
    with np.errstate(over="ignore"):  # fp16 overflow -> inf, as in the code; counted by the caller
        for lab in np.unique(labels):
            members = np.flatnonzero(labels == lab)
            centre = V[members].mean(axis=0)  # fp16 in, fp16 out (fp32 intermediates), as the code
            for i in members:
                dist[i] = float(np.linalg.norm(V[i] - centre))
    return labels, dist


def selection_counts(
    feats: torch.Tensor,
    batches: list[torch.Tensor],
    n_clusters: int,
    rate: float,
    num_experts: int,
    *,
    precision: str,
    clustering: str,
    ward_on_distances: bool,
) -> tuple[list[int], int]:
    """``feats [N, M, H]`` (M candidates) -> (``[M]`` batches that select each candidate, inf distances)."""
    M = feats.shape[1]
    counts, n_inf = [0] * M, 0
    dtype = np.float16 if precision == "float16" else np.float64
    for idx in batches:
        V = feats[idx].permute(1, 0, 2).reshape(M, -1).numpy().astype(dtype)  # [M, B*H]
        labels, dist = cluster(V, n_clusters, clustering, ward_on_distances)
        n_inf += int((~np.isfinite(dist)).sum())
        for lab in np.unique(labels):
            members = np.flatnonzero(labels == lab).tolist()  # ascending id
            if len(members) < 3:
                chosen = members
            else:
                n_sel = int(coefficient(len(members), num_experts) * (1 - rate) * len(members))
                chosen = sorted(members, key=lambda i: dist[i])[:n_sel]  # stable: ties lower id
            for i in chosen:
                counts[i] += 1
    return counts, n_inf
