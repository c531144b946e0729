"""Read character vectors out of an R package's lazy-load data base (``data/Rdata.{rdx,rdb}``) without R.

Format (R internals, "Lazy loading"): ``Rdata.rdx`` is a gzip-compressed serialized list whose
``variables`` maps each object name to ``(offset, length)`` inside ``Rdata.rdb``; ``compressed`` is
TRUE/1 (zlib), 2 (bzip2) or 3 (xz). Each ``.rdb`` chunk is a 4-byte big-endian uncompressed length, then
(types 2/3 only) one type byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` stored), then the payload: a
serialized R object that the ``rdata`` package parses.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from pathlib import Path


def decompress_chunk(blob: bytes, compressed: int) -> bytes:
    """Payload of one ``.rdb`` chunk; checks the stored uncompressed length."""
    size = struct.unpack(">I", blob[:4])[0]
    if compressed in (2, 3):
        kind, body = blob[4:5], blob[5:]
        codecs = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if kind not in codecs:
            raise ValueError(f"unknown R lazy-load chunk type {kind!r}; expected one of {sorted(codecs)}")
        out = codecs[kind](body)
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise ValueError(f"R lazy-load chunk: header says {size} bytes, got {len(out)}")
    return out


def _parse(raw: bytes):
    import rdata

    with warnings.catch_warnings():  # serialized objects carry no RDS magic; rdata warns and assumes RDS
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def read_lazyload(data_dir: str | Path) -> dict[str, list[str]]:
    """``{object name: lines}`` for every character vector stored in ``data_dir/Rdata.rdb``."""
    data_dir = Path(data_dir)
    idx = _parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    compressed = int(idx["compressed"][0]) if "compressed" in idx else 1
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, (start, length) in idx["variables"].items():
        val = _parse(decompress_chunk(rdb[int(start): int(start) + int(length)], compressed))
        values = val.tolist() if hasattr(val, "tolist") else list(val)
        out[str(name)] = ["" if x is None else str(x) for x in values]
    return out


def extract_lazyload(data_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write each object as ``out_dir/<name>.txt`` (one element per line); returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, lines in read_lazyload(data_dir).items():
        f = out_dir / f"{name}.txt"
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(f)
    return files
