"""Bad input, as a user types it (issue 9, items 2, 6, 7, 8, 10): each test reproduces the original failure
(fake numbers, silent wrong results, tracebacks, late failures, API spelling) and checks the clear message now."""
from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

from moeprune.cli import build_parser, main
from moeprune.models import byte_tokenizer
from moeprune.plan import PruningPlan

FAST_EVAL = ["--max-tokens", "64", "--seq-len", "32", "--quiet"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from moeprune.arch.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny") / "qwen"
    tiny_model("qwen3_moe").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _plan_file(tmp_path, **edit) -> str:
    d = PruningPlan.from_keep({1: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3, 4, 5]}, 8, model_type="qwen3_moe").to_dict()
    for k, v in edit.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    return str(p)


# ---- item 2: no made-up numbers

@pytest.mark.parametrize("text", ["heldout.txt", "missing_dir/"])
def test_eval_text_typo_is_refused_not_scored(tmp_path, capsys, text):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny:qwen3_moe", "--text", text, "--out", str(out), *FAST_EVAL]) == 2
    err = _err(capsys)
    assert f"--text {text!r} is neither a built-in text" in err and "--text none" in err  # CLI spelling
    assert not out.exists()  # before: ppl of the 12-28 tokens of the path string


def test_recipe_perplexity_typo_fails_in_validate(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"eval": {"perplexity": "data/helduot.txt"}}))
    assert main(["validate", str(r)]) == 2
    assert "eval.perplexity" in _err(capsys)


def test_eval_text_folder_reads_its_files_by_the_one_text_rule(tmp_path):
    """A folder is its files' text (one rule with calibration): same numbers as the file itself."""
    from moeprune.evaluate.perplexity import read_texts, token_stream
    from moeprune.observe.data import load_texts

    folder = tmp_path / "held"
    (folder / "sub").mkdir(parents=True)
    body = "def f(x):\n    return x\n\n\n\nclass A:\n    pass\n"
    (folder / "sub" / "a.py").write_text(body)
    tok = byte_tokenizer()
    assert read_texts(folder) == read_texts(folder / "sub" / "a.py") == load_texts(str(folder), text_column="text")[0]
    # paragraphs joined back with "\n\n" give the file; only the empty paragraph of "\n\n\n\n" is dropped
    assert torch.equal(token_stream(str(folder), tok), token_stream(body.replace("\n\n\n\n", "\n\n"), tok))


def test_eval_base_unrelated_model_is_refused(capsys):
    assert main(["eval", "--model", "tiny:qwen3_moe", "--base", "tiny:mixtral", *FAST_EVAL]) == 2
    err = _err(capsys)
    assert "not the unpruned version" in err and "model_type qwen3_moe vs mixtral" in err


def test_kl_check_comparable_names_tokenizer_difference(tiny_cache):
    from moeprune.evaluate.kl import check_comparable

    m = tiny_cache("qwen3_moe")
    tok, other = byte_tokenizer(), byte_tokenizer()
    check_comparable(m, m, tok, other)  # same model and tokenizer: accepted
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer vocabulary"):
        check_comparable(m, m, tok, other)


# ---- item 6: silent wrong results

