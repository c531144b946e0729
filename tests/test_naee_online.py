"""NAEE online (feature ``naee_online``): every candidate keep set's loss accumulated during observe must equal
the loss the cache path computes from a full (every-token) cache of the same run, and plan the same keep sets.

Tolerance 1e-12 relative: both paths compute each token's squared error in float64 from bitwise the same
captured values (expert outputs in the same token chunks, logits, routed output); they differ only in the
order float64 sums are added (per token slice vs per cache chunk), i.e. by a few 1e-16 relative.
"""
from __future__ import annotations

import pytest
import torch

from moeprune.methods.naee import NAEE, keep_sets, reconstruction_loss_fn
from moeprune.methods.target import Target
from moeprune.models import byte_tokenizer
from moeprune.observe import observe, observe_layerwise
from moeprune.observe.calibration import calibrate, skeleton_stats
from moeprune.observe.experts import build_banks
from moeprune.observe.stats import ExpertStats
from moeprune.recipe import CalibrationConfig

TARGET = Target(expert_sparsity=0.5)  # keep 4 of the tiny models' 8 experts: C(8, 4) = 70 candidates
ARCHS = ["qwen3_moe", "mixtral", "olmoe"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches(n=4, b=2, s=16, pad=True):
    g = torch.Generator().manual_seed(11)
    out = [{"input_ids": torch.randint(3, 250, (b, s), generator=g)} for _ in range(n)]
    if pad:  # padding must not count: the last batch's second row has 5 padded positions
        mask = torch.ones(b, s, dtype=torch.long)
        mask[-1, :5] = 0
        out[-1]["attention_mask"] = mask
    return out


def _spec(model, target=TARGET, **kw):
    return NAEE(progress=False, **kw).online_spec(skeleton_stats(model, build_banks(model)), target)


def _online(model, batches, **kw):
    return observe(model, batches, features=("routed", "naee_online"), naee=_spec(model), progress=False, **kw)


def _cache_losses(stats: ExpertStats, li: int, loss: str = "batch_sum") -> torch.Tensor:
    fn = reconstruction_loss_fn(stats, li, loss)
    return torch.tensor([fn(k) for k in keep_sets(8, 4, None, 2)], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_online_losses_and_plan_equal_the_full_cache(arch, dtype, tiny_cache):
    model, batches = tiny_cache(arch, dtype), _batches()
    online = _online(model, batches)
    cache = observe(model, batches, features=("routed", "reconstruction"), progress=False)
    assert cache.meta["recon"]["subsampled"] is None  # a full cache: every token of the same run
    for li in online.moe_layers:
        d = online.layers[li]
        assert d["naee_loss"].shape == (70,) and float(d["naee_batches"]) == 4
        torch.testing.assert_close(d["naee_loss"], _cache_losses(cache, li), rtol=1e-12, atol=0)
        torch.testing.assert_close(d["naee_sq"].sqrt(), _cache_losses(cache, li, "pooled"), rtol=1e-12, atol=0)
        ysq = float(cache.get(li, "recon_target").double().pow(2).sum())
        assert float(d["naee_target_sq"]) == pytest.approx(ysq, rel=1e-12)
    for loss in ("batch_sum", "pooled"):
        p_on, p_ca = NAEE(progress=False, loss=loss).plan(online, TARGET), NAEE(progress=False, loss=loss).plan(cache,
                                                                                                                 TARGET)
        assert p_on.keep() == p_ca.keep()
        assert p_on.meta["recon_path"] == "online" and p_ca.meta["recon_path"] == "cache"
        for li in online.moe_layers:
            assert p_on.meta["recon_loss"][str(li)] == pytest.approx(p_ca.meta["recon_loss"][str(li)], rel=1e-12)
            assert p_on.meta["recon_fidelity"][str(li)] == pytest.approx(p_ca.meta["recon_fidelity"][str(li)],
                                                                         rel=1e-9, abs=1e-12)


def test_state_does_not_grow_with_batches(tiny_cache):
    model = tiny_cache("qwen3_moe")
    sizes = []
    for n in (2, 6):
        st = _online(model, _batches(n=n, pad=False))
        sizes.append({li: {k: tuple(t.shape) for k, t in d.items() if k.startswith("naee")}
                      for li, d in st.layers.items()})
        assert all(float(d["naee_batches"]) == n for d in st.layers.values())
    assert sizes[0] == sizes[1]


def test_layerwise_and_sharded_runs_merge_to_the_same_losses(tiny_cache):
    """Sums of per-batch norms are merge-safe when shards hold whole batches (batch_offset)."""
    model, batches = tiny_cache("mixtral"), _batches(pad=False)
    full = _online(model, batches)
    lw = observe_layerwise(model, batches, features=("routed", "naee_online"), naee=_spec(model), progress=False)
    a = _online(model, batches[:1])
    b = observe(model, batches[1:], features=("routed", "naee_online"), naee=_spec(model), progress=False,
                batch_offset=1)
    merged = a.merge(b)
    for li in full.moe_layers:
        ref = full.get(li, "naee_loss")
        # layer-wise replays each decoder layer on saved activations: float32 round-off of another forward order
        torch.testing.assert_close(lw.get(li, "naee_loss"), ref, rtol=1e-5, atol=0)
        # shards: the same forward per batch; only the float64 order of adding batch norms differs
        torch.testing.assert_close(merged.get(li, "naee_loss"), ref, rtol=1e-12, atol=0)
    assert float(merged.layers[0]["naee_batches"]) == 4


def test_split_batch_is_refused(tiny_cache):
    from moeprune.observe.runner import Observer

    model = tiny_cache("mixtral")
    banks = build_banks(model)
    obs = [Observer(banks, ("routed", "naee_online"), naee=_spec(model)) for _ in range(2)]
    for o in obs:
        o.acc[0]["naee_online"]._open = 3  # both shards saw part of batch 3
    with pytest.raises(ValueError, match="batch 3 is split across two shards"):
        obs[0].merge(obs[1])


def test_plan_refuses_online_stats_of_another_target(tiny_cache):
    st = _online(tiny_cache("mixtral"), _batches(n=1))
    with pytest.raises(ValueError, match=r"keep sets of 4 experts .* this target keeps 6.*recon_mode=cache"):
        NAEE(progress=False).plan(st, Target(expert_sparsity=0.25))


def test_observer_needs_candidates_with_the_feature(tiny_cache):
    with pytest.raises(ValueError, match="naee_online feature and its candidates"):
        observe(tiny_cache("mixtral"), _batches(n=1), features=("naee_online",), progress=False)


# ------------------------------------------------------------------ the path chosen by calibrate
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "t.txt"
    p.write_text("\n\n".join(f"sample {i} about experts, routers and calibration" for i in range(40)))
    return str(p)


def _cfg(data, **kw):
    return CalibrationConfig(dataset=data, num_samples=4, seq_len=16, batch_size=2, **kw)


def test_calibrate_scores_online_with_method_and_target(tiny_cache, data):
    model, tok = tiny_cache("qwen3_moe"), byte_tokenizer()
    st = calibrate(model, tok, _cfg(data), NAEE.needs, method=NAEE(progress=False), target=TARGET, progress=False)
    assert st.meta["recon_path"]["path"] == "online" and "reconstruction" not in st.meta["features"]
    assert st.meta["naee_online"]["1"] == {"keep": 4, "candidates": 70}
    assert not any(n.startswith("recon_") for d in st.layers.values() for n in d)
    cache = calibrate(model, tok, _cfg(data, recon_mode="cache"), NAEE.needs, method=NAEE(progress=False),
                      target=TARGET, progress=False)
    assert cache.meta["recon_path"] == {"path": "cache", "mode": "cache", "reason": "calibration.recon_mode=cache"}
    p_on, p_ca = NAEE(progress=False).plan(st, TARGET), NAEE(progress=False).plan(cache, TARGET)
    assert p_on.keep() == p_ca.keep() and (p_on.meta["recon_path"], p_ca.meta["recon_path"]) == ("online", "cache")
    assert p_on.meta["recon_mode"] == st.meta["recon_path"] and p_ca.meta["recon_mode"]["mode"] == "cache"
    observed = calibrate(model, tok, _cfg(data), NAEE.needs, progress=False)  # moeprune observe: no target
    assert observed.meta["recon_path"]["path"] == "cache"


def test_calibrate_online_mode_says_why_not(tiny_cache, data):
    model, tok = tiny_cache("qwen3_moe"), byte_tokenizer()
    with pytest.raises(ValueError, match="recon_mode=online cannot be used: the method and target are not known"):
        calibrate(model, tok, _cfg(data, recon_mode="online"), NAEE.needs, progress=False)
    with pytest.raises(ValueError, match="recon_mode=online cannot be used: .*above max_combinations=10"):
        calibrate(model, tok, _cfg(data, recon_mode="online"), NAEE.needs, method=NAEE(max_combinations=10),
                  target=TARGET, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gram_rewriting_equals_the_direct_sum(dtype, tiny_cache):
    """The shared maths (per-token Gram matrix) against the direct ``sum_b ||Y_b - sum_e w_e f_e||_F`` from the
    dense routed weights, for every keep set. Tolerance 1e-10 relative: the rewriting adds float64 terms of
    the size of ||Y_t - Y'_t||^2 and of ||f||^2 (H = 64 products each), a few 2^-52 relative each."""
    from moeprune.methods.naee import batch_index, route
    from moeprune.methods.target import layer_meta

    model, batches = tiny_cache("olmoe", dtype), _batches()
    st = observe(model, batches, features=("routed", "reconstruction"), progress=False)
    li = st.moe_layers[0]
    lg, out, y = (st.get(li, n).double() for n in ("recon_logits", "recon_expert_out", "recon_target"))
    bid, nb = batch_index(st, li)
    router = layer_meta(st, "router", li)
    got = _cache_losses(st, li)
    for c, keep in enumerate(keep_sets(8, 4, None, 2)):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[list(keep)] = True
        w = route(lg, mask, 2, router)  # [T, E] dense
        sq = torch.zeros(nb, dtype=torch.float64).index_add_(0, bid, (y - torch.einsum("te,teh->th", w, out))
                                                               .pow(2).sum(-1))
        assert float(got[c]) == pytest.approx(float(sq.sqrt().sum()), rel=1e-10)


@pytest.mark.parametrize("arch", ["deepseek_v3", "longcat_flash", "llama4_text", "qwen2_moe", "gemma4_text"])
def test_online_equals_cache_for_special_routers(arch, tiny_cache):
    """Sigmoid + groups + selection bias (deepseek_v3), identity experts (longcat_flash), gate on the input
    (llama4_text), no renormalisation (qwen2_moe), probability routers (gemma4_text): the general routing path, the same on both sides."""
    model, batches = tiny_cache(arch), _batches(n=2)
    target = Target(expert_sparsity=0.25)
    spec = NAEE(progress=False).online_spec(skeleton_stats(model, build_banks(model)), target)
    online = observe(model, batches, features=("routed", "naee_online"), naee=spec, progress=False)
    cache = observe(model, batches, features=("routed", "reconstruction"), progress=False)
    p_on, p_ca = NAEE(progress=False).plan(online, target), NAEE(progress=False).plan(cache, target)
    assert p_on.keep() == p_ca.keep()
    for li in online.moe_layers:
        assert p_on.meta["recon_loss"][str(li)] == pytest.approx(p_ca.meta["recon_loss"][str(li)], rel=1e-12)
        assert p_on.meta["recon_fidelity"][str(li)] == pytest.approx(p_ca.meta["recon_fidelity"][str(li)],
                                                                     rel=1e-9, abs=1e-12)
