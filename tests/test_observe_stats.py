"""Every statistic of observe() equals a brute-force computation by hand from the fused weights.

The reference re-derives routing (softmax / renormalisation / DeepSeek-V3 sigmoid + bias + groups +
scaling / GPT-OSS top-k on biased logits) and every expert output f_j(x) per token from the raw
parameters, then accumulates each SCHEMA statistic with explicit Python loops over tokens and slots.
Models run in float64 with the eager experts path so the comparison is tight.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from moeprune.arch.structure import current_top_k, get_experts, get_router, iter_moe_blocks, num_experts_of
from moeprune.observe import FEATURES, SCHEMA, ExpertStats, observe
from moeprune.observe.accumulators import RoutedAccumulator
from moeprune.observe.partials import INDEX, PARTIAL_GROUPS, is_partial, partial_name

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe")
SCALE = {"deepseek_v3": 2.5}
RECON = 3  # tokens per batch kept by the reconstruction feature


def _batches(arch: str, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids2 = torch.randint(3, 250, (1, 6), generator=g)
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids2, "attention_mask": torch.ones_like(ids2)}]


@pytest.fixture(scope="module")
def f64_models():
    from moeprune.arch.tiny import tiny_model
    cache = {}

    def get(arch):
        if arch not in cache:
            m = tiny_model(arch, dtype=torch.float64)
            m.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
            cache[arch] = m
        return cache[arch]
    return get


# ------------------------------------------------------------------------------------------- by hand
def hand_route(arch, block, x):
    """``(logits, p, idx, w)`` for tokens ``x [T, H]`` recomputed from the router's parameters."""
    r, e, k = get_router(block), num_experts_of(block), current_top_k(block)
    if arch == "gpt_oss":
        z = x @ r.weight.T + r.bias
        idx = z.topk(k, -1).indices
        return z, torch.softmax(z, -1), idx, torch.softmax(z.gather(1, idx), -1)
    if arch == "deepseek_v3":
        z = (x.float() @ r.weight.float().T).double()  # the router computes in float32
        s = torch.sigmoid(z)
        choice = s + r.e_score_correction_bias.double()
        per = e // r.num_group
        group = choice.view(-1, r.num_group, per).topk(2, -1).values.sum(-1)
        keep = group.topk(r.topk_group, -1).indices
        allowed = torch.zeros_like(group, dtype=torch.bool).scatter(1, keep, True).repeat_interleave(per, 1)
        idx = choice.masked_fill(~allowed, float("-inf")).topk(k, -1).indices
        w = s.gather(1, idx)
        return z, s, idx, w / (w.sum(-1, keepdim=True) + 1e-20) * r.routed_scaling_factor
    z = x @ r.weight.T
    p = torch.softmax(z, -1)
    top = p.topk(k, -1)
    w = top.values if arch == "qwen2_moe" else top.values / top.values.sum(-1, keepdim=True)
    return z, p, top.indices, w


def hand_expert(arch, ex, j, x):
    """``(f_j(x) [n, H], act [n, I])`` from the fused tensors (GPT-OSS: transposed, interleaved, biased)."""
    if arch == "gpt_oss":
        gu = x @ ex.gate_up_proj[j] + ex.gate_up_proj_bias[j]
        g, u = gu[:, 0::2].clamp(max=ex.limit), gu[:, 1::2].clamp(-ex.limit, ex.limit)
        a = (u + 1) * g * torch.sigmoid(g * ex.alpha)
        return a @ ex.down_proj[j] + ex.down_proj_bias[j], a
    inter = ex.down_proj.shape[-1]
    gu = x @ ex.gate_up_proj[j].T
    a = F.silu(gu[:, :inter]) * gu[:, inter:]
    return a @ ex.down_proj[j].T, a


def down_cols(arch, ex, j):
    return ex.down_proj[j].T if arch == "gpt_oss" else ex.down_proj[j]  # [H, I]


