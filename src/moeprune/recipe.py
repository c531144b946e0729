"""The recipe: one flat, pydantic-validated YAML that drives ``moeprune run`` and ``oneshot``.

```yaml
model: Qwen/Qwen3-30B-A3B          # hub id (cached), folder, or tiny:<model_type>
dtype: bfloat16
calibration: {dataset: data/calib.jsonl, text_column: text, num_samples: 128, seq_len: 2048}
method: {name: reap}               # any registered method; other keys are its options
target: {expert_sparsity: 0.5, allocation: uniform}
eval: {perplexity: data/heldout.txt, kl: true}
```
The resolved recipe (defaults filled in) is written to the output folder as ``recipe.yaml``.
"""
from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_local_path(value: str, what: str) -> str:
    """A value that names a local path must exist now (not after hours of observing)."""
    from moeprune.models import looks_like_local_path
    from moeprune.observe.data import BUILDERS  # the supported local file types, defined once

    p = os.path.expanduser(value)
    if (looks_like_local_path(value) or os.path.splitext(value)[1] in BUILDERS) and not os.path.exists(p):
        raise ValueError(f"{what}={value!r} does not exist (current folder {os.getcwd()}); fix the path")
    return value



class CalibrationConfig(_Strict):
    dataset: str = Field("builtin:stdlib", description="HF dataset name, local txt/jsonl/json/parquet file, "
                         "or builtin:stdlib (CPython standard-library source, always offline)")
    split: str = "train"
    text_column: str = "text"
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    batch_size: int = Field(4, ge=1)
    packing: bool = True
    select: Literal["random", "kmeans"] = "random"
    seed: int = 42
    layerwise: bool = Field(False, description="onload one decoder layer at a time (models larger than memory)")
    sequential: bool = Field(False, description="plan and prune each MoE layer before the next is observed "
                             "(error-propagating, llm-compressor style); implies the layer-wise pass, needs "
                             "target.allocation uniform")
    recon_tokens: int | None = Field(None, description="NAEE cache: a seeded subsample of this many tokens per "
                                     "batch; null = every token (the reference)")
    recon_max_gb: float | None = Field(4.0, description="NAEE cache bound in GB (= observe.recon_cache."
                                       "DEFAULT_MAX_GB): above it a seeded per-batch subsample, with a warning; "
                                       "null = no bound")

    recon_mode: Literal["auto", "online", "cache"] = Field(
        "auto", description="NAEE: 'online' scores every candidate keep set during observe on every token, "
        "without a token cache (needs the method and target: `run` / `oneshot`); 'cache' keeps the token cache "
        "(any target later; bounded by recon_max_gb); 'auto' = online when the method is naee and its "
        "enumeration is feasible, else the cache")
    cluster_dtype: Literal["float64", "float16"] = Field(
        "float64", description="storage of C-Prune's sentence_out rows: float16 = a quarter of the memory and "
        "exactly what cprune's default precision='float16' reads (precision='float64' refuses it)")
    paths_max_gb: float | None = Field(4.0, description="bound (GB) on Pathfinder's per-sample rows "
                                       "(8 N (3E+2) bytes per MoE layer), checked before calibration; null = none")
    cluster_max_gb: float | None = Field(8.0, description="bound (GB) on C-Prune's per-sample expert outputs "
                                         "(8 N E H bytes per MoE layer), checked before calibration; null = none")
    partials_max_gb: float | None = Field(2.0, description="bound (GB) on the per-batch partials of routed / "
                                          "direction (grow with the batches), checked before calibration; "
                                          "null = none")
    transitions_max_gb: float | None = Field(4.0, description="bound (GB) on the routed ids a layer-wise pass "
                                             "holds for transitions (4 T k bytes), checked before calibration; "
                                             "null = none")

    @field_validator("paths_max_gb", "cluster_max_gb", "partials_max_gb", "transitions_max_gb", mode="before")
    @classmethod
    def _caps(cls, v, info):
        from moeprune.observe.memory import check_cap_value

        check_cap_value(info.field_name, v)
        return v

    def memory_caps(self) -> dict[str, float | None]:
        """Feature group -> cap in GB (``observe/memory.py::CAPS`` names the options)."""
        from moeprune.observe.memory import CAPS

        return {group: getattr(self, opt) for group, (opt, _) in CAPS.items()}

    @field_validator("recon_tokens", "recon_max_gb", mode="before")
    @classmethod
    def _recon(cls, v, info):
        """The NAEE cache options, with what to set instead."""
        if v is None:
            return v
        if info.field_name == "recon_tokens" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"calibration.recon_tokens={v!r} must be a positive integer (tokens cached per "
                             "batch for NAEE) or null (every token, the reference)")
        if info.field_name == "recon_max_gb" and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                  or not v > 0):
            raise ValueError(f"calibration.recon_max_gb={v!r} must be a number > 0 (GB of the NAEE cache) or "
                             "null (no bound)")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_exists(cls, v: str) -> str:
        return _check_local_path(v, "calibration.dataset")


class MethodSpec(BaseModel):
    """``name`` plus the method's own options (validated against its config class)."""

    model_config = ConfigDict(extra="allow")
    name: str = "reap"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self):
        from moeprune.methods.registry import get_method

        return get_method(self.name, **self.options())


