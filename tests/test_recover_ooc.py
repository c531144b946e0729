"""Out-of-core recovery (recover/layerwise.py + rewrite_checkpoint(overrides=...)): the recovered checkpoint
written from a lazy (layer-wise) model equals the in-memory route's bit for bit, the source is untouched,
one decoder layer is materialised at a time, and the work folder is gone after a run."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from moeprune.apply import apply_plan, load_pruned, save_pruned
from moeprune.apply.streaming import rewrite_checkpoint
from moeprune.arch.structure import realign_tensors_
from moeprune.arch.tiny import tiny_model
from moeprune.models import load_layerwise_model
from moeprune.observe.lazy import lazy_layers
from moeprune.recover import recover, with_record
from moeprune.recover.layerwise import recover_out_of_core
from moeprune.testing import example_plan


def _batches(vocab: int) -> list[dict]:
    """Two batches, the second with padding (padding rows are never captured)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, vocab, (2, 24), generator=g)
    b = torch.randint(3, vocab, (2, 16), generator=g)
    mask = torch.ones_like(b)
    mask[1, 10:] = 0
    return [{"input_ids": a, "attention_mask": torch.ones_like(a)}, {"input_ids": b, "attention_mask": mask}]


def _digest(folder) -> dict[str, str]:
    return {p: hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(folder))}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _source(tmp_path, arch, dtype):
    src = tmp_path / "src"
    tiny_model(arch, dtype=dtype).save_pretrained(src)  # mixtral/qwen3_moe: per-expert on-disk keys
    return src


@pytest.mark.filterwarnings("ignore:--streaming .* pad layout")  # the ragged neuron case, expected
@pytest.mark.parametrize("arch,dtype,cfg,neurons", [
    ("mixtral", torch.float32, "compensate", False), ("mixtral", torch.bfloat16, "merge", False),
    ("qwen3_moe", torch.bfloat16, "compensate", False), ("qwen3_moe", torch.float32, "merge", False),
    ("qwen3_moe", torch.bfloat16, {"name": "compensate", "target": "scale", "max_tokens": 40}, False),
    ("qwen3_moe", torch.float32, "compensate", True),  # neuron plan: kept channels sliced from the override
    ("gpt_oss", torch.float32, "compensate", False),  # fused on-disk keys (no reverse conversion)
])
def test_out_of_core_recovery_equals_in_memory_bitwise(tmp_path, arch, dtype, cfg, neurons):
    src = _source(tmp_path, arch, dtype)
    before = _digest(src)
    # the experts kernel of load_layerwise_model's default ("auto" = eager on CPU); grouped_mm rounds
    # differently in bf16, so the next layer's inputs would differ
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, experts_implementation="eager").eval()
    # from_pretrained memory-maps (8-byte aligned tensors; CPU GEMMs may pick other kernels by alignment,
    # seen in bf16 here); the lazy layers are fresh aligned allocations: align the reference the same way
    realign_tensors_(ref)
    plan = example_plan(ref, neurons=neurons)
    batches = _batches(ref.config.vocab_size)
    rec_mem = recover(ref, plan, batches, cfg)
    apply_plan(ref, plan, ragged="pad")  # the streaming rewrite's layout for ragged neuron plans
    save_pruned(ref, tmp_path / "mem", plan=with_record(plan, rec_mem))

    lazy, _ = load_layerwise_model(str(src), dtype=dtype)
    L = lazy_layers(lazy)
    counts: list[int] = []
    load = L.load
    L.load = lambda i: (load(i), counts.append(len(L.resident())))
    rec, overrides = recover_out_of_core(lazy, plan, batches, cfg, src, tmp_path / "work")
    assert counts and max(counts) == 1 and L.resident() == []  # one decoder layer at a time, all released
    assert rec == rec_mem  # same inputs, same fit: the same record (residuals, scales, assignments)
    assert overrides and all(os.path.dirname(f) == str(tmp_path / "work") for f in overrides.values())
    rewrite_checkpoint(src, with_record(plan, rec), tmp_path / "ooc", overrides=overrides, progress=False)
    assert _digest(src) == before  # the source checkpoint is byte-identical

    a, b = load_pruned(tmp_path / "mem"), load_pruned(tmp_path / "ooc")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = batches[0]["input_ids"]
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    saved = json.loads((tmp_path / "ooc" / "pruning_plan.json").read_text())
    assert saved["meta"]["recovery"]["layers"] == json.loads(json.dumps(rec["layers"]))