def block_inputs(model, batches):
    """Per batch ``{layer: (x [T, H] block input, h [T, H] residual before post_attention_layernorm)}``."""
    out = []
    for b in batches:
        got, hooks = {}, []
        for li, name, blk in iter_moe_blocks(model):
            layer = model.get_submodule(name.rpartition(".")[0])
            hooks.append(blk.register_forward_pre_hook(
                lambda m, a, li=li, got=got: got.setdefault(li, {}).__setitem__("x", a[0].reshape(-1, a[0].shape[-1]))))
            hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, li=li, got=got: got.setdefault(li, {}).__setitem__("h", a[0].reshape(-1, a[0].shape[-1]))))
        with torch.no_grad():
            model(**b)
        for h in hooks:
            h.remove()
        out.append({li: (d["x"], d["h"]) for li, d in got.items()})
    return out


def reference_stats(arch, model, batches):
    """All SCHEMA statistics by explicit loops over valid tokens and slots (float64)."""
    blocks = {li: blk for li, _, blk in iter_moe_blocks(model)}
    layers = sorted(blocks)
    inputs = block_inputs(model, batches)
    ref = {}
    routes = {}  # (layer, batch) -> idx
    for li in layers:
        blk = blocks[li]
        ex, e = get_experts(blk), num_experts_of(blk)
        s = {n: torch.zeros(e, dtype=torch.float64) for n in
             ("count", "gate_sum", "norm_sum", "norm_sq_sum", "gate_norm_sum", "gate_norm_sq_sum", "max_act",
              "prob_sum", "gate_norm_dir_sum", "easyep_sum")}
        inter = ex.down_proj.shape[1] if arch == "gpt_oss" else ex.down_proj.shape[2]
        s["neuron_proj_sum"] = torch.zeros(e, inter, dtype=torch.float64)
        s["neuron_l2_sum"] = torch.zeros(e, inter, dtype=torch.float64)
        s["tokens"] = torch.tensor(0.0, dtype=torch.float64)
        rows = {n: [] for n in ("sample_tokens", "sample_prob_mean", "sample_norm_mean", "sample_recon_loss",
                                "sentence_out", "recon_logits", "recon_expert_out", "recon_target")}
        for bi, batch in enumerate(batches):
            x, h = inputs[bi][li]
            valid = batch["attention_mask"].reshape(-1).bool()
            seq = batch["input_ids"].shape[1]
            z, p, idx, w = hand_route(arch, blk, x)
            routes[(li, bi)] = idx
            fa = [hand_expert(arch, ex, j, x) for j in range(e)]
            f_all = torch.stack([fj for fj, _ in fa], 1)  # [T, E, H]
            a_all = torch.stack([aj for _, aj in fa], 1)  # [T, E, I]
            y = torch.stack([sum(w[t, q] * f_all[t, idx[t, q]] for q in range(idx.shape[1]))
                             for t in range(x.shape[0])])
            for t in torch.nonzero(valid).reshape(-1).tolist():
                s["tokens"] += 1
                s["prob_sum"] += p[t]
                hr = h[t] + y[t]
                cos_h = torch.dot(h[t], hr) / (h[t].norm() * hr.norm())
                for q in range(idx.shape[1]):
                    j, g = int(idx[t, q]), w[t, q]
                    f = f_all[t, j]
                    n = f.norm()
                    s["count"][j] += 1
                    s["gate_sum"][j] += g
                    s["norm_sum"][j] += n
                    s["norm_sq_sum"][j] += n * n
                    s["gate_norm_sum"][j] += g * n
                    s["gate_norm_sq_sum"][j] += (g * n) ** 2
                    s["max_act"][j] = max(s["max_act"][j], f.abs().max())
                    s["gate_norm_dir_sum"][j] += g * n * (1 - torch.dot(f, x[t]) / (n * x[t].norm()))
                    s["easyep_sum"][j] += g * n * max(1 - cos_h, 0.0)
                    wd = down_cols(arch, ex, j)  # [H, I]
                    s["neuron_proj_sum"][j] += a_all[t, j] * (wd.T @ f) / n
                    s["neuron_l2_sum"][j] += a_all[t, j].abs() * wd.norm(dim=0)
            c = SCALE.get(arch, 1.0)  # gate of an expert left alone (renormalised routers: the scale)
            for r in range(batch["input_ids"].shape[0]):
                toks = [t for t in range(r * seq, (r + 1) * seq) if valid[t]]
                if not toks:
                    continue
                rows["sample_tokens"].append(torch.tensor(float(len(toks))))
                rows["sample_prob_mean"].append(p[toks].mean(0))
                rows["sample_norm_mean"].append(f_all[toks].norm(dim=-1).mean(0))
                rows["sample_recon_loss"].append(torch.stack(
                    [(y[toks] - c * f_all[toks, j]).norm() for j in range(e)]))
                mean_x = x[toks].mean(0, keepdim=True)
                rows["sentence_out"].append(torch.cat([hand_expert(arch, ex, j, mean_x)[0] for j in range(e)]))
            vi = torch.nonzero(valid).reshape(-1)
            gen = torch.Generator().manual_seed(0 * 1_000_003 + bi)  # seed 0, global batch index bi
            pick = vi[torch.randperm(vi.numel(), generator=gen)[:RECON].sort().values]
            rows["recon_logits"].append(z[pick])
            rows["recon_expert_out"].append(f_all[pick])
            rows["recon_target"].append(y[pick])
        for n, v in rows.items():
            s[n] = torch.stack(v) if n in ("sample_tokens", "sample_prob_mean", "sample_norm_mean",
                                           "sample_recon_loss", "sentence_out") else torch.cat(v)
        ref[li] = s
    for a, b in itertools.pairwise(layers):
        tr = torch.zeros(num_experts_of(blocks[a]), num_experts_of(blocks[b]), dtype=torch.float64)
        for bi, batch in enumerate(batches):
            valid = batch["attention_mask"].reshape(-1).bool()
            ia, ib = routes[(a, bi)], routes[(b, bi)]
            for t in torch.nonzero(valid).reshape(-1).tolist():
                for i in ia[t].tolist():
                    for j in ib[t].tolist():
                        tr[i, j] += 1
        ref[a]["transition"] = tr
    return ref


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch", ARCHS)
def test_every_statistic_matches_brute_force(arch, f64_models):
    model = f64_models(arch)
    batches = _batches(arch)
    # naee_online needs its candidates (NAEE.online_spec); tests/test_naee_online.py checks it against the cache
    feats = tuple(f for f in FEATURES if f != "naee_online")
    stats = observe(model, batches, features=feats, progress=False, recon_tokens=RECON)
    ref = reference_stats(arch, model, batches)
    assert stats.moe_layers == sorted(ref)
    for li, d in ref.items():
        expected = {n for n in SCHEMA if SCHEMA[n][0] in feats} - {"recon_input"}
        expected -= {"transition"} if li == stats.moe_layers[-1] else set()
        # partials (default on): each routed / direction statistic also per batch, plus the batch index
        partials = {partial_name(n) for n in expected if SCHEMA[n][0] in PARTIAL_GROUPS} | {INDEX}
        assert set(stats[li]) == expected | partials
        for name, want in d.items():
            got = stats.get(li, name)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want.to(torch.float64), rtol=2e-5, atol=1e-7, msg=f"{arch} L{li} {name}")
    valid = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.meta["num_tokens"] == valid and stats.meta["num_samples"] == 3
    r = stats.meta["router"][str(stats.moe_layers[0])]
    assert r["renormalize"] == (arch != "qwen2_moe") and r["scale"] == pytest.approx(SCALE.get(arch, 1.0))
    assert r["score"] == ("sigmoid" if arch == "deepseek_v3" else "softmax")


