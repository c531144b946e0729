"""MoECapture: model outputs unchanged, per-slot outputs exact, clean removal, residual and padding."""
from __future__ import annotations

import pytest
import torch

from moeprune.arch.structure import iter_moe_blocks
from moeprune.arch.tiny import ALL_TINY_ARCHS, TINY_ARCHS
from moeprune.observe.capture import _ACTIVE, IMPL_NAME, MoECapture


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


CORE = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe")


def _impls(model, arch: str) -> list[str | None]:
    """The model's default experts implementation (grouped_mm) and eager; batched_mm for the core families
    (same combine code as grouped_mm, kept out of the other 32 to keep the suite fast)."""
    blk = next(iter_moe_blocks(model))[2]
    if not hasattr(type(getattr(blk, "experts", blk)).forward, "__wrapped__"):
        return [None]  # not @use_experts_implementation: its own forward, observed with hooks
    return [model.config.get_text_config()._experts_implementation, "eager"] + (["batched_mm"] if arch in CORE else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
def test_capture_keeps_the_forward_bitwise(arch, dtype, tiny_cache, input_ids):
    """Under observation the logits are BITWISE those of a plain forward with the same experts
    implementation (default grouped_mm, eager; batched_mm for CORE), in fp32, bf16 and fp16; the
    implementation is restored and no hook is left behind.
    Nemotron-H's eager code accumulates in the weights' dtype, which the replay does not reproduce: its
    blocks must fall back to the hooks path (logged), every other block must not."""
    model = tiny_cache(arch, dtype)
    cfg = model.config.get_text_config()
    default, hooks0 = cfg._experts_implementation, _hook_count(model)
    try:
        for impl in _impls(model, arch):
            if impl is not None:
                model.set_experts_implementation(impl)
            with torch.no_grad():
                ref = model(input_ids=input_ids).logits
                with MoECapture(model) as cap:
                    got = model(input_ids=input_ids).logits
            assert torch.equal(got, ref), f"{impl}: max diff {(got - ref).abs().max()}"
            want_fallback = arch == "nemotron_h" and impl == "eager" and dtype != torch.float32
            assert bool(cap.fallbacks) == want_fallback, cap.fallbacks
            assert cfg._experts_implementation == (impl or default)
            assert sorted(cap.records) == [li for li, _, _ in iter_moe_blocks(model)]
    finally:
        if default is not None:
            model.set_experts_implementation(default)
    assert _hook_count(model) == hooks0 and not _ACTIVE


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hooks_path_slots_reconstruct_experts(arch, tiny_cache, input_ids):
    """Hooks path: bit-identical logits, and sum_k w * f equals what the model's own experts computed."""
    model = tiny_cache(arch)
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
        seen, extra = {}, []
        for li, _, blk in iter_moe_blocks(model):
            target = blk if not hasattr(blk, "experts") or type(blk).__name__.startswith("Llama4") else blk.experts
            extra.append(target.register_forward_hook(lambda m, a, o, li=li: seen.__setitem__(li, (a, o))))
        with MoECapture(model, implementation="hooks") as cap:
            same = model(input_ids=input_ids).logits
        for h in extra:
            h.remove()
    assert torch.equal(same, ref)
    for li, (args, out) in seen.items():
        rec = cap.records[li][0]
        blk = rec.bank.block
        routed = rec.out.mul(rec.weights.unsqueeze(-1).to(rec.out.dtype)).sum(1)  # from the per-slot values
        if rec.bank.kind == "jetmoe":  # block output = routed + bias
            want = out.reshape(-1, out.shape[-1]) - blk.bias
        elif rec.bank.kind == "llama4":  # block output = routed + shared expert
            want = out[0].reshape(-1, routed.shape[1]) - blk.shared_expert(args[0].reshape(-1, routed.shape[1]))
        else:
            want = out.reshape(-1, out.shape[-1])
        torch.testing.assert_close(routed, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "dbrx", "llama4_text", "jetmoe", "longcat_flash"])