def test_in_memory_model_is_left_unrecovered(tmp_path):
    """The out-of-core route on a model that is in memory restores each fitted block (the caller's model
    is the unpruned original, e.g. for KL), and writes only the tensors recovery changed (down projections)."""
    src = _source(tmp_path, "qwen3_moe", torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    plan = example_plan(model)
    _, overrides = recover_out_of_core(model, plan, _batches(model.config.vocab_size), "compensate", src,
                                       tmp_path / "work")
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert overrides and all(k.endswith("down_proj.weight") for k in overrides)
    kept = {f"model.layers.{li}.mlp.experts.{e}.down_proj.weight" for li, lp in plan.layers.items() for e in lp.keep}
    assert set(overrides) <= kept


def test_overrides_are_checked_against_the_source(tmp_path):
    src = _source(tmp_path, "qwen3_moe", torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    plan = example_plan(model)
    key = "model.layers.1.mlp.experts.0.down_proj.weight"
    bad = tmp_path / "bad.safetensors"
    save_file({key: torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="must have the source tensor's shape and dtype"):
        rewrite_checkpoint(src, plan, tmp_path / "o1", overrides={key: str(bad)}, progress=False)
    with pytest.raises(ValueError, match="does not hold"):
        rewrite_checkpoint(src, plan, tmp_path / "o2", overrides={"model.nope.weight": str(bad)}, progress=False)


def test_recovery_in_another_dtype_than_the_checkpoint_is_refused(tmp_path):
    src = _source(tmp_path, "qwen3_moe", torch.float32)
    lazy, _ = load_layerwise_model(str(src), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="set dtype: float32"):
        recover_out_of_core(lazy, example_plan(lazy), _batches(lazy.config.vocab_size), "compensate", src,
                            tmp_path / "work")


@pytest.mark.parametrize("layerwise", [True, False])
def test_oneshot_streaming_recovery_equals_structural(tmp_path, layerwise):
    """End to end: layer-wise calibration (or the model in memory) + streaming apply + recovery gives the
    checkpoint of the in-memory structural run; the plan records the recovery; no work folder is left."""
    from moeprune import oneshot

    src = _source(tmp_path, "qwen3_moe", torch.float32)
    before = _digest(src)
    base = {"model": str(src), "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 2}, "eval": {"perplexity": None},
            "report": False}
    mem = oneshot(str(src), recipe=base, recovery="merge", output_dir=tmp_path / "mem", progress=False)
    ooc_recipe = {**base, "calibration": {**base["calibration"], "layerwise": layerwise},
                  "apply": {"mode": "streaming"}}
    ooc = oneshot(str(src), recipe=ooc_recipe, recovery="merge", output_dir=tmp_path / "ooc", progress=False)
    assert _digest(src) == before
    # the structural run's model is memory-mapped by from_pretrained (unaligned tensors, possibly other CPU
    # kernels than the lazy model's aligned ones; the bitwise claim is the test above): decisions equal,
    # residuals and logits to float32 rounding of a few ops
    got, want = ooc.plan.meta["recovery"]["layers"], mem.plan.meta["recovery"]["layers"]
    assert got.keys() == want.keys() and got
    for li in got:
        assert got[li]["assign"] == want[li]["assign"]
        assert got[li]["residual_after"] == pytest.approx(want[li]["residual_after"], rel=1e-4)
    assert json.loads((tmp_path / "ooc" / "plan.json").read_text())["meta"]["recovery"]["name"] == "merge"
    assert not (tmp_path / "ooc" / "recovery-work").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left either
    a, b = load_pruned(tmp_path / "mem" / "model"), load_pruned(tmp_path / "ooc" / "model")
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids), rtol=1e-4, atol=1e-4)


def test_work_folder_is_removed_when_the_rewrite_fails(tmp_path, monkeypatch):
    """A failed run keeps its partial results in <out>.failed, without the recovered-tensor work folder."""
    from moeprune import oneshot
    from moeprune.apply import streaming

    src = _source(tmp_path, "qwen3_moe", torch.float32)
    seen = {}

    def boom(src_dir, plan, out_dir, **kw):
        seen["files"] = sorted({os.path.basename(f) for f in kw["overrides"].values()})
        seen["existed"] = all(os.path.isfile(f) for f in kw["overrides"].values())
        raise OSError("disk full")

    monkeypatch.setattr(streaming, "rewrite_checkpoint", boom)
    recipe = {"model": str(src), "calibration": {"num_samples": 2, "seq_len": 32, "batch_size": 2, "layerwise": True},
              "apply": {"mode": "streaming"}, "eval": {"perplexity": None}, "report": False}
    with pytest.raises(OSError, match="disk full"):
        oneshot(str(src), recipe=recipe, recovery="compensate", output_dir=tmp_path / "run", progress=False)
    assert seen["existed"] and seen["files"]  # the overrides were handed over ...
    failed = tmp_path / "run.failed"
    assert (failed / "plan.json").is_file() and not (failed / "recovery-work").exists()  # ... and removed
    assert json.loads((failed / "plan.json").read_text())["meta"]["recovery"]["name"] == "compensate"
