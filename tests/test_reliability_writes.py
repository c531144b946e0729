"""Nothing lost: the source is never written or deleted, OUT always holds one complete run (kills, overwrite,
two runs at once), outputs follow the umask, stale temp folders are cleaned, resume never unpickles code,
free space is checked first, and results computed before a late failure are kept."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeprune.cli import main

SMALL = ["--set", "calibration.num_samples=4", "--set", "calibration.seq_len=32", "--set", "calibration.batch_size=4",
         "--set", "eval.max_tokens=300", "--set", "eval.seq_len=32", "--set", "report=false"]
NEW = ["--set", "method.name=reap", "--set", "target.expert_sparsity=0.5"]  # the second run's recipe


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A source checkpoint and one finished run (frequency 0.25) made from it; tests copy, never mutate."""
    from moeprune.arch.tiny import tiny_model
    from moeprune.models import byte_tokenizer

    root = tmp_path_factory.mktemp("world")
    src = root / "parent" / "src"
    tiny_model("qwen3_moe").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    done = root / "done"
    assert main(["run", str(done), "--quiet", "--set", f"model={src}", "--set", "method.name=frequency",
                 "--set", "target.expert_sparsity=0.25", *SMALL]) == 0
    return {"src": src, "done": done, "src_hash": _hashes(src)}


def _copy_done(world, dst: Path) -> Path:
    shutil.copytree(world["done"], dst)
    return dst


