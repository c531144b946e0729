"""Sequential calibration: layer l is observed on the pruned upstream, and the plan is the per-layer decisions.

Oracle: a full-model ``observe`` of the model with the decisions of the MoE layers before ``l`` masked
(``mask_experts``) gives layer ``l``'s statistics; the method's own ``plan`` on them gives its decision.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from moeprune.apply.masking import mask_experts
from moeprune.methods.registry import get_method
from moeprune.methods.target import Target
from moeprune.observe import observe, observe_layerwise
from moeprune.observe.sequential import sequential_plan
from moeprune.observe.stats import ExpertStats
from moeprune.plan import PruningPlan


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding is excluded from every statistic, also in the sequential pass
    return [{"input_ids": ids, "attention_mask": mask}, torch.randint(3, 250, (3, 9), generator=g)]


def _seq(model, name, target, **kw):
    method = get_method(name, **kw)
    stats = observe_layerwise(model, _batches(), features=method.needs, progress=False, sequential=True,
                              method=method, target=target)
    return method, stats, sequential_plan(stats)


def _oracle(model, method, plan):
    """{layer: full-pass stats of the model with the decisions of the earlier MoE layers masked}."""
    out = {}
    for li in plan.layers:
        upstream = PruningPlan(layers={j: lp for j, lp in plan.layers.items() if j < li})
        with mask_experts(model, upstream):
            out[li] = observe(model, _batches(), features=method.needs, progress=False)
    return out


def _restrict(stats: ExpertStats, layers: list[int], rows: dict[int, dict]) -> ExpertStats:
    """``rows`` as stats of only ``layers`` (metadata cut to them)."""
    keep = {str(li) for li in layers}
    meta = {k: ({a: b for a, b in v.items() if a in keep} if isinstance(v, dict) and k != "data" else v)
            for k, v in stats.meta.items()}
    meta["moe_layers"] = list(layers)
    meta["next_moe_layer"] = {a: b for a, b in stats.meta["next_moe_layer"].items()
                              if a in keep and str(b) in keep}
    return ExpertStats(layers={li: rows[li] for li in layers}, meta=meta)


def _assert_rows(a: dict, b: dict, tol: float, where: str):
    assert set(a) >= {k for k in b if k != "transition"}, where
    for name, t in b.items():
        if name == "transition":  # pairs with the next layer, observed with this one unmasked in the oracle
            continue
        torch.testing.assert_close(a[name], t, rtol=tol, atol=tol, msg=f"{where} {name}")


# exact in fp32 and bf16: the layer-wise pass runs the same layer ops on the same inputs as the full pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])  # qwen3_moe: decoder layer 0 is dense
def test_reap_stats_and_decisions_equal_masked_full_pass(arch, dtype, tiny_cache):
    model = tiny_cache(arch, dtype)
    target = Target(expert_sparsity=0.5)
    method, stats, plan = _seq(model, "reap", target)
    one_shot = observe(model, _batches(), features=method.needs, progress=False)
    first = stats.moe_layers[0]
    _assert_rows(stats[first], one_shot[first], 0.0, "first MoE layer == one-shot")
    oracle = _oracle(model, method, plan)
    for li in stats.moe_layers:
        _assert_rows(stats[li], oracle[li][li], 0.0, f"layer {li}")
        want = method.plan(_restrict(oracle[li], [li], oracle[li].layers), target).layers[li]
        assert plan.layers[li].keep == want.keep, li
    assert plan.meta["sequential"] is True and plan.method == "reap"
    assert plan.kept_counts() == {li: 4 for li in stats.moe_layers}
    # per-layer method: the final statistics re-plan to the same decisions (layer l's stats never change after)
    assert method.plan(stats, target).keep() == plan.keep()
    # the pruned upstream matters: some layer after the first sees other statistics than one-shot
    later = stats.moe_layers[1:]
    assert any(not torch.equal(stats[li]["count"], one_shot[li]["count"]) for li in later)


@pytest.mark.parametrize("name,kw,target", [
    ("frequency", {}, Target(expert_sparsity=0.25)),
    ("naee", {}, Target(expert_sparsity=0.5)),
    ("tenp", {}, Target(expert_sparsity=0.5)),
    ("cprune", {}, Target(expert_sparsity=0.5)),
])
def test_per_layer_methods_decide_on_their_layer(name, kw, target, tiny_cache):
    model = tiny_cache("mixtral")
    method, stats, plan = _seq(model, name, target, **kw)
    oracle = _oracle(model, method, plan)
    for li in stats.moe_layers:
        want = method.plan(_restrict(oracle[li], [li], oracle[li].layers), target).layers[li]
        assert plan.layers[li].keep == want.keep, (name, li)
    assert plan.meta["rule"] == "layer l alone"


def test_pathfinder_plans_each_layer_on_all_layers_with_lookahead(tiny_cache):
    """Pathfinder's paths run through all layers: layer l is decided by paths over every layer, layers 0..l
    with the sequential statistics (decisions before each masked), the later ones from a one-shot pass."""
    model = tiny_cache("mixtral")
    target = Target(expert_sparsity=0.5)
    method, stats, plan = _seq(model, "pathfinder", target, max_samples=None, m=100)
    oracle = _oracle(model, method, plan)
    one_shot = observe(model, _batches(), features=method.needs, progress=False)
    layers = stats.moe_layers
    for li in layers:
        _assert_rows(stats[li], oracle[li][li], 0.0, f"layer {li}")
        rows = {j: (oracle[j][j] if j <= li else one_shot[j]) for j in layers}
        want = method.plan(ExpertStats(layers=rows, meta=one_shot.meta), target).layers[li]
        assert plan.layers[li].keep == want.keep, li
    assert plan.meta["rule"] == "all layers, look-ahead after l"
    # m = 100 >= the 8 paths of a one-layer prefix: paths cut at layer 0 would tie every expert (ids 0-3 kept)
    assert plan.layers[layers[0]].keep != (0, 1, 2, 3)


def test_tenp_neuron_plan_masks_channels_and_plans_with_lookahead(tiny_cache):
    """TENP at a parameter budget keeps every expert and narrows some: layer l's channels are zeroed for the
    next layer's inputs, and the decision is TENP on all layers (later ones from a one-shot pass)."""
    model = tiny_cache("mixtral")
    target = Target(param_ratio=0.6)
    method, stats, plan = _seq(model, "tenp", target, channel_multiple=1)
    assert plan.has_neurons and plan.kept_counts() == {li: 8 for li in stats.moe_layers}
    oracle = _oracle(model, method, plan)  # mask_experts zeroes the upstream layers' dropped channels
    one_shot = observe(model, _batches(), features=method.needs, progress=False)
    layers = stats.moe_layers
    for li in layers:
        _assert_rows(stats[li], oracle[li][li], 0.0, f"layer {li}")
        rows = {j: (oracle[j][j] if j <= li else one_shot[j]) for j in layers}
        want = method.plan(ExpertStats(layers=rows, meta=one_shot.meta), target).layers[li]
        assert plan.layers[li].neurons == want.neurons, li
    later = layers[1:]  # narrowing layer 0 changes what the later layers see
    assert any(not torch.equal(stats[li]["neuron_proj_sum"], one_shot[li]["neuron_proj_sum"]) for li in later)


