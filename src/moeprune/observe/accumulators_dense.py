"""Float64 accumulators of the feature groups that run EVERY expert on the tokens (Pathfinder's paths,
C-Prune's cluster) or cache them (NAEE's reconstruction); the routed-slot groups and the ``Accumulator``
base are in ``accumulators.py``."""
from __future__ import annotations

import torch

from moeprune.observe.accumulators import CHUNK_ELEMENTS, Accumulator, _sel, fp
from moeprune.observe.recon_math import expert_output_chunks
from moeprune.observe.record import MoERecord


def _token_chunks(n: int, per_token: int):
    step = max(1, CHUNK_ELEMENTS // max(per_token, 1))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


class PathsAccumulator(Accumulator):
    """MoE Pathfinder per sample: mean router probability r, mean ||f_j|| over ALL tokens a (every expert
    runs on every token), and the single-expert reconstruction loss ``L_j = ||Y - c_j f_j(X)||_F`` where
    ``Y`` is the routed output and ``c_j`` the gate expert j alone would get (``ExpertBank.solo_gate``);
    ``||Y||_F`` per sample normalises ``L`` (Pathfinder ``l_norm="relative"``)."""

    group = "paths"

    def __init__(self, num_experts: int):
        e = (num_experts,)
        super().__init__({"sample_tokens": (), "sample_prob_mean": e, "sample_norm_mean": e,
                          "sample_recon_loss": e, "sample_out_norm": ()})
        self.num_experts = num_experts

    def update(self, rec: MoERecord) -> None:
        vi, bank, n_rows, e = rec.valid_index, rec.bank, rec.num_rows, self.num_experts
        rows, x, lg = (_sel(t, vi) for t in (rec.rows, rec.x, rec.logits))
        y, c = _sel(rec.routed, vi), bank.solo_gate(lg)  # [T, H], [T, E]
        norm = torch.zeros(n_rows, e, dtype=torch.float64, device=x.device)
        sq = torch.zeros_like(norm)
        for s in _token_chunks(x.shape[0], e * x.shape[1]):
            f = fp(bank.all_outputs(x[s], lg[s]))  # [n, E, H]
            norm.index_add_(0, rows[s], f.norm(dim=-1).double())
            sq.index_add_(0, rows[s], (y[s, None, :] - c[s, :, None] * f).pow(2).sum(-1).double())
        cnt = torch.bincount(rows, minlength=n_rows).double()
        psum = torch.zeros_like(norm).index_add_(0, rows, _sel(rec.probs, vi).double())
        keep = cnt > 0
        n = cnt[keep, None]
        self._cat("sample_tokens", cnt[keep])
        self._cat("sample_prob_mean", psum[keep] / n)
        self._cat("sample_norm_mean", norm[keep] / n)
        self._cat("sample_recon_loss", sq[keep].sqrt())
        ysq = torch.zeros(n_rows, dtype=torch.float64, device=x.device)
        ysq.index_add_(0, rows, fp(y).double().pow(2).sum(-1))
        self._cat("sample_out_norm", ysq[keep].sqrt())


CLUSTER_DTYPES = {"float64": torch.float64, "float16": torch.float16}


class ClusterAccumulator(Accumulator):
    """C-Prune: every expert applied to each sample's mean-pooled (valid tokens) expert input.

    ``dtype="float16"`` stores the rows in float16 (a quarter of the memory): exactly the features C-Prune's
    default ``precision="float16"`` reads (the reference's fp16 cast of the same values), refused by
    ``precision="float64"``; a value beyond float16's range raises instead of storing inf."""

    group = "cluster"

    def __init__(self, num_experts: int, hidden_size: int, dtype: str = "float64"):
        if dtype not in CLUSTER_DTYPES:
            raise ValueError(f"cluster dtype={dtype!r}; choose one of {list(CLUSTER_DTYPES)}")
        super().__init__({"sentence_out": (num_experts, hidden_size)})
        self.dtype = CLUSTER_DTYPES[dtype]

    def _cat(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().to("cpu", torch.float64).to(self.dtype)  # via float64: one rounding, as the method
        if self.dtype == torch.float16 and not bool(torch.isfinite(v).all()):
            raise ValueError("sentence_out exceeds the float16 range (|x| > 65504); calibrate with "
                             "calibration.cluster_dtype: float64")
        self._parts[name].append(v)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> Accumulator:
        """As the base, but rows keep their stored precision."""
        super().load_state_dict(sd)
        self._parts["sentence_out"] = [sd["sentence_out"].cpu()] if sd["sentence_out"].shape[0] else []
        return self

    def update(self, rec: MoERecord) -> None:
        vi = rec.valid_index
        rows, x = _sel(rec.rows, vi), _sel(rec.x, vi)
        sums = torch.zeros(rec.num_rows, x.shape[1], dtype=torch.float64, device=x.device)
        sums.index_add_(0, rows, x.double())
        cnt = torch.bincount(rows, minlength=rec.num_rows)
        keep = cnt > 0
        mean = (sums[keep] / cnt[keep, None].double()).to(x.dtype)  # [N, H]
        self._cat("sentence_out", rec.bank.all_outputs(mean))


def selection_bias(block) -> torch.Tensor:
    """``[E_router]`` float64 sum of a block's selection-only biases (``e_score_correction_bias``,
    ``expert_bias``, ``moe_statics``): they change which experts are chosen, not their weights."""
    from moeprune.arch.structure import get_router, router_weight, selection_biases

    out = torch.zeros(router_weight(get_router(block)).shape[0], dtype=torch.float64)
    for mod, attr, dim in selection_biases(block):
        t = getattr(mod, attr).detach().to("cpu", torch.float64)
        out[: t.shape[dim]] += t.movedim(dim, -1).reshape(-1, t.shape[dim]).sum(0)
    return out


class ReconstructionAccumulator(Accumulator):
    """NAEE: router logits, every expert's output, the routed output and the batch index of cached tokens.

    ``tokens_per_batch=None`` (default, as the reference) caches every valid token; an int caches a seeded
    subsample of that many valid tokens per batch (the choice depends only on seed and batch index, so it is
    the same in the full, layer-wise and distributed runs). Values are stored in float32 (exact for bf16 /
    fp16 / fp32 models; float64 for float64 inputs) to halve memory; NAEE's losses are float64."""

    group = "reconstruction"

    def __init__(self, num_experts: int, router_width: int, hidden_size: int, tokens_per_batch: int | None = None,
                 seed: int = 0):
        shapes = {"recon_logits": (router_width,), "recon_expert_out": (num_experts, hidden_size),
                  "recon_target": (hidden_size,), "recon_batch": (), "selection_bias": (router_width,)}
        if router_width > num_experts:  # LongCat identity experts output their input
            shapes["recon_input"] = (hidden_size,)
        super().__init__(shapes)
        self._state["selection_bias"] = torch.full((router_width,), float("-inf"), dtype=torch.float64)
        if tokens_per_batch is not None and tokens_per_batch < 1:
            raise ValueError(f"tokens_per_batch={tokens_per_batch} must be >= 1 (or None: every token)")
        self.tokens_per_batch, self.seed = tokens_per_batch, seed

    def _cat(self, name: str, value: torch.Tensor) -> None:
        self._parts[name].append(value.detach().to("cpu", torch.int64 if name == "recon_batch" else self._dt))

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> Accumulator:
        """As the base, but cached rows keep their stored precision (float32 / float64 / int64)."""
        super().load_state_dict(sd)
        for n in self._parts:
            self._parts[n] = [sd[n].cpu()] if sd[n].shape[0] else []
        return self

    def update(self, rec: MoERecord) -> None:
        if torch.isneginf(self._state["selection_bias"]).any():  # not read yet: the bias is fixed, read it once,
            # while the layer is live (layer-wise runs onload it only for its forward); "max" merges ranks
            self._state["selection_bias"] = selection_bias(rec.bank.block).to(self._state["selection_bias"].device)
        # float32 holds bf16 / fp16 / fp32 values exactly (fp32 routers of low-precision models included)
        self._dt = torch.float64 if rec.x.dtype == torch.float64 else torch.float32
        vi = rec.valid_index
        if vi is None:
            vi = torch.arange(rec.x.shape[0], device=rec.x.device)
        pick = vi
        if self.tokens_per_batch is not None and vi.numel() > self.tokens_per_batch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rec.batch_index)
            sub = torch.randperm(vi.numel(), generator=gen)[: self.tokens_per_batch].sort().values
            pick = vi[sub.to(vi.device)]
        lg = rec.logits.index_select(0, pick)
        self._cat("recon_logits", lg)
        # the token chunks of the online path (naee_online): both score bitwise the same expert outputs
        outs = [o for _, o in expert_output_chunks(rec.bank, rec.x.index_select(0, pick), fp(lg))]
        self._cat("recon_expert_out", torch.cat(outs) if outs else lg.new_zeros(0, *self.shapes["recon_expert_out"]))
        self._cat("recon_target", rec.routed.index_select(0, pick))
        self._cat("recon_batch", torch.full((pick.numel(),), rec.batch_index, dtype=torch.int64))
        if "recon_input" in self.shapes:
            self._cat("recon_input", rec.x.index_select(0, pick))