def test_all_nan_statistics_are_refused(tmp_path, capsys):
    from _stats_factory import make_stats

    nan = [float("nan")] * 4
    stats = make_stats({1: {"count": nan, "gate_sum": nan, "gate_norm_sum": nan, "tokens": 8.0}}, top_k=1)
    stats.save(tmp_path / "stats")
    assert main(["plan", "--stats", str(tmp_path / "stats"), "--method", "reap", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "NaN" in _err(capsys) and not (tmp_path / "p.json").exists()
    with pytest.raises(ValueError, match="NaN"):  # the API path too (scores checked before allocation)
        from moeprune.methods.registry import get_method
        from moeprune.methods.target import Target

        get_method("frequency").plan(stats, Target(expert_sparsity=0.5))


@pytest.mark.parametrize("edit, match", [
    ({"model_type": None}, "no 'model_type' key"),
    ({"layers": {"1": {"num_experts": 8, "keep": [0, 1, 2, 3, 4, 5]}}}, "disagree with its summary"),
    ({"layers": {"1": {"num_experts": 8, "keep": [0.5, 1, 2, 3, 4, 5]},
                 "2": {"num_experts": 8, "keep": [0, 1, 2, 3, 4, 5]}}}, "0.5 .float. is not an integer id"),
])
def test_edited_plans_are_refused_at_apply(tmp_path, capsys, edit, match):
    plan = _plan_file(tmp_path, **edit)
    assert main(["apply", "--model", "tiny:qwen3_moe", "--plan", plan, "--out", str(tmp_path / "m")]) == 2
    import re

    assert re.search(match, _err(capsys))
    assert not (tmp_path / "m").exists()


def test_plan_without_a_layer_is_logged(tmp_path, caplog):
    """No summary to contradict (a hand-written plan): applying is an explicit, logged choice."""
    d = PruningPlan.from_keep({1: [0, 1, 2, 3, 4, 5]}, 8, model_type="qwen3_moe").to_dict()
    del d["summary"]
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="moeprune"):
        assert main(["apply", "--model", "tiny:qwen3_moe", "--plan", str(tmp_path / "plan.json"),
                     "--out", str(tmp_path / "m")]) == 0
    assert "no entry for MoE layers [2]" in caplog.text


def test_method_option_types_are_checked_at_construction(tmp_path, capsys):
    from moeprune.methods.baselines import Random
    from moeprune.methods.registry import get_method
    from moeprune.methods.unified import REAP

    with pytest.raises(ValueError, match=r"preserve_super_experts='yes_please' \(str\) must be bool"):
        get_method("reap", preserve_super_experts="yes_please")
    with pytest.raises(ValueError, match="must be bool"):
        REAP(preserve_super_experts="yes")  # direct construction, no registry lookup
    with pytest.raises(ValueError, match="must be int"):
        Random(seed=True)
    assert REAP(guard_quantile=1).guard_quantile == 1  # an int is a valid float
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"method": {"name": "reap", "preserve_super_experts": "yes_please"}}))
    assert main(["validate", str(r)]) == 2
    assert "yes_please" in _err(capsys)


# ---- item 7: messages, not tracebacks

@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", "holds no text"),
    ("latin.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
    ("bad.json", b'{"text": "not a list"}', "expected a JSON list"),
])
def test_bad_calibration_files_give_one_line(tmp_path, capsys, name, content, match):
    (tmp_path / name).write_bytes(content)
    assert main(["observe", "--model", "tiny:qwen3_moe", "--data", str(tmp_path / name), "--num-samples", "2",
                 "--seq-len", "16", "--out", str(tmp_path / "stats"), "--quiet"]) == 2
    err = _err(capsys)
    assert match in err and name in err and len(err.strip().splitlines()) == 1


def test_python_sources_and_folders_are_calibration_text(tmp_path):
    from moeprune.observe.data import load_texts

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("import os\n\n\ndef f():\n    return 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("x = 2\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "c.py").write_text("skipped = True\n")
    texts, kind = load_texts(str(tmp_path / "pkg"))
    assert kind == "text" and texts == ["import os", "def f():\n    return 1", "x = 2"]