@pytest.mark.parametrize("name,kw,target,match", [
    ("reap", {}, Target(expert_sparsity=0.5, allocation="global"), "allocation: uniform"),
    ("pathfinder", {}, Target(expert_sparsity=0.5, allocation="method"), "allocation: uniform"),
    ("reap", {"preserve_super_experts": True}, Target(expert_sparsity=0.5), "preserve_super_experts=false"),
    ("reap", {}, "memory", "use expert_sparsity or param_ratio"),
])
def test_refused_targets_name_the_fix(name, kw, target, match, tiny_cache):
    model = tiny_cache("mixtral")
    if target == "memory":  # 80 % of the model's bytes: the per-layer count depends on every layer
        target = Target(memory_gb=0.8 * sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9)
    method = get_method(name, **kw)
    with pytest.raises(ValueError, match=match):
        observe_layerwise(model, _batches(), features=method.needs, progress=False, sequential=True,
                          method=method, target=target)


def test_sequential_needs_method_and_target(tiny_cache):
    with pytest.raises(ValueError, match="pass method="):
        observe_layerwise(tiny_cache("mixtral"), _batches(), progress=False, sequential=True)
    with pytest.raises(ValueError, match="sequential=True"):
        observe_layerwise(tiny_cache("mixtral"), _batches(), progress=False, method=get_method("reap"))
    with pytest.raises(ValueError, match="one-shot calibration"):
        sequential_plan(observe(tiny_cache("mixtral"), _batches(), progress=False))


def test_param_ratio_uniform_is_accepted(tiny_cache):
    _, _, plan = _seq(tiny_cache("mixtral"), "reap", Target(param_ratio=0.5))
    assert set(plan.kept_counts().values()) == {4}


