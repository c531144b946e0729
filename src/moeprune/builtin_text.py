"""Built-in offline text: the CPython standard-library sources of the running interpreter.

Always present wherever Python is, so the default recipe and the demo need no download. Files are
split deterministically (by sorted path, alternating) into a calibration part and a held-out part
that never overlap.
"""
from __future__ import annotations

import os
import sysconfig

BUILTINS = ("builtin:stdlib", "builtin:stdlib-heldout")


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
