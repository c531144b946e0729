"""apply/streaming.py: the out-of-core rewrite writes exactly what save_pruned writes."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
import transformers
from safetensors import safe_open

from moeprune.apply import apply_plan, load_pruned, save_pruned, streaming
from moeprune.apply.streaming import rewrite_checkpoint
from moeprune.arch.structure import iter_moe_blocks
from moeprune.arch.tiny import tiny_model
from moeprune.plan import LayerPlan, PruningPlan

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for k in f.keys():  # noqa: SIM118 (safetensors handle, not a dict)
                    assert k not in out, f"{k} in two shards"
                    out[k] = f.get_tensor(k)
    return out


def _config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _plan(arch: str, layers: list[int], kind: str) -> PruningPlan:
    if arch == "deepseek_v3":  # n_group=2 (experts 0-3 | 4-7): keep groups balanced, >= 2 each
        keeps = [[0, 1, 4, 5], [1, 2, 3, 5, 6, 7], [0, 3, 4, 7]] if kind != "uniform" else [[0, 2, 5, 7]] * 3
    else:
        keeps = (
            [[0, 1, 2, 3, 6, 7], [1, 2, 4, 5, 6], [0, 3, 5, 6]]
            if kind != "uniform"
            else [[1, 2, 4, 6, 7]] * 3
        )
    keep = dict(zip(layers, keeps))
    if kind != "neurons":
        return PruningPlan.from_keep(keep, 8, method="manual", model_type=arch)
    out = {}
    for i, (li, ids) in enumerate(keep.items()):
        if i == 0:  # one width per layer: pure slicing
            neurons = {e: tuple(range(e % 3, 32, 2)) for e in ids}
        else:  # ragged: pad + kill, one expert keeps all channels untouched
            neurons = {
                e: tuple(sorted({(7 * j + e) % 32 for j in range(10 + 3 * n)})) for n, e in enumerate(ids[1:])
            }
        out[li] = LayerPlan(num_experts=8, keep=tuple(ids), neurons=neurons, intermediate_size=32)
    return PruningPlan(layers=out, method="manual", model_type=arch)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    cache = {}

    def get(arch: str, dtype: torch.dtype = torch.float32) -> str:
        if (arch, dtype) not in cache:
            path = root / f"{arch}-{str(dtype)[6:]}"
            tiny_model(arch, dtype=dtype).save_pretrained(path)
            (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
            cache[arch, dtype] = str(path)
        return cache[arch, dtype]

    return get


def _in_memory(src: str, plan: PruningPlan, out) -> tuple[torch.nn.Module, str]:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    apply_plan(model, plan, ragged="pad")  # the layout --streaming writes (buckets: in memory only)
    return model, save_pruned(model, out, plan=plan)


CASES = [
    (a, k)
    for a in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "dbrx")
    for k in ("uniform", "per_layer", "neurons")
]
CASES += [
    ("longcat_flash", "neurons"),  # zero-compute experts kept after the real ones
    ("ernie4_5_moe", "per_layer"),
]  # selection bias moe_statics [1, E] indexed on dim 1


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_streaming_equals_save_pruned(sources, tmp_path, arch, kind):
    src = sources(arch)
    layers = [li for li, _, _ in iter_moe_blocks(tiny_model(arch))]
    plan = _plan(arch, layers, kind)
    pruned, mem = _in_memory(src, plan, tmp_path / "mem")
    out = rewrite_checkpoint(src, plan, tmp_path / "stream", progress=False)
    a, b = _tensors(mem), _tensors(out)
    assert sorted(a) == sorted(b)
    changed = [k for k in a if "experts" in k]
    assert changed, "the plan touched no expert tensor"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _config(mem) == _config(out)
    files = sorted(os.listdir(out))
    assert files == sorted(os.listdir(mem)) and "tokenizer.json" in files  # both copy the source's tokenizer
    per_layer = "moe_pruning" in _config(out) and any(
        k in _config(out)["moe_pruning"] for k in ("num_experts", "intermediate_size", "top_k", "n_group")
    )
    assert per_layer == (kind != "uniform") == ("modeling_pruned_moe.py" in files)
    if per_layer:
        with (
            open(os.path.join(mem, "modeling_pruned_moe.py")) as f1,
            open(os.path.join(out, "modeling_pruned_moe.py")) as f2,
        ):
            assert f1.read() == f2.read()
    assert PruningPlan.load(os.path.join(out, "pruning_plan.json")).to_dict() == plan.to_dict()
    # the rewritten folder loads, with exactly the in-memory pruned weights
    reloaded = (
        transformers.AutoModelForCausalLM.from_pretrained(out) if kind == "uniform" else load_pruned(out)
    )
    sd, ref = reloaded.state_dict(), pruned.state_dict()
    assert sorted(sd) == sorted(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_sharded_bf16_output_and_source(sources, tmp_path):
    src = sources("qwen3_moe", torch.bfloat16)
    layers = [li for li, _, _ in iter_moe_blocks(tiny_model("qwen3_moe"))]
    plan = _plan("qwen3_moe", layers, "per_layer")
    _, mem = _in_memory(src, plan, tmp_path / "mem")
    sharded = rewrite_checkpoint(src, plan, tmp_path / "s1", max_shard_size="60KB", progress=False)
    names = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(names)
    a, b = _tensors(mem), _tensors(sharded)
    assert sorted(a) == sorted(b) and all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert sorted(index["weight_map"]) == sorted(b)
    assert _config(sharded)["dtype"] == "bfloat16" and _config(sharded) == _config(mem)
    # a sharded source streams too (per-expert keys spread over several shards)
    again = rewrite_checkpoint(
        sharded,
        PruningPlan.from_keep(
            {li: list(range(n)) for li, n in plan.kept_counts().items()}, plan.kept_counts()
        ),
        tmp_path / "s2",
        progress=False,
    )
    c = _tensors(again)
    assert sorted(c) == sorted(b) and all(torch.equal(b[k], c[k]) for k in b)
    assert load_pruned(again).model.layers[1].mlp.experts.num_experts == 6


def test_refusals_and_atomicity(sources, tmp_path, monkeypatch):
    src = sources("qwen3_moe")
    plan = PruningPlan.from_keep({1: [0, 1, 2, 3], 2: [4, 5, 6, 7]}, 8)
    with pytest.raises(ValueError, match="source checkpoint"):
        rewrite_checkpoint(src, plan, src, progress=False)
    with pytest.raises(ValueError, match="source checkpoint"):
        rewrite_checkpoint(src, plan, os.path.join(src, "sub"), progress=False)
    with pytest.raises(ValueError, match="source checkpoint"):  # overwrite must never delete the source
        rewrite_checkpoint(src, plan, os.path.dirname(src), overwrite=True, progress=False)
    assert os.path.isfile(os.path.join(src, "model.safetensors"))
    with pytest.raises(ValueError, match="made for 6 experts"):
        rewrite_checkpoint(src, PruningPlan.from_keep({1: [0, 1]}, 6), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="not an MoE layer"):
        rewrite_checkpoint(src, PruningPlan.from_keep({0: [0, 1]}, 8), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    out = rewrite_checkpoint(src, plan, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rewrite_checkpoint(src, plan, out, progress=False)
    before = _tensors(out)

    def boom(spec, f):
        raise RuntimeError("disk full")

    monkeypatch.setattr(streaming, "_chunks", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        rewrite_checkpoint(src, plan, out, overwrite=True, progress=False)
    after = _tensors(out)  # the previous output is intact, no temp folder left behind
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_plan_file_and_bin_source(sources, tmp_path):
    src = sources("mixtral")
    plan = PruningPlan.from_keep({0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, 8)
    plan_path = plan.save(tmp_path / "plan.json")
    out = rewrite_checkpoint(src, plan_path, tmp_path / "out", progress=False)
    assert _config(out)["num_local_experts"] == 4
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in _tensors(out)
    assert "model.layers.0.block_sparse_moe.experts.4.w1.weight" not in _tensors(out)
    binsrc = tmp_path / "bin"
    binsrc.mkdir()
    shutil.copy(os.path.join(src, "config.json"), binsrc / "config.json")
    torch.save({}, binsrc / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        rewrite_checkpoint(binsrc, plan, tmp_path / "o2", progress=False)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_fused_on_disk_source(tmp_path, arch):
    """A checkpoint saved with module names (``save_original_format=False``: fused ``experts.gate_up_proj``
    [E, 2I, H]) is sliced on dim 0 and keeps its layout; it reloads to the in-memory pruned weights."""
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "src", save_original_format=False)
    layers = [li for li, _, _ in iter_moe_blocks(model)]
    plan = _plan(arch, layers, "neurons")
    out = rewrite_checkpoint(tmp_path / "src", plan, tmp_path / "out", progress=False)
    li = layers[0]
    key = f"model.layers.{li}.{'mlp'}.experts.gate_up_proj"
    assert key in _tensors(out) and _tensors(out)[key].shape[0] == len(plan.layers[li].keep)
    apply_plan(model, plan, ragged="pad")
    sd, ref = load_pruned(out).state_dict(), model.state_dict()
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "dbrx"])
def test_ragged_width_rounded_up_like_apply_plan(sources, tmp_path, arch):
    """A widest kept count (12) that is not a multiple of 8 is stored at 16 channels (4 dead) by
    ``apply_plan``; the rewrite uses the same rule (``apply.neurons.neuron_index``) and writes the same."""
    src = sources(arch)
    li = next(iter(iter_moe_blocks(tiny_model(arch))))[0]
    neurons = {0: tuple(range(12)), 2: tuple(range(5, 15)), 5: tuple(range(0, 32, 4)), 7: tuple(range(20, 30))}
    plan = PruningPlan(
        layers={li: LayerPlan(num_experts=8, keep=(0, 2, 5, 7), neurons=neurons, intermediate_size=32)},
        model_type=arch,
    )
    _, mem = _in_memory(src, plan, tmp_path / "mem")
    out = rewrite_checkpoint(src, plan, tmp_path / "stream", progress=False)
    a, b = _tensors(mem), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _config(out)["moe_pruning"]["intermediate_size"][str(li)] == 16
