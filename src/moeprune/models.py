"""Load a model (and tokenizer) from what a user types: a hub id, a local folder, a pruned folder,
an already-loaded model, ``tiny:<model_type>`` for a built-in tiny random MoE, or ``builtin:toy-moe`` for
the small trained MoE packaged with moeprune."""
from __future__ import annotations

import json
import logging
import os

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("moeprune")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "auto": "auto"}


def parse_dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer for the built-in tiny models (vocab 256, no hub download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    t.pad_token, t.bos_token, t.eos_token = alphabet[0], alphabet[1], alphabet[2]
    return t


def resolve_experts_implementation(name: str | None, device: str) -> str | None:
    """``"auto"``: eager on CPU (grouped_mm is the transformers default but far slower there), else the
    transformers default (None); any other name is returned as given."""
    if name == "auto":
        return "eager" if str(device).startswith("cpu") else None
    return name


def is_pruned_folder(path: str) -> bool:
    """True if ``path`` holds a moeprune checkpoint whose shapes need ``load_pruned``."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        d = json.load(f)
    spec = d.get("moe_pruning") or (d.get("text_config") or {}).get("moe_pruning") or {}
    return any(spec.get(k) for k in ("num_experts", "top_k", "n_group", "intermediate_size"))


def load_model(spec: str | PreTrainedModel, *, dtype: str | torch.dtype | None = "float32",
               device: str = "cpu", experts_implementation: str | None = "auto",
               **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """``(model, tokenizer)`` in eval mode. ``spec``: a loaded model, ``tiny:<model_type>``, a folder
    (moeprune-pruned folders go through ``load_pruned``) or a hub id (offline: must be cached)."""
    if isinstance(spec, PreTrainedModel):
        return spec.eval(), None
    experts_implementation = resolve_experts_implementation(experts_implementation, device)
    dt = parse_dtype(dtype)
    if spec == "builtin:toy-moe":  # the small trained MoE packaged with moeprune (see its model card)
        from moeprune.builtin_text import toy_moe_dir

        spec = toy_moe_dir()
    if spec.startswith("tiny:"):
        from moeprune.arch.tiny import tiny_model

        model = tiny_model(spec[5:], dtype=dt if isinstance(dt, torch.dtype) else torch.float32)
        tok = byte_tokenizer()
    else:
        if not os.path.isdir(spec) and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise FileNotFoundError(f"model folder {spec!r} does not exist (or pass a hub id like 'org/name')")
        kw = dict(dtype=dt, **kwargs)
        if experts_implementation:
            kw["experts_implementation"] = experts_implementation
        if os.path.isdir(spec) and is_pruned_folder(spec):
            from moeprune.apply import load_pruned

            model = load_pruned(spec, **kw)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(spec, **kw)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as e:
            log.warning("no tokenizer found with %s (%s); pass one explicitly", spec, str(e).splitlines()[0])
            tok = None
    if experts_implementation and spec.startswith("tiny:") and model._can_set_experts_implementation():
        model.set_experts_implementation(experts_implementation)
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def load_offloaded_model(path: str, offload_folder: str, *, dtype: str | torch.dtype | None = "float32",
                         device: str = "cpu", experts_implementation: str | None = "auto"):
    """``(model, tokenizer)`` with every decoder layer of the checkpoint kept on disk (accelerate offload)
    until used: for layer-wise observation of models larger than memory."""
    from moeprune.observe import load_offloaded

    experts_implementation = resolve_experts_implementation(experts_implementation, device)
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = load_offloaded(path, offload_folder, device=device, dtype=parse_dtype(dtype), **kw)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok
