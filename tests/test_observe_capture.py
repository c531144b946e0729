"""MoECapture: model outputs unchanged, per-slot outputs exact, clean removal, residual and padding."""
from __future__ import annotations

import pytest
import torch

from moeprune.arch.structure import iter_moe_blocks
from moeprune.arch.tiny import TINY_ARCHS
from moeprune.observe.capture import _ACTIVE, IMPL_NAME, MoECapture


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_outputs_unchanged_and_slots_reconstruct_experts(arch, tiny_cache, input_ids):
    """Both capture paths keep the logits (custom implementation: fp32 round-off; hooks: bit-identical);
    in the hooks path sum_k w * f equals what the model's own experts computed."""
    model = tiny_cache(arch)
    impl = model.config.get_text_config()._experts_implementation
    hooks0 = _hook_count(model)
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
        with MoECapture(model, intermediates=True) as cap:
            got = model(input_ids=input_ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert sorted(cap.records) == [li for li, _, _ in iter_moe_blocks(model)]

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
        routed = rec.routed
        blk = rec.bank.block
        if rec.bank.kind == "jetmoe":  # block output = routed + bias
            want = out.reshape(-1, out.shape[-1]) - blk.bias
        elif rec.bank.kind == "llama4":  # block output = routed + shared expert
            want = out[0].reshape(-1, routed.shape[1]) - blk.shared_expert(args[0].reshape(-1, routed.shape[1]))
        else:
            want = out.reshape(-1, out.shape[-1])
        torch.testing.assert_close(routed, want.float(), rtol=1e-4, atol=2e-5)
    assert model.config.get_text_config()._experts_implementation == impl
    assert _hook_count(model) == hooks0 and not _ACTIVE


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


def test_native_kernel_path_and_bf16(tiny_cache, input_ids, monkeypatch):
    """The accelerator path (the model's grouped_mm on (token, slot) rows) gives the loop path's statistics;
    a bf16 model observes without NaNs and with float64 statistics."""
    from moeprune.observe import capture, observe

    model = tiny_cache("qwen2_moe")
    feats = ("routed", "direction", "paths")
    loop = observe(model, [input_ids], features=feats, progress=False)
    monkeypatch.setattr(capture, "NATIVE_ON_CPU", True)
    native = observe(model, [input_ids], features=feats, progress=False)
    for li in loop.moe_layers:
        for name, t in loop[li].items():
            torch.testing.assert_close(native[li][name], t, rtol=1e-5, atol=1e-5, msg=name)
    monkeypatch.setattr(capture, "NATIVE_ON_CPU", False)
    bf16 = observe(tiny_cache("qwen2_moe", torch.bfloat16), [input_ids], features=feats, progress=False)
    for li in bf16.moe_layers:
        assert all(t.dtype == torch.float64 and bool(torch.isfinite(t).all()) for t in bf16[li].values())
        assert bf16[li]["count"].sum() == input_ids.numel() * 2
        torch.testing.assert_close(bf16[li]["prob_sum"], loop[li]["prob_sum"], rtol=0.05, atol=0.05)
    assert bf16.meta["dtype_bytes"] == 2
