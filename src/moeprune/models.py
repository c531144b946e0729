"""Load a model (and tokenizer) from what a user types: a hub id, a local folder, a pruned folder,
an already-loaded model, ``tiny:<model_type>`` for a built-in tiny random MoE, or ``builtin:toy-moe`` for
the small trained MoE packaged with moeprune."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moeprune.arch.structure import realign_tensors_

log = logging.getLogger("moeprune")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "auto": "auto"}


def parse_dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)} (e.g. dtype: bfloat16)")
    return _DTYPES[dtype]


def check_device(device: str) -> str:
    """Refuse a device that this machine does not have (``cuda:7`` on a 1-GPU or CPU-only host) up front."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use cpu, cuda, cuda:0, mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n or n == 0:
            raise ValueError(f"device={device!r} is not available: this machine has {n} CUDA device(s)"
                             f"{'' if n == 0 else f' (cuda:0..cuda:{n - 1})'}; use " + ("cuda:0" if n else "cpu"))
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "npu", "hpu"):
        raise ValueError(f"device={device!r} is not supported; use cpu, cuda[:i] or mps")
    return device


def experts_implementations() -> list[str]:
    """Names transformers accepts for ``experts_implementation`` (plus moeprune's ``auto``)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["auto", "eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def check_experts_implementation(name: str | None) -> str | None:
    if name is not None and name not in experts_implementations():
        raise ValueError(f"experts_implementation={name!r} is unknown; choose one of {experts_implementations()}")
    return name


def looks_like_local_path(spec: str) -> bool:
    """The one rule telling a (mistyped) local path from a hub id: ``./x``, ``/x``, ``~/x``, ``a/b/c``, a
    backslash, or ``out/model`` whose ``out`` folder exists here."""
    parent = os.path.dirname(spec.rstrip("/"))
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or (bool(parent) and os.path.isdir(os.path.expanduser(parent))))


def resolve_model_source(spec: str) -> str:
    """A local folder (returned as a path) or a syntactically valid hub id; anything that looks like a
    mistyped local path (``./x``, ``/x``, ``out/model`` with ``out`` here, ``a/b/c``) is a clear error here,
    not a hub lookup that ends in a connection error."""
    if spec.startswith("tiny:"):
        return spec
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return path
    hint = (f"model {spec!r} is not a folder here (current folder {os.getcwd()}); pass an existing checkpoint "
            "folder, a hub id like 'Qwen/Qwen3-30B-A3B', or tiny:<model_type>")
    if os.path.exists(path):
        raise FileNotFoundError(f"model {spec!r} is a file, not a checkpoint folder; " + hint.split("; ", 1)[1])
    if looks_like_local_path(spec):
        raise FileNotFoundError(hint)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise FileNotFoundError(hint) from None
    return spec


def max_positions(spec: str) -> int | None:
    """``max_position_embeddings`` of a tiny model or a local folder, read without loading weights (None if
    unknown): to warn when the token rows are longer than the model's positions."""
    if spec.startswith("tiny:"):
        from moeprune.arch.tiny import tiny_config

        try:
            return getattr(tiny_config(spec[5:]), "max_position_embeddings", None)
        except (KeyError, ValueError):  # an unknown tiny name fails later with its own message
            return None
    cfg = os.path.join(os.path.expanduser(spec), "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        d = json.load(f)
    return (d.get("max_position_embeddings") or (d.get("text_config") or {}).get("max_position_embeddings"))


_WARNED: set[tuple[str, int, str]] = set()  # once per process: recipes are re-validated several times


def warn_positions(spec: str, seq_len: int, what: str) -> None:
    """Log a warning when ``seq_len`` exceeds the model's positions (results are then extrapolated)."""
    n = max_positions(spec) if isinstance(spec, str) else None
    if n and seq_len > n and (spec, seq_len, what) not in _WARNED:
        _WARNED.add((spec, seq_len, what))
        log.warning("%s seq_len=%d exceeds the %d positions of %s: rows past position %d are extrapolated; "
                    "use seq_len <= %d", what, seq_len, n, spec, n, n)


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
        spec = resolve_model_source(spec)
        kw = dict(dtype=dt, **kwargs)
        if experts_implementation:
            kw["experts_implementation"] = experts_implementation
        if os.path.isdir(spec) and is_pruned_folder(spec):
            from moeprune.apply import load_pruned

            model = load_pruned(spec, **kw)
        elif os.path.isdir(spec):
            model = transformers.AutoModelForCausalLM.from_pretrained(spec, **kw)
        else:
            model = _from_hub(spec, kw)
        realign_tensors_(model)  # memory-mapped tensors are 8-byte aligned: same kernels as any other route
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


def _from_hub(spec: str, kw: dict) -> PreTrainedModel:
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(spec, **kw)
    except OSError as e:  # not cached offline, no such repo, no connection
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"model {spec!r} is neither a local folder (current folder {os.getcwd()}) nor a hub "
                                f"model available here ({first}); offline, only cached hub models load") from None


def load_layerwise_model(path: str, *, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
                         experts_implementation: str | None = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)`` for layer-wise calibration of a checkpoint folder larger than memory: decoder
    layers stay on the META device and are read from the source safetensors one at a time
    (``moeprune.observe.lazy``); nothing is copied to disk. A folder without safetensors weights is loaded
    whole (logged): ``.bin`` pickles cannot be read one layer at a time."""
    from moeprune.apply.shards import source_files
    from moeprune.observe.lazy import load_lazy

    try:
        source_files(Path(path))
    except (ValueError, FileNotFoundError) as e:
        log.warning("layer-wise calibration loads %s whole: %s", path, e)
        return load_model(path, dtype=dtype, device=device, experts_implementation=experts_implementation)
    dt = parse_dtype(dtype)
    if dt in (None, "auto"):
        cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        dt = getattr(cfg.get_text_config(), "dtype", None) or torch.float32
        dt = parse_dtype(dt) if isinstance(dt, str) else dt
    model = load_lazy(path, dtype=dt, device=device, trust_remote_code=trust_remote_code,
                      experts_implementation=resolve_experts_implementation(experts_implementation, device))
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def input_device(model: torch.nn.Module) -> torch.device:
    """The one rule for "the model's device": where its input embeddings live (the inputs go there;
    accelerate moves activations on from there), else its first non-meta parameter, else the CPU."""
    try:
        dev = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        dev = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return dev if dev.type != "meta" else torch.device("cpu")