@pytest.mark.parametrize("name", ["reap", "pathfinder"])  # pathfinder: cut inside its look-ahead pass
def test_interrupted_sequential_run_resumes_with_its_decisions(name, fresh_tiny, tmp_path):
    model = fresh_tiny("mixtral")
    method, target = get_method(name), Target(expert_sparsity=0.5)
    kw = {"features": method.needs, "progress": False, "sequential": True, "method": method, "target": target}
    whole = observe_layerwise(model, _batches(), **kw)
    h = model.model.layers[2].mlp.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("cut")))
    with pytest.raises(RuntimeError, match="cut"):
        observe_layerwise(model, _batches(), checkpoint_dir=tmp_path, **kw)
    h.remove()
    folder = tmp_path / "lookahead" if name == "pathfinder" else tmp_path
    assert json.loads((folder / "progress.json").read_text())["next_layer"] == 2
    resumed = observe_layerwise(model, _batches(), checkpoint_dir=tmp_path, **kw)
    assert sequential_plan(resumed).to_dict() == sequential_plan(whole).to_dict()
    for li in whole.moe_layers:
        _assert_rows(resumed[li], whole[li], 0.0, f"layer {li}")
    # another method in the same folder is another run: refused, not mixed
    with pytest.raises(ValueError, match="another model/data/features"):
        observe_layerwise(model, _batches(), checkpoint_dir=tmp_path,
                          **{**kw, "method": get_method("frequency")})


def test_cli_observe_sequential_then_apply(tmp_path):
    from moeprune.arch.tiny import tiny_model
    from moeprune.cli import main
    from moeprune.models import byte_tokenizer

    src = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "obs"
    args = ["observe", "--model", str(src), "--data", "builtin:stdlib", "--num-samples", "4", "--seq-len", "32",
            "--method", "reap", "--quiet"]
    assert main([*args, "--sequential", "--sparsity", "0.5", "--out", str(out)]) == 0
    plan = PruningPlan.load(out / "plan.json")
    assert plan.meta["sequential"] is True and set(plan.kept_counts().values()) == {4}
    assert sequential_plan(ExpertStats.load(out)).to_dict() == plan.to_dict()
    assert main(["apply", "--model", str(src), "--plan", str(out / "plan.json"), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_local_experts"] == 4
    assert main([*args, "--sequential", "--out", str(tmp_path / "x")]) == 2  # no budget: one-line error
    assert main([*args, "--sparsity", "0.5", "--out", str(tmp_path / "y")]) == 2  # budget without --sequential


def test_recipe_sequential_runs_oneshot_and_refuses_non_uniform():
    from moeprune.api import oneshot
    from moeprune.recipe import Recipe

    base = {"model": "tiny:mixtral", "method": "reap", "target": {"expert_sparsity": 0.5},
            "calibration": {"dataset": "builtin:stdlib", "num_samples": 4, "seq_len": 32, "sequential": True},
            "eval": {"perplexity": None, "kl": False}}
    res = oneshot("tiny:mixtral", recipe=Recipe.model_validate(base), progress=False)
    assert res.plan.meta["sequential"] is True
    assert res.plan.to_dict() == sequential_plan(res.stats).to_dict()
    with pytest.raises(ValueError, match="target.allocation: uniform"):
        Recipe.model_validate({**base, "target": {"expert_sparsity": 0.5, "allocation": "global"}})


def test_offloaded_model_gives_the_in_memory_sequential_plan(tiny_cache, tmp_path):
    """Decoder layers read lazily from the safetensors: the masked re-run works on the materialised layer."""
    from moeprune.models import load_layerwise_model

    tiny_cache("mixtral").save_pretrained(tmp_path / "ckpt")
    # the reference: from_pretrained's in-memory model with the same experts kernel as the lazy one
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", experts_implementation="eager")
    _, mem, plan = _seq(model, "reap", Target(expert_sparsity=0.5))
    off, _ = load_layerwise_model(str(tmp_path / "ckpt"), experts_implementation="eager")
    _, got, off_plan = _seq(off, "reap", Target(expert_sparsity=0.5))
    assert off_plan.keep() == plan.keep()
    for li in mem.moe_layers:
        _assert_rows(got[li], mem[li], 0.0, f"layer {li}")  # same weights, same layer ops
    assert all(p.device.type == "meta" for p in off.model.layers.parameters())  # released again


def test_sequential_naee_scores_online_and_records_it():
    """run/oneshot know the target before calibration: sequential NAEE scores its keep sets online."""
    from moeprune import oneshot

    res = oneshot("tiny:mixtral", recipe={
        "method": {"name": "naee"}, "target": {"expert_sparsity": 0.5, "allocation": "uniform"},
        "calibration": {"num_samples": 4, "seq_len": 16, "sequential": True},
        "eval": {"perplexity": None, "kl": False}})
    assert res.plan.meta["sequential"] is True
    assert res.plan.meta["recon_path"] == "online"
    assert res.stats.meta["recon_path"]["path"] == "online"