def test_meta_describes_model_and_sizes(tiny_cache):
    model = tiny_cache("qwen3_moe")
    stats = observe(model, [torch.randint(3, 250, (1, 8))], progress=False, data={"source": "unit"})
    m = stats.meta
    assert m["model_type"] == "qwen3_moe" and m["moe_layers"] == [1, 2] and m["next_moe_layer"] == {"1": 2}
    assert m["num_experts"] == {"1": 8, "2": 8} and m["top_k"] == {"1": 2, "2": 2}
    assert m["intermediate_size"]["1"] == 32 and m["hidden_size"] == 64 and m["dtype_bytes"] == 4
    per = 2 * 32 * 64 + 64 * 32 + 64  # gate_up + down + router row
    assert m["expert_params"] == {"1": per, "2": per}
    assert m["other_params"] == sum(p.numel() for p in model.parameters()) - 2 * 8 * per
    assert m["features"] == ["routed"] and m["data"] == {"source": "unit"} and m["num_tokens"] == 8


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_padding_is_masked(tiny_cache, arch):
    """A right-padded batch gives the statistics of its rows run one by one without padding."""
    model = tiny_cache(arch)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    feats = ("routed", "paths", "transitions", "direction")
    padded = observe(model, [{"input_ids": ids, "attention_mask": mask}], features=feats, progress=False)
    alone = observe(model, [ids[:1, :5], ids[1:]], features=feats, progress=False)
    for li in padded.moe_layers:
        for name, t in padded[li].items():
            if is_partial(name):  # one batch vs two batches: the per-batch rows differ by construction
                continue
            torch.testing.assert_close(t, alone[li][name], rtol=1e-5, atol=1e-6, msg=name)
    first = padded.moe_layers[0]
    assert padded.meta["num_tokens"] == 14 and float(padded[first]["tokens"]) == 14
    assert padded[first]["count"].sum() == 14 * 2


