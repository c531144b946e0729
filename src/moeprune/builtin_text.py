"""Built-in offline text: the CPython standard-library sources of the running interpreter, and the
calibration / held-out slices packaged with the toy MoE (``builtin:toy-moe-calib``, ``-heldout``).

Always present wherever Python is, so the default recipe and the demo need no download. Files are
split deterministically (by sorted path, alternating) into a calibration part and a held-out part
that never overlap.
"""
from __future__ import annotations

import os
import sysconfig

BUILTINS = ("builtin:stdlib", "builtin:stdlib-heldout", "builtin:toy-moe-calib", "builtin:toy-moe-heldout")


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages",
                                                              "encodings", "__pycache__", "lib2to3"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    if not out:
        raise FileNotFoundError(f"no standard-library sources under {root}; pass a text file instead")
    return out


def builtin_texts(name: str, max_chars: int = 4_000_000) -> list[str]:
    """Documents of ``builtin:stdlib`` (calibration half) or ``builtin:stdlib-heldout`` (the other half)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in text {name!r}; choose one of {BUILTINS}")
    if name.startswith("builtin:toy-moe-"):  # the packaged toy MoE's slices, one text per domain
        return list(toy_moe_texts(name.rsplit("-", 1)[1]).values())
    files = _stdlib_files()[(0 if name == "builtin:stdlib" else 1)::2]
    docs, total = [], 0
    for p in files:
        with open(p, encoding="utf-8", errors="replace") as f:
            t = f.read()
        if len(t) < 200:
            continue
        docs.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return docs


TOY_MOE_SPLITS = ("calib", "heldout")


def toy_moe_dir() -> str:
    """Folder of the packaged toy MoE (``builtin:toy-moe``): HF model files, tokenizer, model card, text."""
    from importlib.resources import files

    path = str(files("moeprune") / "data" / "toy-moe")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the packaged toy MoE is missing from {path}; reinstall moeprune "
                                "(python3 -m pip install -e .)")
    return path


def toy_moe_texts(split: str) -> dict[str, str]:
    """``{domain: text}`` of the toy MoE's packaged calibration or held-out slice (never trained on)."""
    if split not in TOY_MOE_SPLITS:
        raise ValueError(f"split={split!r}; choose one of {TOY_MOE_SPLITS}")
    folder = os.path.join(toy_moe_dir(), "text")
    names = sorted(f for f in os.listdir(folder) if f.endswith(f".{split}.txt"))
    out = {}
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            out[name.split(".")[0]] = f.read()
    return out
