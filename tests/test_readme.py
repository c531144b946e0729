"""Every code block of README.md runs: ```python blocks execute on a tiny model, every ```bash line that
names a moeprune subcommand parses with the real CLI parser, and the ```yaml block is a valid recipe.

Harness mapping (the README shows real names; the test substitutes tiny stand-ins, nothing else):
* ``"Qwen/Qwen3-30B-A3B"`` -> ``"tiny:qwen3_moe"`` (the built-in tiny random Qwen3-MoE, byte tokenizer);
* ``calib.jsonl`` / ``heldout.txt`` -> small files of the same names in the temporary working directory;
* names the snippets use without defining them: ``model`` (a tiny Qwen3-MoE) and ``batches`` (two token
  batches), the objects a user has at that point;
* ``oneshot``'s recipe is shrunk to keep the test fast (4 calibration samples of 32 tokens, no evaluation):
  ``moeprune.api.resolve_recipe`` is wrapped, the method, target and everything else are the README's.
Each paragraph of a block (code separated by a blank line: "or stage by stage" is an alternative) runs in
its own temporary working directory (``out/`` lands there); names carry over in one namespace.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from moeprune import api
from moeprune.apply.experts import moe_blocks
from moeprune.arch.structure import num_experts_of
from moeprune.arch.tiny import tiny_model
from moeprune.cli import build_parser
from moeprune.recipe import EvalConfig, Recipe

README = Path(__file__).resolve().parents[1] / "README.md"
SUBSTITUTE = {'"Qwen/Qwen3-30B-A3B"': '"tiny:qwen3_moe"'}
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)
TEXT = "The quick brown fox jumps over the lazy dog. " * 8


def blocks(lang: str) -> list[str]:
    found = [body for kind, body in _FENCE.findall(README.read_text()) if kind == lang]
    assert found, f"README.md has no ```{lang} block"
    return found


def _files(folder: Path) -> None:
    (folder / "calib.jsonl").write_text("".join(f'{{"text": "{i}: {TEXT}"}}\n' for i in range(4)))
    (folder / "heldout.txt").write_text(TEXT * 4)


def _fast_recipes(monkeypatch) -> None:
    real = api.resolve_recipe

    def small(recipe):
        r, method = real(recipe)
        cal = r.calibration.model_copy(update={"num_samples": 4, "seq_len": 32})
        return r.model_copy(update={"calibration": cal, "eval": EvalConfig(perplexity=None, kl=False)}), method

    monkeypatch.setattr(api, "resolve_recipe", small)


def test_python_blocks_run(tmp_path, monkeypatch):
    _fast_recipes(monkeypatch)
    g = torch.Generator().manual_seed(0)
    ns = {"__name__": "readme", "model": tiny_model("qwen3_moe"),
          "batches": [torch.randint(3, 250, (2, 12), generator=g) for _ in range(2)]}
    snippets = [p for b in blocks("python") for p in b.split("\n\n") if p.strip()]
    for i, code in enumerate(snippets):
        for old, new in SUBSTITUTE.items():
            code = code.replace(old, new)
        (tmp_path / str(i)).mkdir()
        monkeypatch.chdir(tmp_path / str(i))
        _files(tmp_path / str(i))
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - running the README is the test
    # what the snippets claim: oneshot pruned half the experts of every layer; the staged plan reloads as saved
    assert ns["res"].plan.layers and all(len(lp.keep) == lp.num_experts // 2 for lp in ns["res"].plan.layers.values())
    reloaded = moe_blocks(ns["model"])  # the last line rebinds model to the reloaded pruned model
    assert {li: num_experts_of(b) for li, b in reloaded.items()} == {
        li: len(lp.keep) for li, lp in ns["plan"].layers.items()}


def _moeprune_commands(line: str) -> list[list[str]]:
    """``moeprune ...`` commands of a shell line (split at ``;``, ``&&``, ``|``; comments dropped)."""
    out = []
    for part in re.split(r";|&&|\|\|?", line.split("  #")[0]):
        words = shlex.split(part, comments=True)
        if words and words[0] == "moeprune":
            out.append(words[1:])
    return out


def _bash_commands() -> list[list[str]]:
    return [c for b in blocks("bash") for line in b.splitlines() for c in _moeprune_commands(line)]


def test_bash_blocks_name_subcommands():
    subs = {c[0] for c in _bash_commands()}
    assert {"demo", "run", "observe", "plan", "apply", "eval", "report", "methods", "archs", "validate"} <= subs


@pytest.mark.parametrize("argv", _bash_commands(), ids=lambda a: " ".join(a)[:60])
def test_bash_command_parses(argv):
    args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown option or a missing value
    assert callable(args.fn)


def test_yaml_block_is_a_valid_recipe(tmp_path, monkeypatch):
    (text,) = blocks("yaml")
    data = yaml.safe_load(text)
    monkeypatch.chdir(tmp_path)  # the recipe names local files: validation checks that they exist
    for key in (data["calibration"]["dataset"], data["eval"]["perplexity"]):
        (tmp_path / key).write_text('{"text": "some text"}\n' if key.endswith(".jsonl") else "some text\n")
    recipe = Recipe.model_validate(data)
    assert recipe.model == data["model"] and recipe.method.name == data["method"]["name"]
    assert recipe.target.expert_sparsity == data["target"]["expert_sparsity"]
    (tmp_path / "recipe.yaml").write_text(text)
    assert build_parser().parse_args(["validate", "recipe.yaml"]).fn is not None
    assert Recipe.load("recipe.yaml").model_dump() == recipe.model_dump()


def test_public_api_is_not_shadowed_and_complete():
    import ast
    import importlib

    import moeprune
    import moeprune.observe.capture  # loads the subpackage that used to shadow the function
    import moeprune.observe.stats as stats_module  # `import a.b.c as x` needs the subpackage bound
    from moeprune import observe
    from moeprune.observe.runner import observe as runner_observe

    assert callable(observe) and observe.__call__.__func__ is not None
    assert stats_module.ExpertStats is moeprune.ExpertStats
    for name in moeprune.__all__:
        assert getattr(moeprune, name) is not None, name
    # what type checkers see (the TYPE_CHECKING block) is what runs: same names, same objects
    tree = ast.parse(Path(moeprune.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    declared = {a.asname or a.name: imp.module for imp in block.body for a in imp.names}
    assert set(declared) | {"__version__"} == set(moeprune.__all__)
    for name, module in declared.items():
        if name == "observe":  # the callable subpackage: calling it runs the declared function
            assert moeprune.observe.observe is runner_observe
            continue
        assert getattr(importlib.import_module(module), name) is getattr(moeprune, name), name


def test_observe_called_through_the_package_equals_the_function(tiny_cache, input_ids):
    from moeprune import observe
    from moeprune.observe.runner import observe as runner_observe

    model = tiny_cache("qwen3_moe")
    batch = [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}]
    a, b = observe(model, batch, progress=False), runner_observe(model, batch, progress=False)
    for li in a.moe_layers:
        for name, t in a[li].items():
            assert torch.equal(t, b[li][name]), (li, name)
