"""End-to-end CLI tests on a tiny model: run, the stage-by-stage chain, errors, listings."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moeprune.cli import main

SMALL = ["calibration.num_samples=8", "calibration.seq_len=64", "calibration.batch_size=4",
         "eval.max_tokens=1500", "eval.seq_len=64"]


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_run_end_to_end_with_lm_eval(tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval extra not installed (pip install 'moeprune[eval]')")
    recipe = {"model": "tiny:mixtral", "method": {"name": "msan"}, "target": {"expert_sparsity": 0.25},
              "eval": {"lm_eval_tasks": ["moeprune_tiny_mc"], "lm_eval_limit": 6}}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(cfg), str(out), "--quiet", *[a for s in SMALL for a in ("--set", s)]]) == 0
    for f in ("recipe.yaml", "plan.json", "eval.json", "README.md", "stats/stats.json", "model/config.json",
              "model/pruning_plan.json", "report/report.md", "report/retention.png"):
        assert (out / f).is_file(), f
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["method"]["name"] == "msan" and resolved["calibration"]["num_samples"] == 8
    ev = json.loads((out / "eval.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert all(len(v["keep"]) == 6 for v in plan["layers"].values())  # 25% of 8 experts removed per layer
    # real lm-eval numbers for both models, in [0, 1]
    for side in ("original", "pruned"):
        acc = ev[side]["lm_eval"]["moeprune_tiny_mc"]["acc,none"]
        assert 0.0 <= acc <= 1.0
    assert ev["pruned"]["kl"] > 0 and ev["original"]["ppl"] > 1
    # the saved model reloads and reproduces the pruned perplexity measured in the run
    from moeprune.api import measure
    from moeprune.models import load_model
    from moeprune.recipe import EvalConfig

    model, tok = load_model(str(out / "model"))
    again = measure(model, tok, EvalConfig(max_tokens=1500, seq_len=64), progress=False)
    assert again["ppl"] == pytest.approx(ev["pruned"]["ppl"], rel=1e-4)


def test_stage_by_stage_chain_and_streaming_equals_in_memory(tmp_path):
    src = tmp_path / "src"
    from moeprune.arch.tiny import tiny_model
    from moeprune.models import byte_tokenizer

    tiny_model("qwen3_moe").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    stats, plan = tmp_path / "stats", tmp_path / "plan.json"
    assert main(["observe", "--model", str(src), "--data", "builtin:stdlib", "--num-samples", "8", "--seq-len", "64",
                 "--method", "reap", "--out", str(stats), "--quiet"]) == 0
    assert main(["plan", "--stats", str(stats), "--method", "reap", "--sparsity", "0.5", "--allocation", "global",
                 "--out", str(plan)]) == 0
    mem, stream = tmp_path / "mem", tmp_path / "stream"
    assert main(["apply", "--model", str(src), "--plan", str(plan), "--out", str(mem)]) == 0
    assert main(["apply", "--model", str(src), "--plan", str(plan), "--out", str(stream), "--streaming"]) == 0
    a, b = _tensors(str(mem)), _tensors(str(stream))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((mem / "config.json").read_text()) == json.loads((stream / "config.json").read_text())
    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", str(mem), "--base", str(src), "--max-tokens", "800", "--seq-len", "64",
                 "--out", str(ev), "--quiet"]) == 0
    res = json.loads(ev.read_text())
    assert res["pruned"]["kl"] > 0 and res["pruned"]["kl_via"] == "two_models"
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    # layer-by-layer onloading from disk gives the same statistics as the full pass
    lw = tmp_path / "stats_lw"
    assert main(["observe", "--model", str(src), "--data", "builtin:stdlib", "--num-samples", "8", "--seq-len", "64",
                 "--method", "reap", "--layerwise", "--out", str(lw), "--quiet"]) == 0
    from moeprune.observe import ExpertStats

    full, layered = ExpertStats.load(stats), ExpertStats.load(lw)
    assert full.moe_layers == layered.moe_layers
    for li in full.moe_layers:
        for name, t in full[li].items():
            torch.testing.assert_close(layered[li][name], t, rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(os.listdir(lw)) == ["stats.json", "stats.safetensors"]  # offload + activations cleaned up
    # the source checkpoint is never a valid output
    assert main(["apply", "--model", str(src), "--plan", str(plan), "--out", str(src), "--overwrite"]) == 2


def test_errors_are_one_line_and_name_the_fix(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": {"name": "no_such_method"}}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no_such_method" in err and "reap" in err  # names the value and the choices
    bad.write_text(yaml.safe_dump({"method": {"name": "reap", "bogus": 1}}))
    assert main(["validate", str(bad)]) == 2
    assert "bogus" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"target": {"expert_sparsity": 0.5, "param_ratio": 0.5}}))
    assert main(["validate", str(bad)]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["plan", "--stats", str(tmp_path / "nope"), "--method", "reap", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "moeprune observe" in capsys.readouterr().err


def test_listings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("pathfinder", "reap", "man", "msan", "cprune", "tenp", "naee", "easyep", "random", "unified"):
        assert f"\n{name} " in "\n" + out, name
    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    for mt in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "dbrx"):
        assert mt in out


def test_run_layerwise_streaming_equals_in_memory_run(tmp_path):
    """Models larger than memory: decoder layers stay on disk while observing, the checkpoint is rewritten
    shard by shard; same statistics, plan and pruned tensors as the in-memory run."""
    from moeprune.arch.tiny import tiny_model
    from moeprune.models import byte_tokenizer

    src = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    common = ["--quiet", "--set", f"model={src}", "--set", "method.name=reap", *[a for s in SMALL for a in ("--set", s)],
              "--set", "report=false"]
    big, mem = tmp_path / "big", tmp_path / "mem"
    assert main(["run", str(big), *common, "--set", "calibration.layerwise=true", "--set", "apply.mode=streaming"]) == 0
    assert main(["run", str(mem), *common]) == 0
    assert json.loads((big / "plan.json").read_text())["layers"] == json.loads((mem / "plan.json").read_text())["layers"]
    a, b = _tensors(str(big / "model")), _tensors(str(mem / "model"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    eb, em = json.loads((big / "eval.json").read_text()), json.loads((mem / "eval.json").read_text())
    assert eb["pruned"]["ppl"] == pytest.approx(em["pruned"]["ppl"], rel=1e-4)
    assert eb["pruned"]["kl"] == pytest.approx(em["pruned"]["kl"], rel=1e-3, abs=1e-6)
    assert not any(p.name.startswith(".offload") for p in big.iterdir())
    # in-place pruning cannot work on a model whose layers live on disk: clear error, nothing half-done
    assert main(["run", str(tmp_path / "bad"), *common, "--set", "calibration.layerwise=true"]) == 2
    assert not (tmp_path / "bad").exists()


def test_observe_under_torchrun_equals_single_process(tmp_path):
    """``torchrun -m moeprune.cli observe``: 2 gloo ranks, rank 0 saves statistics equal to one process's."""
    import subprocess
    import sys

    from moeprune.arch.tiny import tiny_model
    from moeprune.models import byte_tokenizer
    from moeprune.observe import ExpertStats

    src = tmp_path / "src"
    tiny_model("qwen3_moe").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    args = ["observe", "--model", str(src), "--num-samples", "8", "--seq-len", "32", "--batch-size", "2",
            "--features", "routed,paths", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
                    "-m", "moeprune.cli", *args, "--out", str(two)], check=True, env=env, timeout=300,
                   capture_output=True)
    a, b = ExpertStats.load(one), ExpertStats.load(two)
    assert b.meta["world_size"] == 2 and a.moe_layers == b.moe_layers
    for li in a.moe_layers:
        for name, t in a[li].items():
            torch.testing.assert_close(b[li][name], t, rtol=1e-6, atol=1e-6, msg=name)