class RecoverySpec(BaseModel):
    """``name`` (compensate | merge) plus the step's own options (validated against its config class);
    see docs/RECOVERY.md."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self):
        from moeprune.recover import get_recovery

        return get_recovery(self.name, **self.options())


class TargetSpec(_Strict):
    """The recipe's ``target``: the field types only; the budget rules (exactly one budget, its range,
    allocation, min_keep) are ``methods.target.Target``'s, checked once by building it."""

    expert_sparsity: float | None = None
    param_ratio: float | None = None
    memory_gb: float | None = None
    allocation: str = "uniform"
    min_keep: int | None = None

    @model_validator(mode="after")
    def _target_rules(self):
        self.build()  # raises ValueError with the Target's own message
        return self

    def build(self):
        from moeprune.methods.target import Target

        return Target(**self.model_dump())


class ApplyConfig(_Strict):
    mode: Literal["structural", "streaming"] = "structural"
    max_shard_size: str = "5GB"
    save: bool = True

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            convert_file_size_to_int(v)
        except (ValueError, TypeError):
            raise ValueError(f"max_shard_size={v!r} is not a size; write it like 5GB, 500MB or 2GiB") from None
        return v


class EvalConfig(_Strict):
    perplexity: str | None = Field("builtin:stdlib-heldout", description="text file, or builtin:stdlib-heldout")
    seq_len: int = Field(256, ge=8)
    max_tokens: int | None = Field(20000, ge=1)
    kl: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_include_path: str | None = None
    lm_eval_limit: int | None = None

    @field_validator("perplexity")
    @classmethod
    def _text_exists(cls, v: str | None) -> str | None:
        """A held-out text that is not a built-in must be an existing file or folder: otherwise the path
        string itself would be scored as text (plausible but meaningless numbers)."""
        from moeprune.builtin_text import BUILTINS

        if v is None or v in BUILTINS or os.path.exists(os.path.expanduser(v)):
            return v
        raise ValueError(f"eval.perplexity={v!r} is neither a built-in text ({', '.join(sorted(BUILTINS))}) nor an "
                         f"existing file or folder (current folder {os.getcwd()}); fix the path, or set "
                         "perplexity: null to skip perplexity")

    @field_validator("lm_eval_include_path")
    @classmethod
    def _include_exists(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isdir(os.path.expanduser(v)):
            raise ValueError(f"eval.lm_eval_include_path={v!r} is not a folder of lm-eval task YAMLs")
        return v


class Recipe(_Strict):
    model: str = "tiny:qwen3_moe"
    dtype: str = "float32"
    device: str = "cpu"
    experts_implementation: str | None = Field("auto", description="auto: eager on CPU (far faster there than "
                                               "grouped_mm), the transformers default elsewhere")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    method: MethodSpec = Field(default_factory=MethodSpec)
    target: TargetSpec = Field(default_factory=lambda: TargetSpec(expert_sparsity=0.5))
    recovery: RecoverySpec | None = Field(None, description="after planning: compensate | merge (null: none)")
    apply: ApplyConfig = Field(default_factory=ApplyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    report: bool = True
    seed: int = 0

    @field_validator("method", mode="before")
    @classmethod
    def _method_str(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("recovery", mode="before")
    @classmethod
    def _recovery_str(cls, v):
        return None if v in (None, "none", "null") else {"name": v} if isinstance(v, str) else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        from moeprune.models import parse_dtype

        parse_dtype(v)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from moeprune.models import check_device

        return check_device(v)

    @field_validator("experts_implementation")
    @classmethod
    def _experts_impl(cls, v: str | None) -> str | None:
        from moeprune.models import check_experts_implementation

        return check_experts_implementation(v)

    @model_validator(mode="after")
    def _method_known(self):
        self.method.build()  # unknown names/options fail here, before any work
        if self.recovery is not None:  # with apply.mode=streaming it runs layer by layer (recover/layerwise.py)
            self.recovery.build()
        if self.apply.mode == "streaming" and (self.model.startswith("tiny:") or not os.path.isdir(self.model)):
            raise ValueError(f"apply.mode=streaming rewrites a checkpoint folder; model={self.model!r} is not one "
                             "(use mode: structural)")
        if self.calibration.layerwise and os.path.isdir(self.model) and self.apply.mode != "streaming":
            raise ValueError("calibration.layerwise=true keeps the decoder layers of the checkpoint on disk, so "
                             "the model is never whole in memory to prune in place; set apply.mode: streaming")
        if self.calibration.sequential and self.target.allocation != "uniform":
            raise ValueError(f"calibration.sequential=true fixes each layer's count before the next layer is "
                             f"observed; target.allocation={self.target.allocation!r} is not supported: set "
                             "target.allocation: uniform (or calibration.sequential: false)")
        from moeprune.models import warn_positions

        warn_positions(self.model, self.calibration.seq_len, "calibration")
        if self.eval.perplexity is not None:
            warn_positions(self.model, self.eval.seq_len, "eval")
        return self

    # ---- io
    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from None
        if data is None:
            raise ValueError(f"recipe {path} is empty; write at least `model: <hub id or folder>` (or run "
                             "`moeprune demo` for the built-in tiny model)")
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")  # noqa: TRY004
        return cls.model_validate(apply_overrides(data, overrides or []))

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` overrides (values parsed as YAML: numbers, bools, lists): the one ``key=value``
    parser of the CLI (``--set`` and ``--opt``)."""
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, val = item.split("=", 1)
        try:
            parsed = yaml.safe_load(val)
        except yaml.YAMLError:
            parsed = val  # e.g. a value with ': ' or an unbalanced bracket: keep the text
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a mapping")  # noqa: TRY004
        node[parts[-1]] = parsed
    return data