def test_merge_of_shards_equals_one_pass_and_save_load_roundtrip(tiny_cache, tmp_path):
    model = tiny_cache("mixtral")
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(3, 250, (2, 7), generator=gen) for _ in range(3)]
    feats = ("routed", "transitions", "paths", "cluster", "reconstruction")
    whole = observe(model, batches, features=feats, progress=False, recon_tokens=2)
    a = observe(model, batches[:1], features=feats, progress=False, recon_tokens=2)
    b = observe(model, batches[1:], features=feats, progress=False, recon_tokens=2, batch_offset=1)
    a.merge(b)
    assert a.meta["num_tokens"] == whole.meta["num_tokens"] == 42
    for li in whole.moe_layers:
        for name, t in whole[li].items():
            torch.testing.assert_close(a[li][name], t, rtol=1e-12, atol=1e-12, msg=name)
    back = ExpertStats.load(whole.save(tmp_path / "stats"))
    assert back.meta == whole.meta
    for li in whole.moe_layers:
        assert all(torch.equal(back[li][n], t) for n, t in whole[li].items())


def test_accumulator_state_roundtrip_and_merge(tiny_cache):
    """Accumulators alone: state_dict -> load_state_dict restores; merge adds (counts) and maxes (max_act)."""
    from moeprune.observe.capture import MoECapture

    model = tiny_cache("olmoe")
    one, two, both = RoutedAccumulator(8), RoutedAccumulator(8), RoutedAccumulator(8)

    def feed(*accs):
        return lambda rec: [a.update(rec) for a in accs if rec.layer == 0]
    with torch.no_grad():
        with MoECapture(model, feed(one, both)):
            model(input_ids=torch.randint(3, 250, (1, 6)))
        with MoECapture(model, feed(two, both)):
            model(input_ids=torch.randint(3, 250, (1, 6)))
    restored = RoutedAccumulator(8).load_state_dict(copy.deepcopy(one.state_dict()))
    merged = restored.merge(two).result()
    for n, t in both.result().items():
        torch.testing.assert_close(merged[n], t, msg=n)
    assert float(merged["tokens"]) == 12 and merged["count"].sum() == 24
    with pytest.raises(ValueError, match="expected"):
        RoutedAccumulator(8).load_state_dict({"count": torch.zeros(8)})


def test_gate_on_input_block_semantics(tiny_cache):
    """Llama4: f = expert(s * x) with gate 1, so sum_k g f is the block's routed output."""
    from moeprune.observe.capture import MoECapture

    model = tiny_cache("llama4_text")
    block = model.model.layers[0].feed_forward
    seen = {}
    h = block.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o[0]))
    with torch.no_grad(), MoECapture(model) as cap:
        model(input_ids=torch.randint(3, 250, (2, 5)))
    h.remove()
    rec = cap.records[0][0]
    x = seen["x"].reshape(-1, 64)
    routed = seen["out"].reshape(-1, 64) - block.shared_expert(x)
    assert torch.equal(rec.weights, torch.ones_like(rec.weights))
    torch.testing.assert_close(rec.routed, routed, rtol=1e-5, atol=1e-6)
    stats = observe(model, [torch.randint(3, 250, (2, 5))], progress=False)
    assert stats.meta["router"]["0"]["gate_on_input"] is True and stats[0]["count"].sum() == 10
    torch.testing.assert_close(stats[0]["gate_sum"], stats[0]["count"])


