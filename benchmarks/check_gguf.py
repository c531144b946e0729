"""Integration check: do moeprune's uniform pruned checkpoints convert to GGUF and run in llama.cpp?

For each family: a tiny random model is pruned to half its experts in every MoE layer (uniform, the
serving-compatible form), saved with ``save_pruned``, converted with llama.cpp's own
``convert_hf_to_gguf.py``, loaded in llama.cpp (``llama-cpp-python``, CPU) and its next-token logits
on a fixed token sequence are compared with the transformers model reloaded from the saved folder.
The weights are what is checked: the byte-level toy tokenizer is unknown to the converter, so the
converter's pre-tokenizer lookup is mapped to ``gpt-2`` (``--toy-tokenizer``, on for tiny models);
llama.cpp is fed token ids directly.

Setup (once; builds llama.cpp on CPU, several minutes)::

    python3 -m venv --system-site-packages /tmp/llamavenv
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llamasrc
    tar xzf /tmp/llamasrc/llama_cpp_python-0.3.36.tar.gz -C /tmp/llamasrc
    CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" /tmp/llamavenv/bin/pip install \\
        /tmp/llamasrc/llama_cpp_python-0.3.36.tar.gz
    export MOEPRUNE_LLAMA_CPP=/tmp/llamasrc/llama_cpp_python-0.3.36/vendor/llama.cpp
    export MOEPRUNE_LLAMA_PYTHON=/tmp/llamavenv/bin/python

Run::

    PYTHONPATH=src python benchmarks/check_gguf.py [--archs qwen3_moe olmoe ...] [--outtype f32 bf16]
        [--writer save_pruned|streaming] [--convert-only] [--workdir DIR] [--json results.jsonl]

Exit status 0 iff every requested (family, outtype) converted, loaded and matched.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Families llama.cpp's converter knows; the first four are the ones the slow test requires.
REQUIRED = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe")
EXTRA = ("deepseek_v3", "deepseek_v2", "glm4_moe", "dots1", "ernie4_5_moe", "granitemoe", "granitemoeshared",
         "hunyuan_v1_moe", "gpt_oss", "phimoe", "minimax_m2", "afmoe", "qwen3_next", "llama4_text")
# Tiny-config fields changed for the check (not moeprune output): the tiny qwen3_moe has a dense first
# layer (``mlp_only_layers=[0]``), which released Qwen3-MoE checkpoints do not have and llama.cpp's
# qwen3moe graph does not implement.
# OLMoE and dots1 in llama.cpp assume as many K/V heads as query heads (as their released checkpoints
# have); the tiny configs use grouped K/V heads.
CONFIG_OVERRIDES = {"qwen3_moe": {"mlp_only_layers": []}, "olmoe": {"num_key_value_heads": 4},
                    "dots1": {"num_key_value_heads": 4}}
# A fixed prompt of token ids (ids 0-2 are pad/bos/eos of the tiny configs).
TOKENS = [5, 77, 130, 9, 200, 41, 33, 250, 18, 99, 64, 7]
# Relative tolerance on max |logit difference| / max |logit|: f32 GGUF (f32 KV cache) has the exact
# weights, the rest is float32 op order and llama.cpp's exp/rsqrt kernels (measured 7e-7 on qwen3_moe);
# bf16 rounds every weight and llama.cpp also rounds activations to bf16 before each matmul, against
# transformers' own bf16 rounding (measured 0.012-0.15 on the tiny families): the bf16 bound only catches
# gross errors (a wrong expert or router row gives O(1), 0.7-1.2 measured on mis-routed cases); the exact
# check is f32.
RTOL = {"f32": 1e-4, "bf16": 0.2}

SETUP = ("set MOEPRUNE_LLAMA_CPP to the llama.cpp folder holding convert_hf_to_gguf.py (vendor/llama.cpp of the "
         "llama-cpp-python==0.3.36 sdist) and MOEPRUNE_LLAMA_PYTHON to a python where `import llama_cpp` works; "
         "see the setup steps at the top of benchmarks/check_gguf.py")

# Runs llama.cpp's converter; for the toy tokenizer ("1") every family writes its vocab as a GPT-2 BPE
# vocab (families otherwise look for sentencepiece files or special tokens the toy has not) and the BPE
# pre-tokenizer lookup (a hash of the tokenization of a test string, unknown for a toy) answers "gpt-2".
_CONVERT = r"""
import os, runpy, sys
llama_dir, toy, *argv = sys.argv[1:]
sys.path[:0] = [llama_dir, os.path.join(llama_dir, "gguf-py")]
if toy == "1":
    import conversion
    from conversion import base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    _get = conversion.get_model_class

    def _set_toy_vocab(self):
        self._set_vocab_gpt2()
        # llama.cpp's BPE loader requires a merges list; the byte-level toy has none. One merge of two
        # bytes that never meet in what llama.cpp tokenizes itself (ids are fed directly).
        self.gguf_writer.add_token_merges(["\u0100 \u0101"])

    def _toy_vocab(name, mmproj=False):  # every family reads the toy tokenizer as a GPT-2 BPE vocab
        cls = _get(name, mmproj)
        attrs = {"set_vocab": _set_toy_vocab, "model_arch": cls.model_arch}
        return cls if mmproj else type(cls.__name__, (cls,), attrs)
    conversion.get_model_class = _toy_vocab
