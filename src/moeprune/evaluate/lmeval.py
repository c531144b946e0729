"""lm-evaluation-harness on an in-memory (pruned) model, fully offline on local task files.

lm-eval is an optional extra (``pip install moeprune[eval]``, tested with lm-eval 0.4.13). moeprune
ships one tiny local multiple-choice task, ``moeprune_tiny_mc``, whose YAML points at a JSONL file
next to it; lm-eval resolves ``data_files`` against the current directory, so at run time the YAML
is rewritten with an absolute path into a temporary folder (this works from an installed wheel).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from typing import Any

import yaml

LOCAL_TASKS = ("moeprune_tiny_mc",)
_MISSING = (
    "lm-eval is not installed; install the optional extra: pip install 'moeprune[eval]' (lm-eval>=0.4.9)"
)


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return lm_eval, HFLM, TaskManager


def shipped_task_dir() -> str:
    """Folder of the task YAML/JSONL files shipped inside the moeprune package."""
    return str(resources.files("moeprune") / "data" / "lmeval_tasks")


def resolve_task_dir(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy the task folder ``src`` to ``dst``, rewriting every YAML's relative ``data_files`` to
    absolute paths under ``src`` so lm-eval finds them whatever the working directory."""
    src, dst = os.fspath(src), os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not name.endswith((".yaml", ".yml")):
            continue
        with open(path) as f:
            cfg = yaml.safe_load(f)
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if files is not None:
            cfg["dataset_kwargs"]["data_files"] = _absolute(files, src)
        with open(os.path.join(dst, name), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    return dst


def _absolute(files: Any, base: str) -> Any:
    if isinstance(files, str):
        return files if os.path.isabs(files) else os.path.join(base, files)
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    raise ValueError(
        f"unsupported data_files={files!r}: use a path, a list of paths or a split -> path mapping"
    )


def jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy: tensors/numpy scalars become numbers, NaN/inf become None, anything
    else unknown becomes its ``str``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return jsonable(obj.tolist())
    return str(obj)


def run_lm_eval(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    limit: float | None = None,
    batch_size: int | str = 8,
    seed: int = 1234,
    num_fewshot: int | None = None,
    device: str | None = None,
    include_defaults: bool | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (a loaded ``PreTrainedModel``) with lm-eval's ``simple_evaluate``.

    ``tasks``: task names; the shipped local task ``moeprune_tiny_mc`` is always available, and
    ``include_path`` adds folders of your own task YAMLs (relative ``data_files`` are resolved against
    each folder). ``include_defaults=None`` loads lm-eval's built-in task index only when a requested
    task is not local (it takes seconds to scan). ``bootstrap_iters=0`` skips standard errors
    (mean metrics such as ``acc`` get a closed-form one otherwise). Returns a JSON-serialisable
    dict with ``results``, ``versions``, ``n-shot``, ``higher_is_better``, ``config`` (and
    ``samples`` if ``log_samples``)."""
    lm_eval, HFLM, TaskManager = _require_lm_eval()
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise ValueError("tasks is empty: pass at least one task name, e.g. tasks=['moeprune_tiny_mc']")
    extra = (
        []
        if include_path is None
        else ([include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    )
    for p in extra:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"include_path {os.fspath(p)!r} is not a folder of lm-eval task YAMLs")
    if device is None:
        device = str(next(model.parameters()).device)
    tmp = tempfile.mkdtemp(prefix="moeprune_lmeval_")
    try:
        dirs = [resolve_task_dir(shipped_task_dir(), os.path.join(tmp, "shipped"))]
        dirs += [resolve_task_dir(p, os.path.join(tmp, f"user{i}")) for i, p in enumerate(extra)]
        tm = None
        if include_defaults is not True:
            tm = TaskManager(include_path=dirs, include_defaults=False)
            missing = [t for t in task_list if t not in tm.all_tasks]
            if missing:
                if include_defaults is False:
                    raise ValueError(
                        f"tasks {missing} not found in the local task folders {dirs} "
                        f"(local tasks: {tm.all_tasks}); pass include_defaults=True for lm-eval's own"
                    )
                tm = None
        if tm is None:
            tm = TaskManager(include_path=dirs, include_defaults=True)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_list,
            task_manager=tm,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out is None:  # non-zero ranks in distributed runs
        return {}
    keep = ("results", "versions", "n-shot", "higher_is_better", "n-samples", "config", "configs")
    res = {k: out[k] for k in keep if k in out}
    if log_samples and "samples" in out:
        res["samples"] = out["samples"]
    res = jsonable(res)
    json.dumps(res)  # fail here, not in the caller's json.dump, if something slipped through
    return res