def test_selection_bias_is_the_routers_correction_bias(tiny_cache):
    """NAEE's routing simulation needs the selection-only bias: saved per layer with reconstruction."""
    from moeprune.arch.structure import iter_moe_blocks

    model = tiny_cache("deepseek_v3")
    st = observe(model, [torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(2))],
                 features=("routed", "reconstruction"), progress=False)
    for li, _, block in iter_moe_blocks(model):
        expect = block.gate.e_score_correction_bias.double()
        assert torch.equal(st[li]["selection_bias"], expect) and expect.abs().sum() > 0
    model = tiny_cache("qwen3_moe")  # no selection bias: zeros
    st = observe(model, [torch.randint(3, 250, (1, 8))], features=("routed", "reconstruction"), progress=False)
    assert all(float(st[li]["selection_bias"].abs().sum()) == 0 for li in st.moe_layers)


# ------------------------------------------------------------------------------------------- bf16
CORE = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe")


def own_slots(arch, impl, ex, x, idx):
    """``[T, k, H]``: each slot's un-gated output as the model's implementation computes it in its dtype
    (same kernels on the same rows in the same order: eager per expert in (top-k position, token) order,
    grouped_mm on the rows sorted by expert), re-derived from the fused weights."""
    t, k = idx.shape
    out = x.new_empty(t * k, x.shape[-1])
    if impl == "eager":
        for e in idx.unique().tolist():
            pos, tok = torch.where(idx.T == e)
            rows = x[tok]
            if arch == "gpt_oss":
                y = ex._apply_gate(rows @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]) @ ex.down_proj[e]
                y = y + ex.down_proj_bias[e]
            else:
                g, u = F.linear(rows, ex.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(ex.act_fn(g) * u, ex.down_proj[e])
            out[tok * k + pos] = y
        return out.view(t, k, -1)
    ids, perm = torch.sort(idx.reshape(-1))
    offs = torch.cumsum(torch.bincount(ids, minlength=ex.num_experts), 0, dtype=torch.int32)
    rows = x[perm // k]
    if arch == "gpt_oss":  # transposed weights, per-row biases
        h = ex._apply_gate(F.grouped_mm(rows, ex.gate_up_proj, offs=offs) + ex.gate_up_proj_bias[ids])
        y = F.grouped_mm(h, ex.down_proj, offs=offs) + ex.down_proj_bias[ids]
    else:
        g, u = F.grouped_mm(rows, ex.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = F.grouped_mm(ex.act_fn(g) * u, ex.down_proj.transpose(-2, -1), offs=offs)
    out[perm] = y
    return out.view(t, k, -1)


def hooked_calls(model, batch):
    """Per MoE layer, from plain hooks: router logits, experts call (x, idx, w) and output, residual h."""
    got, hooks = {}, []
    for li, name, blk in iter_moe_blocks(model):
        d = got.setdefault(li, {})
        layer = model.get_submodule(name.rpartition(".")[0])
        hooks += [get_router(blk).register_forward_hook(lambda m, a, o, d=d: d.__setitem__("z", o[0])),
                  get_experts(blk).register_forward_hook(lambda m, a, o, d=d: d.update(call=a, y=o)),
                  layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, d=d: d.__setitem__("h", a[0]))]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return got


def oracle_stats(arch, impl, model, batches):
    """routed / direction / transitions statistics in float64 from per-slot tensors the model computed."""
    blocks = {li: blk for li, _, blk in iter_moe_blocks(model)}
    ref = {li: {n: torch.zeros(num_experts_of(b), dtype=torch.float64) for n in
                ("count", "gate_sum", "norm_sum", "norm_sq_sum", "gate_norm_sum", "gate_norm_sq_sum", "max_act",
                 "prob_sum", "gate_norm_dir_sum", "easyep_sum")} for li, b in blocks.items()}
    layers = sorted(blocks)
    for li in layers[:-1]:
        ref[li]["transition"] = torch.zeros(8, 8, dtype=torch.float64)
    for batch in batches:
        calls, valid = hooked_calls(model, batch), batch["attention_mask"].reshape(-1).bool()
        for li in layers:
            c, s = calls[li], ref[li]
            x, idx, w = (c["call"][0].reshape(-1, 64), c["call"][1], c["call"][2].double())
            f = own_slots(arch, impl, get_experts(blocks[li]), x, idx).double()  # [T, k, H]
            xd, h = x.double(), c["h"].reshape(-1, 64).double()
            hr = h + c["y"].reshape(-1, 64).double()
            z = c["z"].reshape(-1, c["z"].shape[-1]).double()
            p = z.sigmoid() if arch == "deepseek_v3" else z.softmax(-1)
            vt = torch.nonzero(valid).reshape(-1)
            s["prob_sum"] += p[vt].sum(0)
            ids, g, fv = idx[vt].reshape(-1), w[vt].reshape(-1), f[vt].reshape(-1, 64)  # valid slots
            xs, hs, hrs = (t[vt].repeat_interleave(idx.shape[1], 0) for t in (xd, h, hr))
            n = fv.norm(dim=-1)
            cos_x = (fv * xs).sum(-1) / (n * xs.norm(dim=-1))
            cos_h = (hs * hrs).sum(-1) / (hs.norm(dim=-1) * hrs.norm(dim=-1))
            for name, v in (("count", torch.ones_like(g)), ("gate_sum", g), ("norm_sum", n), ("norm_sq_sum", n * n),
                            ("gate_norm_sum", g * n), ("gate_norm_sq_sum", (g * n) ** 2),
                            ("gate_norm_dir_sum", g * n * (1 - cos_x)), ("easyep_sum", g * n * (1 - cos_h).clamp(min=0))):
                s[name].index_add_(0, ids, v)
            s["max_act"].scatter_reduce_(0, ids, fv.abs().amax(-1), "amax")
            if li != layers[-1]:
                nxt = calls[layers[layers.index(li) + 1]]["call"][1][vt]
                for i, j in itertools.product(range(idx.shape[1]), range(nxt.shape[1])):
                    s["transition"].index_put_((idx[vt][:, i], nxt[:, j]), torch.ones(vt.numel(), dtype=torch.float64),
                                               accumulate=True)
    return ref


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("arch", CORE)
def test_bf16_statistics_are_float64_statistics_of_the_bf16_forward(arch, impl, fresh_tiny):
    """bf16 model: observe's statistics equal float64 statistics of the per-slot values the bf16 forward
    really computed (captured by plain hooks and re-derived with the implementation's own kernels).
    Counts and transitions exact; the rest rtol 1e-5: observe takes per-slot norms, cosines and router
    probabilities in float32 (relative error ~1e-7 x small H), sums in float64 like the oracle."""
    model = fresh_tiny(arch, torch.bfloat16)
    model.set_experts_implementation(impl)
    batches = _batches(arch)
    stats = observe(model, batches, features=("routed", "direction", "transitions"), progress=False)
    ref = oracle_stats(arch, impl, model, batches)
    for li, d in ref.items():
        assert torch.equal(stats[li]["count"], d["count"]), f"{arch} L{li} counts"
        for name, want in d.items():
            torch.testing.assert_close(stats[li][name], want, rtol=1e-5, atol=1e-6, msg=f"{arch} L{li} {name}")
    r = stats.meta["router"][str(stats.moe_layers[0])]  # the adapter's recipe, not a bf16-noisy numeric guess
    assert r["renormalize"] == (arch not in ("qwen2_moe", "olmoe")) and r["scale"] == pytest.approx(SCALE.get(arch, 1.0))
    assert r["source"] == "adapter"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_capture_paths_agree_bitwise(dtype, tiny_cache):
    """The fast capture path and the hooks path give identical statistics in half precision (the forward
    is bitwise the plain one, so routing and per-slot values cannot drift)."""
    model = tiny_cache("qwen3_moe", dtype)
    batches = _batches("qwen3_moe")
    feats = ("routed", "direction", "transitions", "reconstruction")
    fast = observe(model, batches, features=feats, progress=False, recon_tokens=RECON)
    hooks = observe(model, batches, features=feats, progress=False, recon_tokens=RECON, implementation="hooks")
    for li in fast.moe_layers:
        for name, t in fast[li].items():
            assert torch.equal(t, hooks[li][name]), f"L{li} {name}"
