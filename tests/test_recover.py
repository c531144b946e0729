"""Recovery after pruning (moeprune.recover): exact least-squares cases, merge of identical experts,
checkpoint round trips, residual reduction, recipe/CLI wiring and errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from moeprune.apply import apply_plan, load_pruned, save_pruned
from moeprune.arch.tiny import tiny_model
from moeprune.observe.experts import build_banks
from moeprune.plan import LayerPlan, PruningPlan
from moeprune.recover import get_recovery, recover
from moeprune.recover.compensate import compensate_layer
from moeprune.recover.routed import pruned_routed, rel_residual, routed
from moeprune.testing import example_plan


def _batches(model, n: int = 2, length: int = 48, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (n, length), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _layer_case(seed: int = 0):
    """A float64 tiny qwen3_moe, its first MoE layer's bank, a plan dropping 2 of 8 experts there, and
    2000 random inputs (about 500 routed tokens per kept expert, far more than its 32 channels)."""
    model = tiny_model("qwen3_moe", dtype=torch.float64, seed=seed)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    bank = next(iter(build_banks(model).values()))
    plan = PruningPlan(layers={bank.layer: LayerPlan(num_experts=8, keep=(0, 1, 2, 4, 5, 7))})
    x = torch.randn(2000, bank.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, bank, plan, x


def test_scale_fit_exact_when_target_is_twice_the_pruned_output():
    model, bank, plan, x = _layer_case()
    pruned = pruned_routed(model, bank, plan, x)
    target = 2.0 * pruned.y  # realisable: every kept expert's scale 2
    rec = compensate_layer(bank, plan, target, pruned, get_recovery("compensate", target="scale", ridge=0.0))
    # float64 normal equations of a 6 x 6 well-conditioned Gram: round-off far below 1e-10
    assert all(v == pytest.approx(2.0, abs=1e-10) for v in rec["scales"].values())
    after = pruned_routed(model, bank, plan, x)
    assert rel_residual(target, after.y) < 1e-24  # float64 round-off only


def test_down_fit_recovers_a_known_down_projection():
    """Targets made with expert 0's down projection := W_true, the others as they are. Expert 0 is first
    in the block-coordinate sweep, so its least-squares fit sees exactly its own change (realisable:
    W_true); the others then see a zero residual and refit to themselves."""
    model, bank, plan, x = _layer_case(seed=1)
    pruned = pruned_routed(model, bank, plan, x)
    e = 0
    w0 = bank.down_weight(e).detach().clone()  # [H, I]
    w_true = w0 + 0.3 * torch.randn(w0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tok, slot = torch.nonzero(pruned.idx == e, as_tuple=True)
    _, h = bank.expert_forward(e, pruned.xin[tok], want_inter=True)
    target = pruned.y.clone()
    target[tok] += pruned.w[tok, slot, None] * (h @ (w_true - w0).T)  # expert e with W_true, others as they are
    others = {k: bank.down_weight(k).detach().clone() for k in plan.layers[bank.layer].keep if k != e}
    compensate_layer(bank, plan, target, pruned, get_recovery("compensate", target="down", ridge=0.0))
    # float64 solve of a 32 x 32 Gram from ~600 tokens (condition number ~10 here): round-off ~1e-14, bound 1e-9
    torch.testing.assert_close(bank.down_weight(e), w_true, atol=1e-9, rtol=0)
    for k, w in others.items():  # their residual was zero: refitted to themselves
        torch.testing.assert_close(bank.down_weight(k), w, atol=1e-9, rtol=0)
    assert rel_residual(target, pruned_routed(model, bank, plan, x).y) < 1e-18


def test_merge_of_identical_experts_equals_the_original_model():
    """Expert 3 := a copy of expert 1 (weights and router row); the plan drops 3. With top-1 routing and
    renormalised weights (gate 1) a token routed to 1 or 3 gets the same f; after merging 3 into 1 (the
    average of identical tensors is the tensor, the router row too) 1 wins wherever 1 or 3 won, so the
    pruned model equals the original. (Top-2 would not: tokens that chose {1, 3} would need the next
    expert after pruning.) Tolerance: the same rows are computed in different batch groupings."""
    model = tiny_model("qwen3_moe", top_k=1)
    bank = next(iter(build_banks(model).values()))
    li = bank.layer
    with torch.no_grad():
        for t in (bank.experts.gate_up_proj, bank.experts.down_proj, bank.router.weight):
            t[3] = t[1]
    ids = _batches(model, n=4, length=64)[0]["input_ids"]
    want = _logits(model, ids)
    plan = PruningPlan(layers={li: LayerPlan(num_experts=8, keep=(0, 1, 2, 4, 5, 6, 7))})
    rec = recover(model, plan, [{"input_ids": ids}], "merge")["layers"][str(li)]
    assert rec["assign"] == {"3": 1} and rec["similarity"]["3"] == pytest.approx(1.0, abs=1e-6)
    assert rec["aligned"] == {"3": False} and rec["residual_after"] < 1e-10
    apply_plan(model, plan)
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)


def _loaded_tiny(tmp_path, dtype):
    """A tiny qwen3_moe loaded as a real checkpoint is (``.to(bf16)`` would also cast the rotary
    ``inv_freq`` buffers, which ``from_pretrained(dtype=bf16)`` keeps in float32)."""
    from transformers import AutoModelForCausalLM

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "src")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", ["compensate", {"name": "compensate", "target": "scale"}, "merge"])
def test_recovered_checkpoint_reloads_bitwise(tmp_path, dtype, cfg):
    from moeprune.arch.structure import realign_tensors_

    model = _loaded_tiny(tmp_path, dtype)
    plan = example_plan(model)
    record = recover(model, plan, _batches(model), cfg)
    apply_plan(model, plan)
    realign_tensors_(model)  # as load_pruned does: mmapped tensors would pick other CPU kernels
    path = save_pruned(model, tmp_path / "m", plan=plan)
    loaded = load_pruned(path)
    assert loaded.dtype == dtype
    ids = _batches(model, n=2, length=32, seed=5)[0]["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)
    assert set(record["layers"]) == {str(li) for li in plan.layers}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["down", "scale"])
def test_compensate_lowers_the_calibration_residual(dtype, target):
    from moeprune.recover.capture import capture_inputs

    model = tiny_model("qwen3_moe", dtype=dtype)
    plan = example_plan(model)
    li = max(plan.layers)
    x = capture_inputs(model, _batches(model), layers=[li])[li]
    with torch.no_grad():
        full = routed(build_banks(model, [li])[li], x).y  # the unpruned target, before recovery
    rec = recover(model, plan, _batches(model), {"name": "compensate", "target": target})
    for layer, r in rec["layers"].items():
        assert r["residual_after"] < r["residual_before"], (layer, r)
    # the record's "after" is what the written (model-dtype) weights compute under the pruned routing
    after = rel_residual(full, pruned_routed(model, build_banks(model, [li])[li], plan, x).y)
    # the record rounds to 8 decimals; the recomputation repeats the same model-dtype forward
    assert rec["layers"][str(li)]["residual_after"] == pytest.approx(after, rel=1e-6)


def test_compensate_neuron_plan_fits_only_kept_channels():
    model = tiny_model("qwen3_moe")
    plan = example_plan(model, neurons=True)
    banks = build_banks(model)
    before = {li: b.experts.down_proj.detach().clone() for li, b in banks.items()}
    rec = recover(model, plan, _batches(model), "compensate")
    for li, lp in plan.layers.items():
        assert rec["layers"][str(li)]["residual_after"] < rec["layers"][str(li)]["residual_before"]
        d = banks[li].experts.down_proj
        for e, ch in (lp.neurons or {}).items():
            dead = sorted(set(range(d.shape[2])) - set(ch))
            assert torch.equal(d[e][:, dead], before[li][e][:, dead])  # removed channels untouched
    with pytest.raises(NotImplementedError, match="use recovery 'compensate' for neuron plans"):
        recover(tiny_model("qwen3_moe"), plan, _batches(model), "merge")


def test_options_and_unsupported_families_fail_clearly():
    with pytest.raises(ValueError, match="target='bogus' must be 'down'"):
        get_recovery("compensate", target="bogus")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['foo'\]"):
        get_recovery("merge", foo=1)
    with pytest.raises(ValueError, match="unknown recovery 'distill'"):
        get_recovery("distill")
    with pytest.raises(ValueError, match="recovery 'merge': option align='yes'"):
        get_recovery("merge", align="yes")
    with pytest.raises(ValueError, match="ridge=-1"):
        get_recovery("compensate", ridge=-1.0)
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="lower recovery.max_tokens or raise recovery.max_gb"):
        recover(model, example_plan(model), _batches(model), {"name": "compensate", "max_gb": 1e-9})
    dbrx = tiny_model("dbrx")
    with pytest.raises(NotImplementedError, match="not supported with the 'dbrx' expert layout"):
        recover(dbrx, example_plan(dbrx), _batches(dbrx), "compensate")
    ds = tiny_model("deepseek_v3")
    with pytest.raises(NotImplementedError, match="selection biases"):
        recover(ds, example_plan(ds), _batches(ds), "merge")


def test_recipe_accepts_recovery_with_streaming(tmp_path):
    """Recovery with apply.mode=streaming runs out of core (recover/layerwise.py, tests/test_recover_ooc.py);
    the recipe used to refuse it (issue #11)."""
    from moeprune.recipe import Recipe

    r = Recipe.model_validate({"recovery": "compensate"})
    assert r.recovery.build().target == "down"
    assert Recipe.model_validate({"recovery": "none"}).recovery is None
    with pytest.raises(ValueError, match="has no option"):
        Recipe.model_validate({"recovery": {"name": "merge", "ridge": 1.0}})
    src = tmp_path / "ckpt"
    src.mkdir()
    assert Recipe.model_validate({"model": str(src), "recovery": "merge",
                                  "apply": {"mode": "streaming"}}).recovery.name == "merge"
    r = Recipe.model_validate({"model": str(src), "recovery": "compensate", "calibration": {"layerwise": True},
                               "apply": {"mode": "streaming"}})
    assert r.recovery.name == "compensate" and r.calibration.layerwise
    with pytest.raises(ValueError, match="has no option"):  # options are still checked before any work
        Recipe.model_validate({"model": str(src), "recovery": {"name": "merge", "ridge": 1.0},
                               "apply": {"mode": "streaming"}})


def test_oneshot_layerwise_in_memory_model_with_recovery():
    """Layer-wise calibration of a model that is in memory anyway (not a checkpoint folder): recovery
    runs on it after planning, and its record is in the returned plan."""
    from moeprune import oneshot

    r = {"calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 4, "layerwise": True},
         "eval": {"perplexity": None}, "report": False}
    res = oneshot("tiny:qwen3_moe", recipe=r, recovery="compensate", progress=False)
    layers = res.plan.meta["recovery"]["layers"]
    assert layers and all(v["residual_after"] < v["residual_before"] for v in layers.values())


def test_cli_run_records_recovery_in_plan_and_card(tmp_path, capsys):
    from moeprune.cli import main

    small = ["calibration.num_samples=4", "calibration.seq_len=32", "calibration.batch_size=4",
             "eval.max_tokens=400", "eval.seq_len=32", "report=false"]
    out = tmp_path / "run"
    args = ["run", str(out), "--quiet", *[a for s in small for a in ("--set", s)]]
    assert main([*args, "--recovery", "compensate", "--recovery-opt", "target=scale"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    rec = plan["meta"]["recovery"]
    assert rec["name"] == "compensate" and rec["target"] == "scale"
    assert all(v["residual_after"] < v["residual_before"] for v in rec["layers"].values())
    saved = json.loads((out / "model" / "pruning_plan.json").read_text())
    assert saved["meta"]["recovery"]["layers"] == rec["layers"]
    assert "recovery after pruning: `compensate`" in (out / "README.md").read_text()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["pruned"]["recovery"] == "compensate" and ev["pruned"]["kl"] > 0
    assert "recovery: compensate" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--recovery-opt", "target=scale"]) == 2
    assert "--recovery-opt target=scale needs --recovery" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--recovery", "compensate", "--recovery-opt", "target=bogus"]) == 2


def test_recover_leaves_an_unpruned_layer_alone():
    model = tiny_model("qwen3_moe")
    ref = copy.deepcopy(model)
    plan = example_plan(model)
    plan = PruningPlan(layers={li: LayerPlan(num_experts=lp.num_experts, keep=tuple(range(lp.num_experts)))
                               for li, lp in plan.layers.items()})
    assert recover(model, plan, _batches(model), "compensate")["layers"] == {}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