def test_intermediates_rebuild_outputs(arch, tiny_cache, input_ids):
    """down_proj(inter) (+ bias) reproduces each slot's output: the intermediate layout is right."""
    model = tiny_cache(arch)
    with torch.no_grad(), MoECapture(model, intermediates=True) as cap:
        model(input_ids=input_ids)
    for recs in cap.records.values():
        rec, bank = recs[0], recs[0].bank
        real = rec.idx < bank.num_experts
        ids = rec.idx.clamp(max=bank.num_experts - 1)
        w = torch.stack([bank.down_weight(e) for e in range(bank.num_experts)])  # [E, H, I]
        y = torch.einsum("tkhi,tki->tkh", w[ids], rec.inter)
        if bank.has_bias:
            y = y + bank.experts.down_proj_bias[ids]
        torch.testing.assert_close(y[real], rec.out[real], rtol=1e-4, atol=1e-5)
        assert real.any()


def test_cleanup_on_exception_and_no_nesting(fresh_tiny, input_ids):
    model = fresh_tiny("mixtral")
    hooks0 = _hook_count(model)

    def boom(rec):
        raise KeyError("stop")
    with pytest.raises(KeyError, match="stop"), torch.no_grad(), MoECapture(model, boom, residual=True):
        assert model.config._experts_implementation == IMPL_NAME
        model(input_ids=input_ids)
    assert model.config._experts_implementation == "grouped_mm"
    assert _hook_count(model) == hooks0 and not _ACTIVE
    with MoECapture(model):
        with pytest.raises(RuntimeError, match="already being captured"):
            MoECapture(model).__enter__()
        assert model.config._experts_implementation == IMPL_NAME  # the failed inner capture undid only itself
    assert _hook_count(model) == hooks0 and model.config._experts_implementation == "grouped_mm"
    with pytest.raises(ValueError, match="implementation="):
        MoECapture(model, implementation="fast")


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "dbrx"])
def test_residual_is_the_stream_before_the_block(arch, tiny_cache, input_ids):
    """Pre-norm decoder layer: layer output = residual h + block output (shared experts included)."""
    model = tiny_cache(arch)
    li, name, blk = next(iter_moe_blocks(model))
    layer = model.get_submodule(name.rpartition(".")[0])
    got = {}
    hs = [blk.register_forward_hook(lambda m, a, o: got.__setitem__("block", o[0] if isinstance(o, tuple) else o)),
          layer.register_forward_hook(lambda m, a, o: got.__setitem__("layer", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad(), MoECapture(model, residual=True) as cap:
        model(input_ids=input_ids)
    for h in hs:
        h.remove()
    h_t = cap.records[li][0].residual
    torch.testing.assert_close(h_t + got["block"].reshape(h_t.shape), got["layer"].reshape(h_t.shape))


def test_padding_mask_reaches_records(tiny_cache, input_ids):
    model = tiny_cache("olmoe")
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0
    with torch.no_grad(), MoECapture(model) as cap:
        model(input_ids=input_ids, attention_mask=mask)
        cap.next_index = 5
        model(input_ids=input_ids[:, :4])
    first, second = cap.records[0]
    assert torch.equal(first.valid, mask.reshape(-1).bool()) and first.num_rows == 2
    assert torch.equal(first.rows, torch.arange(2).repeat_interleave(9))
    assert bool(second.valid.all()) and second.batch_index == 5 and first.batch_index == 0


def test_per_slot_values_are_the_models_own(tiny_cache, input_ids):
    """bf16 grouped_mm (the CPU default): the recorded per-slot outputs are bitwise the rows the model's
    grouped_mm computed (re-derived here with torch's grouped_mm on the same sorted rows), and the routed
    output is the block output the model added (no fp32 re-summation)."""
    import torch.nn.functional as F

    model = tiny_cache("qwen3_moe", torch.bfloat16)
    assert model.config._experts_implementation == "grouped_mm"
    seen = {}
    li, _, blk = next(iter_moe_blocks(model))
    h = blk.experts.register_forward_hook(lambda m, a, o: seen.update(call=a, out=o))
    with torch.no_grad(), MoECapture(model) as cap:
        model(input_ids=input_ids)
    h.remove()
    x, idx, _w = seen["call"]
    ex, k = blk.experts, idx.shape[1]
    ids, perm = torch.sort(idx.reshape(-1))
    offs = torch.cumsum(torch.bincount(ids, minlength=ex.num_experts), 0, dtype=torch.int32)
    g, u = F.grouped_mm(x[perm // k], ex.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    f = torch.empty(idx.numel(), x.shape[-1], dtype=x.dtype)
    f[perm] = F.grouped_mm(ex.act_fn(g) * u, ex.down_proj.transpose(-2, -1), offs=offs)
    rec = cap.records[li][0]
    assert rec.out.dtype == torch.bfloat16 and torch.equal(rec.out, f.view(rec.out.shape))
    assert torch.equal(rec.routed, seen["out"].float())


def test_registered_implementations_are_tapped_and_checked_once(fresh_tiny, input_ids, monkeypatch):
    """grouped_mm / batched_mm: the per-slot rows come from the model's own single call (mode TAP; no second
    expert pass), eager replays its combine (REPLAY); the bitwise check runs once per process and key
    (implementation, class, dtypes, width, top-k), not once per MoE layer or per capture."""
    from moeprune.observe import native

    monkeypatch.setattr(native, "MODES", {})
    checked = []
    decide = native.decide
    monkeypatch.setattr(native, "decide", lambda key, *a: checked.append(key) or decide(key, *a))
    model = fresh_tiny("qwen3_moe", torch.bfloat16)
    assert len(list(iter_moe_blocks(model))) == 2
    for impl, want in (("grouped_mm", native.TAP), ("batched_mm", native.TAP), ("eager", native.REPLAY)):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            ref = model(input_ids=input_ids).logits
            for _ in range(2):
                with MoECapture(model) as cap:
                    assert torch.equal(model(input_ids=input_ids).logits, ref), impl
                assert not cap.fallbacks
        assert native.MODES[checked[-1]] == want, impl
    assert len(checked) == 3


def test_tap_records_rows_after_the_modules_post_expert_norm(fresh_tiny, input_ids, monkeypatch):
    """An experts module with its own post-expert norm (``has_post_expert_norm``): the tap applies that norm
    and records its output (first MoE layer, same routing: the norm of the un-normed rows), bitwise the
    per-slot rows of the hooks path, and the forward stays bitwise."""
    from moeprune.observe import native

    monkeypatch.setattr(native, "MODES", {})
    model = fresh_tiny("qwen3_moe", torch.bfloat16)
    blocks = list(iter_moe_blocks(model))
    with torch.no_grad(), MoECapture(model) as plain:
        model(input_ids=input_ids)
    g = torch.Generator().manual_seed(0)
    norms = {}
    for li, _, blk in blocks:
        norm = norms[li] = torch.nn.LayerNorm(model.config.hidden_size, dtype=torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        blk.experts.has_post_expert_norm, blk.experts.post_expert_norm = True, norm
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
        with MoECapture(model) as tap:
            got = model(input_ids=input_ids).logits
        with MoECapture(model, implementation="hooks") as hooks:
            model(input_ids=input_ids)
        first = blocks[0][0]
        want = norms[first](plain.records[first][0].slot_out)
    assert torch.equal(got, ref) and set(native.MODES.values()) == {native.TAP}
    assert torch.equal(tap.records[first][0].slot_out, want)
    for li, recs in tap.records.items():
        assert torch.equal(recs[0].slot_out, hooks.records[li][0].slot_out)
        assert torch.equal(recs[0].slot_pos, hooks.records[li][0].slot_pos)