@pytest.mark.parametrize("payload", [b"", b"\x00" * 40, b"garbage that is not safetensors"])
def test_damaged_stats_file_is_a_message(tmp_path, capsys, payload):
    from _stats_factory import make_stats

    make_stats({1: {"count": [1.0, 2.0, 3.0, 4.0]}}).save(tmp_path / "s")
    (tmp_path / "s" / "stats.safetensors").write_bytes(payload)
    assert main(["plan", "--stats", str(tmp_path / "s"), "--method", "frequency", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "unreadable" in _err(capsys)


def test_truncated_stats_file_is_a_message(tmp_path, capsys):
    from _stats_factory import make_stats

    make_stats({1: {"count": [1.0, 2.0, 3.0, 4.0]}}).save(tmp_path / "s")
    f = tmp_path / "s" / "stats.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    assert main(["plan", "--stats", str(tmp_path / "s"), "--method", "frequency", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "truncated" in _err(capsys)


def test_missing_relative_model_path_is_not_a_hub_lookup(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert main(["eval", "--model", "out/model", *FAST_EVAL]) == 2
    assert "is not a folder here" in _err(capsys)
    plan = _plan_file(tmp_path)
    assert main(["apply", "--model", "out/model", "--plan", plan, "--out", "o", "--streaming"]) == 2
    err = _err(capsys)
    assert "is not a folder here" in err and "Repo id" not in err


@pytest.mark.parametrize("content, match", [("model: [unclosed\n", "not valid YAML"), ("", "is empty"),
                                            ("- a\n- b\n", "must be a YAML mapping")])
def test_bad_recipe_files(tmp_path, capsys, content, match):
    r = tmp_path / "r.yaml"
    r.write_text(content)
    assert main(["validate", str(r)]) == 2
    assert match in _err(capsys)
    assert main(["run", str(r), str(tmp_path / "run")]) == 2  # an empty recipe no longer runs the tiny default
    assert not (tmp_path / "run").exists()


def test_unwritable_output_fails_before_computing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder is needed: unwritable even for root
    assert main(["eval", "--model", "tiny:qwen3_moe", "--out", str(blocker / "eval.json"), *FAST_EVAL]) == 2
    assert "not writable" in _err(capsys)
    assert main(["observe", "--model", "tiny:qwen3_moe", "--out", str(blocker / "stats"), "--quiet"]) == 2
    assert "not writable" in _err(capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_computing(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["eval", "--model", "tiny:qwen3_moe", "--out", str(ro / "eval.json"), *FAST_EVAL]) == 2
        assert "not writable" in _err(capsys)
    finally:
        ro.chmod(0o755)


def test_lm_eval_failure_keeps_perplexity(tmp_path, capsys, monkeypatch):
    """Offline ``--tasks arc_easy``: perplexity is saved with an error entry, exit code 1."""
    from moeprune.evaluate import lmeval

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lmeval, "run_lm_eval", offline)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny:qwen3_moe", "--tasks", "arc_easy", "--out", str(out), *FAST_EVAL]) == 1
    err = _err(capsys)
    assert "lm_eval failed" in err and str(out) in err
    res = json.loads(out.read_text())
    assert res["model"]["ppl"] > 1 and res["model"]["tokens"] > 0
    assert res["error"]["stage"] == "lm_eval" and "ai2_arc" in res["error"]["message"]


# ---- item 8: validate everything up front

@pytest.mark.parametrize("sets, match", [
    (["dtype=int8"], "dtype='int8'"),
    (["device=cuda:7"], "cuda:7"),
    (["apply.max_shard_size=banana"], "max_shard_size='banana' is not a size"),
    (["experts_implementation=fastest"], "experts_implementation='fastest' is unknown"),
    (["calibration.dataset=./calib.jsonl"], "calibration.dataset"),
])
def test_validate_catches_what_run_used_to_find_late(tmp_path, capsys, sets, match):
    if sets == ["device=cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    r = tmp_path / "r.yaml"
    r.write_text("model: tiny:qwen3_moe\n")
    assert main(["validate", str(r), *[x for s in sets for x in ("--set", s)]]) == 2
    assert match in _err(capsys)


# ---- item 10: CLI spelling, quiet, card, one definition per concept

def test_messages_use_cli_spelling(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")
    assert main(["demo", str(tmp_path / "run"), "--quiet"]) == 2
    err = _err(capsys)
    assert "--overwrite" in err and "overwrite=True" not in err
    from moeprune.cli import cli_message

    msg = cli_message(ValueError("x holds a layer-wise run of another model; use an empty checkpoint_dir or "
                                 "resume=False"))
    assert "resume" not in msg and "--out" in msg


def test_quiet_hides_loading_bars(tiny_folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "moeprune.cli", "eval", "--model", tiny_folder, *FAST_EVAL],
                       check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ""  # before: "Loading weights: 100%|...|" from transformers
    assert json.loads(r.stdout)["model"]["ppl"] > 1


def test_model_card_metadata_and_real_path(tmp_path):
    from huggingface_hub import ModelCard

    from moeprune.card import model_card
    from moeprune.recipe import Recipe

    plan = PruningPlan.from_keep({1: [0, 1]}, 4, model_type="qwen3_moe")
    card = ModelCard(model_card(Recipe(model="Qwen/Qwen3-30B-A3B"), plan, model_path="/data/out/model"))
    assert card.data.base_model == "Qwen/Qwen3-30B-A3B" and card.data.pipeline_tag == "text-generation"
    assert "moeprune" in card.data.tags
    assert "from_pretrained('/data/out/model')" in card.text and "PATH" not in card.text
    local = ModelCard(model_card(Recipe(model="tiny:qwen3_moe"), plan, model_path="o/model"))
    assert local.data.base_model is None  # not a hub id: no invalid metadata


def test_tiny_positions_warning_and_demo_fits(tmp_path, caplog):
    from moeprune.models import _WARNED
    from moeprune.recipe import Recipe

    _WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="moeprune"):
        Recipe.model_validate({"model": "tiny:mixtral", "calibration": {"seq_len": 256}, "eval": {"seq_len": 64}})
    assert "seq_len=256 exceeds the 128 positions" in caplog.text
    import json

    from moeprune.builtin_text import toy_moe_dir
    from moeprune.demo import DemoConfig

    # the demo's rows fit the positions of the model it prunes (the packaged toy MoE)
    cfg_path = os.path.join(toy_moe_dir(), "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        assert DemoConfig().seq_len <= json.load(f)["max_position_embeddings"]


def test_cli_defaults_are_the_recipe_defaults():
    from moeprune.observe.data import load_calibration
    from moeprune.recipe import CalibrationConfig, EvalConfig, Recipe

    cal, ev, rec = CalibrationConfig(), EvalConfig(), Recipe()
    o = build_parser().parse_args(["observe", "--model", "m", "--out", "o"])
    assert (o.num_samples, o.seq_len, o.batch_size, o.seed, o.data, o.select, o.text_column) == (
        cal.num_samples, cal.seq_len, cal.batch_size, cal.seed, cal.dataset, cal.select, cal.text_column)
    assert (o.dtype, o.device, o.experts_implementation) == (rec.dtype, rec.device, rec.experts_implementation)
    e = build_parser().parse_args(["eval", "--model", "m"])
    assert (e.text, e.seq_len, e.max_tokens, e.limit) == (ev.perplexity, ev.seq_len, ev.max_tokens, ev.lm_eval_limit)
    sig = inspect.signature(load_calibration).parameters
    assert (sig["num_samples"].default, sig["seq_len"].default, sig["batch_size"].default) == (
        cal.num_samples, cal.seq_len, cal.batch_size)


def test_one_key_value_parser():
    from moeprune.cli_commands import _kv
    from moeprune.recipe import apply_overrides

    items = ["m=10", "tau=0.5", "outliers=false", "aggregate=freq_rank", "ablation=null"]
    assert _kv(items) == apply_overrides({}, items) == {"m": 10, "tau": 0.5, "outliers": False,
                                                         "aggregate": "freq_rank", "ablation": None}
    with pytest.raises(ValueError, match="key.sub=value"):
        _kv(["novalue"])


def test_kl_batches_follow_the_calibration_rule(tiny_cache):
    """Tensor, dict without mask and dict with an all-ones mask are one batch (one ``as_batch`` rule)."""
    from moeprune.evaluate.kl import kl_divergence

    m = tiny_cache("qwen3_moe")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    forms = [ids, {"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    res = [kl_divergence(m, [b], candidate=m, progress=False) for b in forms]
    assert res[0] == res[1] == res[2] and res[0]["tokens"] == 24
    with pytest.raises(TypeError):
        kl_divergence(m, [{"inputs_embeds": torch.zeros(1, 2, 4)}], candidate=m, progress=False)


def test_card_and_plan_say_where_a_checkpoint_loads(caplog):
    """Uniform plans: a plain checkpoint (engines listed); per-layer counts: transformers only, and the plan
    stage warns with the serving-compatible alternative (allocation: uniform)."""
    from moeprune.card import model_card
    from moeprune.recipe import Recipe
    from moeprune.serving import warn_if_transformers_only

    uniform = PruningPlan.from_keep({0: [0, 1], 1: [1, 2]}, 4, model_type="qwen3_moe")
    ragged = PruningPlan.from_keep({0: [0, 1], 1: [0, 1, 2]}, 4, model_type="qwen3_moe")
    card_u = model_card(Recipe(model="tiny:qwen3_moe"), uniform, model_path="o/model")
    card_r = model_card(Recipe(model="tiny:qwen3_moe"), ragged, model_path="o/model")
    assert "## Where it runs" in card_u and "llama.cpp" in card_u and "AutoModelForCausalLM" in card_u
    assert "transformers only" in card_r and "moeprune.load_pruned('o/model')" in card_r
    with caplog.at_level(logging.WARNING, logger="moeprune"):
        assert warn_if_transformers_only(uniform) == []
        assert warn_if_transformers_only(ragged)
    assert "allocation: uniform" in caplog.text