script = os.path.join(llama_dir, "convert_hf_to_gguf.py")
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""

# Loads a GGUF in llama.cpp (CPU) and writes the logits of every position of the token ids.
_EVAL = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
gguf, tokens, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
# f32 KV cache (type 0): the default f16 cache would round K/V and hide nothing but add noise.
llm = Llama(model_path=gguf, n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
llm.eval(tokens)
np.save(out, np.asarray(llm.scores[: len(tokens)], dtype=np.float32))
meta = {k: v for k, v in llm.metadata.items() if "expert" in k or k == "general.architecture"}
print("META " + json.dumps(meta))
"""


def llama_dir(path: str | None = None) -> Path:
    """The llama.cpp source folder with ``convert_hf_to_gguf.py`` (argument, else ``$MOEPRUNE_LLAMA_CPP``)."""
    path = path or os.environ.get("MOEPRUNE_LLAMA_CPP")
    if not path or not (Path(path) / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"no llama.cpp converter at {path!r}: {SETUP}")
    return Path(path)


def llama_python(python: str | None = None, module: str = "llama_cpp") -> str:
    """A python that imports ``module`` (argument, else ``$MOEPRUNE_LLAMA_PYTHON``, else this one).
    The converter needs torch and numpy there; the run needs ``llama_cpp``."""
    python = python or os.environ.get("MOEPRUNE_LLAMA_PYTHON") or sys.executable
    ok = subprocess.run([python, "-c", f"import {module}"], check=False, capture_output=True).returncode == 0
    if not ok:
        raise FileNotFoundError(f"{python} cannot import {module}: {SETUP}")
    return python


def half_plan(model):
    """Uniform plan keeping half of the experts of every MoE layer (half of each router group),
    chosen by a fixed random permutation (the weights are random: which experts does not matter)."""
    import torch

    from moeprune.arch.structure import group_info, iter_moe_blocks, num_experts_of
    from moeprune.plan import LayerPlan, PruningPlan

    g = torch.Generator().manual_seed(0)
    layers = {}
    for li, _, block in iter_moe_blocks(model):
        n, (ng, _) = num_experts_of(block), group_info(block)
        size = n // max(ng, 1)
        keep = [q * size + e for q in range(max(ng, 1)) for e in torch.randperm(size, generator=g)[: size // 2].tolist()]
        layers[li] = LayerPlan(num_experts=n, keep=tuple(sorted(keep)))
    return PruningPlan(layers=layers, method="half", model_type=model.config.model_type)


def export_pruned(arch: str, folder: Path, dtype: str = "float32", writer: str = "save_pruned"):
    """Prune ``tiny:<arch>`` to half its experts, write it (``writer``: ``save_pruned`` of the model
    pruned in memory, or ``streaming``: the unpruned checkpoint rewritten by ``rewrite_checkpoint``),
    reload it with plain ``from_pretrained`` and return ``(reloaded model, its logits [T, V] on TOKENS
    as float32 numpy)``."""
    import torch
    import transformers

    from moeprune.apply import apply_plan, rewrite_checkpoint, save_pruned
    from moeprune.arch.tiny import rerandomize_, tiny_config
    from moeprune.models import byte_tokenizer

    torch_dtype = getattr(torch, dtype)
    cfg = tiny_config(arch)
    for key, value in CONFIG_OVERRIDES.get(arch, {}).items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = rerandomize_(model, seed=1).to(torch_dtype)  # as tiny_model(arch) builds it
    plan = half_plan(model)
    if writer == "streaming":
        src = folder.with_name(folder.name + "-src")
        model.save_pretrained(src)
        byte_tokenizer().save_pretrained(src)
        rewrite_checkpoint(src, plan, folder, overwrite=True, progress=False)
    else:
        apply_plan(model, plan)
        save_pruned(model, folder, plan=None, tokenizer=byte_tokenizer(), overwrite=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    with torch.no_grad():
        return reloaded, reloaded(torch.tensor([TOKENS])).logits[0].float().numpy()


def _router_weight(router, n: int):
    """The router's ``[n, H]`` logit weight (some routers wrap it in a sub-module)."""
    for _, p in router.named_parameters():
        if p.dim() == 2 and p.shape[0] == n:
            return p.detach().float().numpy()
    raise AssertionError(f"no [{n}, H] weight in router {type(router).__name__}")


def gguf_contents(gguf: Path, model, llama: Path) -> dict:
    """Check the GGUF against the pruned model without running llama.cpp: ``<arch>.expert_count``
    equals the kept count, every ``*_exps`` tensor has that many experts, and each MoE layer's router
    (``blk.L.ffn_gate_inp.weight``) holds the pruned router's rows in the same order (exact for f32).
    Returns ``{"expert_count": n, "router_max_abs_diff": d}``; raises ``AssertionError`` naming the
    mismatch."""
    import numpy as np

    from moeprune.arch.structure import get_router, iter_moe_blocks, num_experts_of

    sys.path.insert(0, str(llama / "gguf-py"))
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    arch = reader.fields["general.architecture"].contents()
    counts = {num_experts_of(b) for _, _, b in iter_moe_blocks(model)}
    assert len(counts) == 1, f"non-uniform expert counts {counts}"
    kept = counts.pop()
    meta = reader.fields[f"{arch}.expert_count"].contents()
    assert meta == kept, f"{arch}.expert_count={meta}, the pruned model keeps {kept}"
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if "_exps" in name:
            assert int(t.shape[-1]) == kept, f"{name} has {int(t.shape[-1])} experts, expected {kept}"
    diff = 0.0
    for li, _, block in iter_moe_blocks(model):
        router = _router_weight(get_router(block), kept)  # [E_kept, H]
        t = tensors[f"blk.{li}.ffn_gate_inp.weight"]
        raw = np.asarray(t.data)
        if t.tensor_type == Q.BF16:  # stored as raw uint16: the high half of a float32
            data = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t.tensor_type in (Q.F32, Q.F16):
            data = raw.astype(np.float32)
        else:
            raise AssertionError(f"router {t.name} stored as {t.tensor_type.name}, not a float type")
        diff = max(diff, float(np.abs(data.reshape(router.shape) - router).max()))
    return {"expert_count": int(meta), "router_max_abs_diff": diff}


def convert(folder: Path, gguf: Path, outtype: str, llama: Path, python: str, toy: bool = True) -> str:
    """Run llama.cpp's converter; returns its log; raises ``RuntimeError`` with the log tail on failure."""
    cmd = [python, "-c", _CONVERT, str(llama), "1" if toy else "0", str(folder), "--outfile", str(gguf),
           "--outtype", outtype]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0 or not gguf.is_file():
        raise RuntimeError("convert failed: " + (res.stderr or res.stdout)[-1500:])
    return res.stderr


def llama_logits(gguf: Path, python: str):
    """``(logits [T, V], gguf metadata about experts)`` from llama.cpp on ``TOKENS``."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.npy")
        res = subprocess.run([python, "-c", _EVAL, str(gguf), json.dumps(TOKENS), out], check=False,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("llama.cpp load/eval failed: " + (res.stderr or res.stdout)[-1500:])
        meta = next((json.loads(x[5:]) for x in res.stdout.splitlines() if x.startswith("META ")), {})
        return np.load(out), meta


def compare(ref, got) -> dict:
    """Max relative logit difference and greedy (argmax) agreement per position."""
    import numpy as np

    rel = float(np.abs(ref - got).max() / np.abs(ref).max())
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return {"max_rel_diff": rel, "greedy_agree": agree}


def check_family(arch: str, workdir: Path, outtype: str, llama: Path, python: str, no_run: bool = False,
                 writer: str = "save_pruned") -> dict:
    """One (family, outtype): export, convert, check the GGUF contents, load in llama.cpp, compare
    logits (``no_run``: stop after the contents check, status ``converted``). Never raises: the
    stage that failed and its message are in the result."""
    row: dict = {"arch": arch, "outtype": outtype, "writer": writer, "status": "ok"}
    folder, gguf = workdir / f"{arch}-{outtype}-{writer}", workdir / f"{arch}-{outtype}-{writer}.gguf"
    try:
        model, ref = export_pruned(arch, folder, "bfloat16" if outtype == "bf16" else "float32", writer)
    except Exception as e:  # noqa: BLE001 - reported per family
        return {**row, "status": "export-failed", "error": str(e)[-800:]}
    try:
        convert(folder, gguf, outtype, llama, python)
    except RuntimeError as e:
        return {**row, "status": "convert-failed", "error": str(e)}
    try:
        row.update(gguf_contents(gguf, model, llama))
    except (AssertionError, KeyError) as e:
        return {**row, "status": "gguf-mismatch", "error": repr(e)}
    except Exception as e:  # noqa: BLE001 - a harness gap for one family must not stop the others
        return {**row, "status": "contents-check-failed", "error": repr(e)}
    if no_run:
        return {**row, "status": "converted"}
    try:
        got, meta = llama_logits(gguf, python)
    except RuntimeError as e:
        return {**row, "status": "load-failed", "error": str(e)}
    row.update(compare(ref, got), gguf_meta=meta)
    if row["max_rel_diff"] > RTOL[outtype]:
        row["status"] = "mismatch"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(REQUIRED), help=f"families (extra: {' '.join(EXTRA)}; 'all')")
    p.add_argument("--outtype", nargs="+", default=["f32", "bf16"], choices=sorted(RTOL))
    p.add_argument("--workdir", default=None, help="where folders and GGUFs go (default: a temp dir)")
    p.add_argument("--llama-cpp", default=None, help="llama.cpp folder with convert_hf_to_gguf.py")
    p.add_argument("--llama-python", default=None, help="python with llama_cpp installed")
    p.add_argument("--writer", choices=["save_pruned", "streaming"], default="save_pruned",
                   help="how the pruned folder is written: in-memory save_pruned or the shard rewriter")
    p.add_argument("--convert-only", action="store_true",
                   help="convert and check the GGUF contents, do not run llama.cpp (no llama_cpp needed)")
    p.add_argument("--json", default=None, help="append one JSON line per result to this file")
    a = p.parse_args(argv)
    archs = list(REQUIRED + EXTRA) if a.archs == ["all"] else a.archs
    try:
        module = "torch" if a.convert_only else "llama_cpp"
        llama, python = llama_dir(a.llama_cpp), llama_python(a.llama_python, module)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    work = Path(a.workdir or tempfile.mkdtemp(prefix="moeprune_gguf_"))
    work.mkdir(parents=True, exist_ok=True)
    bad = 0
    for arch in archs:
        for outtype in a.outtype:
            row = check_family(arch, work, outtype, llama, python, a.convert_only, a.writer)
            bad += row["status"] not in ("ok", "converted")
            keys = ("expert_count", "router_max_abs_diff", "max_rel_diff", "greedy_agree")
            nums = " ".join(f"{k}={row[k]:.3g}" for k in keys if k in row) or row.get("error", "").splitlines()[-1:]
            print(f"{arch:18s} {outtype:5s} {row['status']:15s} {nums}", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
