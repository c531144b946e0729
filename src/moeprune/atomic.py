"""Atomic writes: a crash or an error never leaves a half-written file or folder behind.

Files are written to a temp file next to the target and renamed over it (``os.replace`` is atomic
on one filesystem); folders are built in a temp folder ``.NAME.tmp-*`` next to the target, then swapped
in (``renameat2(RENAME_EXCHANGE)`` where the kernel has it, so OUT is at every instant the old or the new
folder). Writers of one folder exclude each other with a lock file ``.NAME.lock`` beside it (``flock``:
released by the kernel when a writer dies), and a writer holding the lock deletes the temp folders that
killed writers of the same folder left behind. Outputs follow the umask like any other writer. Torch-free,
so plain-JSON writers (``PruningPlan.save``) stay cheap to import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

OVERWRITE_HINT = "pass overwrite=True to replace it"  # the CLI says --overwrite (cli_support.CLI_SPELLING)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (no race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _follow_umask(path: str | os.PathLike, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the output the mode a plain open/mkdir would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def follow_umask_tree(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the umask's mode: third-party writers (safetensors'
    ``save_file``, ``mkdtemp``) create 0600/0700 whatever the umask, so a served model was unreadable."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, writer: Callable[[str], object]) -> str:
    """``writer(tmp)`` writes a temp file in ``path``'s folder, which then replaces ``path``; the temp
    file is removed if ``writer`` fails. Returns ``path``."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        _follow_umask(tmp, directory=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """``atomic_write`` of a text file (UTF-8, newlines written as given)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


# ---------------------------------------------------------------- free space
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_free_space(folder: str | os.PathLike, need_bytes: int, what: str, *, margin: float = 1.05) -> None:
    """Refuse to start writing ``need_bytes`` (plus 5%) into ``folder``'s filesystem when it has less free.
    ``MOEPRUNE_SKIP_SPACE_CHECK=1`` turns the check off (e.g. a filesystem that reports free space wrongly)."""
    if os.environ.get("MOEPRUNE_SKIP_SPACE_CHECK") == "1":
        return
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes * margin > free:
        raise OSError(f"not enough disk space for {what}: about {_gb(need_bytes)} needed, {_gb(free)} free on "
                      f"the filesystem of {probe}; free space there or write elsewhere "
                      "(MOEPRUNE_SKIP_SPACE_CHECK=1 skips this check)")


def folder_bytes(folder: str | os.PathLike, names: Callable[[str], bool] = lambda n: True) -> int:
    """Total size of the files in ``folder`` (not recursive) whose name passes ``names``."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and names(p.name))


# ---------------------------------------------------------------- output folder rules
def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(out: str | os.PathLike, *, sources: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False) -> Path:
    """The one rule for an output folder, checked before any work: it is not a source checkpoint, not
    inside one, does not contain one (replacing it would delete the source), is empty unless ``overwrite``,
    and its parent is writable. Returns ``out`` resolved."""
    out = Path(out).resolve()
    for s in sources:
        if s is None or not Path(s).is_dir():
            continue
        src = Path(s).resolve()
        if _within(out, src) or _within(src, out):
            raise ValueError(f"refusing to write {out}: it is, is inside, or contains the source checkpoint {src} "
                             "(replacing it would delete the source); choose an output folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; {OVERWRITE_HINT}")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: {parent} is not writable (read-only or another user's); "
                              "choose an output folder you can write")
    return out


# ---------------------------------------------------------------- lock
class OutputLockedError(BlockingIOError):
    """Another writer (process) holds the lock of this output folder."""


_HELD: dict[Path, list] = {}  # resolved OUT -> [fd, depth]: the lock is re-entrant within one process


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _try_lock(path: Path) -> int | None:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the previous holder may have unlinked the file between our open and flock: retry then
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``out`` (fails fast, naming the holder, when another process holds it)."""
    out = Path(out).resolve()
    if out in _HELD:
        _HELD[out][1] += 1
        try:
            yield out
        finally:
            _HELD[out][1] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    fd = _try_lock(path)
    if fd is None:
        try:
            holder = path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise OutputLockedError(f"another moeprune process is writing {out} (lock {path} held by {holder}); "
                                "wait for it to finish or choose another output folder")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}: {' '.join(sys.argv)[:300]}\n".encode())
    _HELD[out] = [fd, 1]
    try:
        yield out
    finally:
        del _HELD[out]
        try:
            os.unlink(path)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- folders
def _stale_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-[A-Za-z0-9_]+$")


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Under ``out``'s lock, temp folders of ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``) belong to writers that
    were killed: delete them. If a kill fell between the two renames of a non-exchange swap (``out`` gone),
    the previous folder is first moved back."""
    out = Path(out).resolve()
    if out not in _HELD:
        raise RuntimeError(f"clean_stale({out}) needs the output lock")
    pat = _stale_pattern(out.name)
    stale = [p for p in out.parent.iterdir() if pat.match(p.name) and p.is_dir() and not p.is_symlink()]
    for p in stale:
        if not out.exists() and p.name.startswith(f".{out.name}.old-") and (p / "dir").is_dir():
            os.replace(p / "dir", out)
        shutil.rmtree(p, ignore_errors=True)
    return stale


def make_temp_dir(out: Path) -> Path:
    """An empty temp folder next to ``out`` with the mode ``mkdir`` would give it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _follow_umask(tmp, directory=True)
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Swap the finished folder ``tmp`` in as ``out`` and delete the previous ``out``. With
    ``RENAME_EXCHANGE`` the swap is one atomic step; elsewhere the previous ``out`` is moved aside to
    ``.NAME.old-*/dir`` first (``clean_stale`` moves it back if a crash falls between the two renames)."""
    tmp, out = Path(tmp), Path(out)
    follow_umask_tree(tmp)
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "dir")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``out`` to write into; on success it replaces ``out``
    (``replace_dir``), on any error it is deleted and ``out`` is left as it was. Holds ``out``'s lock
    throughout and first deletes what killed writers of ``out`` left."""
    out = Path(out).resolve()
    with output_lock(out):
        clean_stale(out)
        tmp = make_temp_dir(out)
        try:
            yield tmp
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
