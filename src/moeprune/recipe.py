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
    recon_tokens: int | None = Field(None, description="NAEE cache: a seeded subsample of this many tokens per "
                                     "batch; null = every token (the reference)")
    recon_max_gb: float | None = Field(4.0, description="NAEE cache bound in GB (= observe.recon_cache."
                                       "DEFAULT_MAX_GB): above it a seeded per-batch subsample, with a warning; "
                                       "null = no bound")

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


class MethodSpec(BaseModel):
    """``name`` plus the method's own options (validated against its config class)."""

    model_config = ConfigDict(extra="allow")
    name: str = "reap"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self):
        from moeprune.methods.registry import get_method

        return get_method(self.name, **self.options())


class TargetSpec(_Strict):
    expert_sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    param_ratio: float | None = Field(None, gt=0.0, le=1.0)
    memory_gb: float | None = Field(None, gt=0.0)
    allocation: Literal["uniform", "global", "method"] = "uniform"
    min_keep: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("expert_sparsity", "param_ratio", "memory_gb") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"target needs exactly one of expert_sparsity, param_ratio, memory_gb; got {given or 'none'}")
        return self

    def build(self):
        from moeprune.methods.target import Target

        return Target(**self.model_dump())


class ApplyConfig(_Strict):
    mode: Literal["structural", "streaming"] = "structural"
    max_shard_size: str = "5GB"
    save: bool = True


class EvalConfig(_Strict):
    perplexity: str | None = Field("builtin:stdlib-heldout", description="text file, or builtin:stdlib-heldout")
    seq_len: int = Field(256, ge=8)
    max_tokens: int | None = Field(20000, ge=1)
    kl: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_include_path: str | None = None
    lm_eval_limit: int | None = None


class Recipe(_Strict):
    model: str = "tiny:qwen3_moe"
    dtype: str = "float32"
    device: str = "cpu"
    experts_implementation: str | None = Field("auto", description="auto: eager on CPU (far faster there than "
                                               "grouped_mm), the transformers default elsewhere")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    method: MethodSpec = Field(default_factory=MethodSpec)
    target: TargetSpec = Field(default_factory=lambda: TargetSpec(expert_sparsity=0.5))
    apply: ApplyConfig = Field(default_factory=ApplyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    report: bool = True
    seed: int = 0

    @field_validator("method", mode="before")
    @classmethod
    def _method_str(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _method_known(self):
        self.method.build()  # unknown names/options fail here, before any work
        if self.apply.mode == "streaming" and (self.model.startswith("tiny:") or not os.path.isdir(self.model)):
            raise ValueError(f"apply.mode=streaming rewrites a checkpoint folder; model={self.model!r} is not one "
                             "(use mode: structural)")
        if self.calibration.layerwise and os.path.isdir(self.model) and self.apply.mode != "streaming":
            raise ValueError("calibration.layerwise=true keeps the decoder layers of the checkpoint on disk, so "
                             "the model is never whole in memory to prune in place; set apply.mode: streaming")
        return self

    # ---- io
    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "Recipe":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe {path} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(apply_overrides(data, overrides or []))

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` overrides (values parsed as YAML: numbers, bools, lists)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, val = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(val)
    return data
