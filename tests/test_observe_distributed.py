"""Data-parallel observe over 2 gloo processes equals the single-process pass."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeprune.observe import ExpertStats, observe, observe_distributed
from moeprune.observe.distributed import shard_bounds

FEATS = ("routed", "transitions", "paths", "cluster", "reconstruction")


def _batches():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 250, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return [{"input_ids": ids, "attention_mask": mask}, torch.randint(3, 250, (1, 6), generator=g),
            torch.randint(3, 250, (2, 5), generator=g)]


def _recon_gb(model) -> float:
    """A NAEE cache bound that fits 2 tokens per batch on ALL batches (7 of 29 tokens); decided per shard it
    would keep 3 per batch on rank 0's two batches: the decision must be global."""
    from moeprune.observe.experts import build_banks
    from moeprune.observe.recon_cache import bytes_per_token

    return 7 * bytes_per_token(build_banks(model)) / 1e9


def _worker(rank: int, port: int, out: str) -> None:
    import transformers

    from moeprune.arch.tiny import tiny_model
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_model("qwen3_moe")
        stats = observe_distributed(model, _batches(), features=FEATS, recon_max_gb=_recon_gb(model), progress=False)
        assert (stats is None) == (rank != 0)
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _observe_1thread(model, batches, **kw):
    """The workers' kernel conditions: fp32 GEMMs split across threads may round differently on some CPUs
    (MKL on non-AVX-512 paths), so the in-process references run with the workers' single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return observe(model, batches, features=FEATS, progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_two_gloo_ranks_equal_single_process(tiny_cache, tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "dist")), nprocs=2, join=True)
    merged = ExpertStats.load(tmp_path / "dist")
    model, batches = tiny_cache("qwen3_moe"), _batches()
    single = _observe_1thread(model, batches, recon_max_gb=_recon_gb(model))
    lo, hi = shard_bounds(len(batches), 1, 2)
    # the ranks decide the token subsample on ALL batches (k=2); each shard alone would pick k=3
    shards = _observe_1thread(model, batches[:lo], recon_tokens=2).merge(
        _observe_1thread(model, batches[lo:hi], batch_offset=lo, recon_tokens=2))
    assert merged.meta["world_size"] == 2 and single.meta["recon"]["tokens_per_batch"] == 2
    for key in ("num_tokens", "num_samples", "router", "num_experts", "expert_params", "recon"):
        assert merged.meta[key] == single.meta[key], key
    assert merged.moe_layers == single.moe_layers
    for li in single.moe_layers:
        assert set(merged[li]) == set(single[li]) == set(shards[li])
        for name, t in single[li].items():
            # the merge is deterministic (rank order, float64): bit for bit the in-process merge of the shards
            assert torch.equal(merged[li][name], shards[li][name]), f"L{li} {name}"
            # vs one pass: per-shard float64 sums re-associated, relative error ~ n_batches * 2^-52
            torch.testing.assert_close(merged[li][name], t, rtol=1e-12, atol=1e-12, msg=f"L{li} {name}")


def test_shards_are_contiguous_and_cover_everything():
    assert [shard_bounds(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [shard_bounds(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    with pytest.raises(RuntimeError, match="init_process_group"):
        observe_distributed(torch.nn.Linear(2, 2), [])


def _naee_spec(model):
    from moeprune.methods.naee import NAEE
    from moeprune.methods.target import Target
    from moeprune.observe.calibration import skeleton_stats
    from moeprune.observe.experts import build_banks

    return NAEE(progress=False).online_spec(skeleton_stats(model, build_banks(model)), Target(expert_sparsity=0.5))


def _worker_naee(rank: int, port: int, out: str) -> None:
    import transformers

    from moeprune.arch.tiny import tiny_model
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_model("qwen3_moe")
        stats = observe_distributed(model, _batches(), features=("routed", "naee_online"), naee=_naee_spec(model),
                                    progress=False)
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_naee_online_merges_across_ranks(tiny_cache, tmp_path):
    """Ranks hold whole batches, so the sum of per-batch norms adds up across ranks."""
    mp.spawn(_worker_naee, args=(_free_port(), str(tmp_path / "dist")), nprocs=2, join=True)
    merged = ExpertStats.load(tmp_path / "dist")
    model = tiny_cache("qwen3_moe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = observe(model, _batches(), features=("routed", "naee_online"), naee=_naee_spec(model),
                         progress=False)
    finally:
        torch.set_num_threads(threads)
    assert merged.meta["naee_online"] == single.meta["naee_online"]
    for li in single.moe_layers:
        assert float(merged[li]["naee_batches"]) == 3
        for name in ("naee_loss", "naee_sq", "naee_full_sq", "naee_target_sq"):
            # float64 sums of the same per-batch values, re-associated across ranks
            torch.testing.assert_close(merged[li][name], single[li][name], rtol=1e-12, atol=1e-12, msg=name)