def _method_everywhere(out: Path) -> set[str]:
    """The method named by each part of a run folder (one element iff the folder is consistent)."""
    names = {yaml.safe_load((out / "recipe.yaml").read_text())["method"]["name"],
             json.loads((out / "plan.json").read_text())["method"],
             json.loads((out / "model" / "pruning_plan.json").read_text())["method"],
             json.loads((out / "eval.json").read_text())["pruned"]["method"]}
    names |= {m for m in ("frequency", "reap") if f"`{m}`" in (out / "README.md").read_text()}
    return names


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding OUT's lock (it prints ``held`` once it has it)."""
    code = ("import time; from moeprune.atomic import output_lock\n"
            f"with output_lock({str(out)!r}):\n print('held', flush=True); time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- item 1: the source is never written
def test_no_output_may_hold_or_sit_in_the_source(world, tmp_path, capsys):
    src, parent = world["src"], world["src"].parent
    plan = world["done"] / "plan.json"
    for cmd in (["apply", "--model", str(src), "--plan", str(plan), "--out", str(parent), "--overwrite"],
                ["apply", "--model", str(src), "--plan", str(plan), "--out", str(parent), "--overwrite", "--streaming"],
                ["run", str(parent), "--quiet", "--overwrite", "--set", f"model={src}", *SMALL],
                ["run", str(src / "sub"), "--quiet", "--overwrite", "--set", f"model={src}", *SMALL]):
        assert main(cmd) == 2, cmd  # before the fix: in-memory apply / run deleted or wrote into the source
        err = capsys.readouterr().err
        assert "source checkpoint" in err and str(src) in err
        assert _hashes(src) == world["src_hash"] and sorted(os.listdir(parent)) == ["src"]


# ---------------------------------------------------------------- item 3: overwrite, lock, concurrency
def test_run_checks_out_before_computing(world, tmp_path, capsys, monkeypatch):
    import moeprune.api

    def computed(*a, **k):
        raise AssertionError("observed before refusing")

    monkeypatch.setattr(moeprune.api, "calibrate", computed)
    out = _copy_done(world, tmp_path / "out")
    before = _hashes(out)
    assert main(["run", str(out), "--quiet", "--set", f"model={world['src']}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err and "overwrite=True" not in err  # CLI spelling
    holder = _hold_lock(out)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(out), "--quiet", "--overwrite", "--set", f"model={world['src']}", *SMALL]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and f"pid {holder.pid}" in err  # names OUT and the lock holder
    finally:
        holder.kill()
        holder.wait()
    assert _hashes(out) == before


def test_apply_streaming_honours_overwrite(world, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["apply", "--model", str(world["src"]), "--plan", str(world["done"] / "plan.json"), "--out", str(out),
            "--streaming"]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # before the fix the flag was ignored: refused
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


_RUNNER = """
import os, signal, sys
import moeprune.atomic as A
from moeprune.cli import main
point, out, args = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_replace, real_exchange, n = os.replace, A._exchange, [0]
def replace(a, b):
    n[0] += 1
    if point == f"replace:{n[0]}" or (point == "fallback" and os.fspath(b) == out):
        die()
    return real_replace(a, b)
def exchange(a, b):
    if point == "swap":
        die()
    if point == "fallback":
        return False
    done = real_exchange(a, b)
    if point == "swapped":
        die()
    return done
os.replace, A._exchange = replace, exchange
if point == "model":
    import moeprune.apply.checkpoint as C
    C._fix_config_json = lambda *a: die()  # the weights are (partly) written by now
sys.exit(main(args))
"""


def _runner(tmp_path: Path, point: str, out: Path, args: list[str]) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    return subprocess.Popen([sys.executable, str(script), point, str(out), *args], stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("point", ["replace:1", "replace:4", "model", "swap", "swapped", "fallback"])
def test_kill_leaves_old_or_new_run_and_source_intact(world, tmp_path, point):
    """SIGKILL a `run --overwrite` at several points: the source is byte-identical, OUT is the old complete
    run or the new complete one, and the next run cleans what the killed one left."""
    from moeprune.atomic import clean_stale, output_lock

    out = _copy_done(world, tmp_path / "out")
    old = _hashes(out)
    args = ["run", str(out), "--quiet", "--overwrite", "--set", f"model={world['src']}", *SMALL, *NEW]
    p = _runner(tmp_path, point, out, args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, err
    assert _hashes(world["src"]) == world["src_hash"]
    if point == "fallback":  # no RENAME_EXCHANGE: killed between the two renames, OUT is aside until recovered
        with output_lock(out):
            clean_stale(out)
    now = _hashes(out)
    assert now == old or (now.keys() == old.keys() and _method_everywhere(out) == {"reap"}), point
    if point == "model":  # the next run into OUT deletes what the killed one left (one full run is enough)
        assert main(args) == 0 and _method_everywhere(out) == {"reap"}
    else:  # the same cleaning, by any next writer of OUT (cheaper than a run)
        with output_lock(out):
            clean_stale(out)
    assert sorted(os.listdir(tmp_path)) == ["out", "runner.py"]  # stale temp folders and the lock are gone


def test_two_runs_into_one_out(world, tmp_path):
    """Both with --overwrite: the loser fails fast on the lock (or runs after); OUT is one consistent run."""
    out = _copy_done(world, tmp_path / "out")
    base = ["run", str(out), "--quiet", "--overwrite", "--set", f"model={world['src']}", *SMALL]
    runs = [_runner(tmp_path, "none", out, [*base, *NEW]),
            _runner(tmp_path, "none", out, [*base, "--set", "method.name=frequency"])]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or (rc == 2 and "another moeprune process is writing" in err and str(out) in err), err
    assert len(_method_everywhere(out)) == 1
    assert sorted(os.listdir(tmp_path)) == ["out", "runner.py"]


# ---------------------------------------------------------------- item 4: umask
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(world, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert main(["run", str(out), "--quiet", "--set", f"model={world['src']}", *SMALL[:-2]]) == 0  # with report
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert any(p.suffix == ".png" for p in paths) and any(p.suffix == ".safetensors" for p in paths)
    for p in paths:  # before the fix: folders 0700 and atomically written files 0600 under umask 022
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


# ---------------------------------------------------------------- item 5: untrusted pickles
class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code(fresh_tiny, tmp_path):
    import torch

    from moeprune.observe import observe_layerwise

    model = fresh_tiny("qwen3_moe")
    batches = [{"input_ids": torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))}]
    work = tmp_path / "work"
    full = observe_layerwise(model, batches, progress=False, checkpoint_dir=work)
    marker = tmp_path / "pwned"
    torch.save(_Planted(str(marker)), work / "calls.pt")  # an old-format file is never read
    resumed = observe_layerwise(model, batches, progress=False, checkpoint_dir=work)
    assert all(torch.equal(full[li][n], resumed[li][n]) for li in full.moe_layers for n in full[li])
    last = next(work.glob("observer_*.pt"))
    torch.save({"state": _Planted(str(marker))}, last)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        observe_layerwise(model, batches, progress=False, checkpoint_dir=work)
    assert not marker.exists()  # before the fix: torch.load(weights_only=False) ran the planted code


# ---------------------------------------------------------------- item 9: leftovers and disk
def test_stale_temp_folders_are_cleaned_only_when_provably_ours(tmp_path):
    from moeprune.atomic import OutputLockedError, atomic_dir, clean_stale, output_lock

    out = tmp_path / "out"
    with atomic_dir(out) as t:
        (t / "a").write_text("1")
    for name in (".out.tmp-abc_12", ".out.old-x9", ".other.tmp-abc", ".out.tmp-x.keep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big").write_bytes(b"0" * 1000)
    holder = _hold_lock(out)
    try:  # another writer of OUT is alive: its temp folders are not ours to delete
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError), atomic_dir(out):
            pass
        assert (tmp_path / ".out.tmp-abc_12").exists()
    finally:
        holder.kill()
        holder.wait()
    with atomic_dir(out) as t:
        (t / "b").write_text("2")
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-abc", ".out.tmp-x.keep", "out"]
    os.rename(out, tmp_path / ".out.old-k1")  # killed between the two renames of a non-exchange swap
    (tmp_path / ".out.old-k2").mkdir()
    os.rename(tmp_path / ".out.old-k1", tmp_path / ".out.old-k2" / "dir")
    with output_lock(out):
        clean_stale(out)
    assert os.listdir(out) == ["b"] and not (tmp_path / ".out.old-k2").exists()


def test_free_space_checked_before_writing(world, tmp_path, monkeypatch, capsys):
    import moeprune.atomic

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(moeprune.atomic.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "model"
    assert main(["apply", "--model", str(world["src"]), "--plan", str(world["done"] / "plan.json"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "GB needed" in err and "free" in err and str(out) in err
    assert os.listdir(tmp_path) == []  # nothing started
    monkeypatch.setenv("MOEPRUNE_SKIP_SPACE_CHECK", "1")  # the documented way out
    assert main(["apply", "--model", str(world["src"]), "--plan", str(world["done"] / "plan.json"),
                 "--out", str(out)]) == 0


# ---------------------------------------------------------------- results before a late failure
def test_results_before_a_late_failure_are_kept(world, tmp_path, monkeypatch, capsys):
    import moeprune.apply
    import moeprune.evaluate.lmeval

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moeprune.apply, "save_pruned", disk_full)
    out = tmp_path / "run"
    assert main(["run", str(out), "--quiet", "--set", f"model={world['src']}", *SMALL]) == 2
    assert "run.failed" in capsys.readouterr().err and not out.exists()
    failed = tmp_path / "run.failed"
    assert {"recipe.yaml", "plan.json", "stats", "eval.json", "status.json"} <= set(os.listdir(failed))
    assert "No space left" in json.loads((failed / "status.json").read_text())["error"]
    ev = json.loads((failed / "eval.json").read_text())
    assert ev["original"]["ppl"] > 0 and ev["pruned"]["ppl"] > 0  # measured before the write failed
    monkeypatch.undo()

    def no_lm_eval(*a, **k):
        raise ImportError("lm-eval is not installed: pip install moeprune[eval]")

    monkeypatch.setattr(moeprune.evaluate.lmeval, "run_lm_eval", no_lm_eval)
    assert main(["run", str(out), "--quiet", "--set", f"model={world['src']}", "--set",
                 "eval.lm_eval_tasks=[moeprune_tiny_mc]", *SMALL]) == 2
    ev = json.loads((failed / "eval.json").read_text())  # the second failure replaced the first one's folder
    assert ev["original"]["ppl"] > 0 and "lm_eval" not in ev["original"]
    assert sorted(os.listdir(tmp_path)) == ["run.failed"]


def test_unwritable_parent_is_refused_up_front(tmp_path, monkeypatch, capsys):
    """Read-only folders: a one-line error naming the folder (root ignores permission bits, so the
    kernel's answer is simulated through ``os.access``)."""
    import moeprune.atomic

    monkeypatch.setattr(moeprune.atomic.os, "access", lambda p, mode: Path(p) != tmp_path)
    assert main(["run", str(tmp_path / "run"), "--quiet", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not writable" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
