"""The pipeline's config (``configs/pipeline.yaml``): which job to train, the gate, the canary's steps and bounds.

Pydantic, as the YAML comes from users: an unknown or misspelled field fails with its dotted path, the
value given and what was expected (the same messages as a job config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlray.config import GateConfig, _format_error, _set_dotted
from mlray.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompressStep(_Strict):
    """Optional: ship a compressed variant of the candidate when it keeps its accuracy (``mlray.compress``)."""

    enabled: bool = False
    method: str = Field(default="int8", min_length=1)
    tolerance: float = Field(default=1.0, ge=0, description="accuracy points the variant may lose")
    sparsity: float = Field(default=0.5, ge=0, lt=1)


class CanaryStep(_Strict):
    """The challenger's share of live requests goes up step by step while it stays within the bounds."""

    alias: str = Field(default="challenger", min_length=1, description="the app's challenger.alias")
    weights: tuple[float, ...] = Field(default=(0.05, 0.25, 0.5), description="shares of requests, in order")
    hold_s: float = Field(default=30.0, gt=0, description="each weight is held at least this long")
    min_requests: int = Field(default=20, ge=1, description="challenger requests a step needs before it advances")
    max_hold_s: float = Field(default=180.0, gt=0, description="a step still short of min_requests then: rollback")
    max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1, description="challenger 5xx rate may exceed the champion's by at most this")
    max_p99_ratio: float = Field(default=2.0, ge=1, description="challenger p99 <= ratio x champion p99 + slack")
    p99_slack_s: float = Field(default=0.05, ge=0)
    min_p99_requests: int = Field(
        default=100, ge=1, description="requests each side needs before the p99s are compared (with fewer, a "
                                       "p99 is one slow request); the last weight needs them to promote")
    poll_s: float = Field(default=1.0, gt=0, description="how often the app's counters are read")

    @field_validator("weights")
    @classmethod
    def _rising(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("canary.weights needs at least one share, e.g. [0.05, 0.25, 0.5]")
        if any(not 0 < w <= 1 for w in value) or list(value) != sorted(set(value)):
            raise ValueError(f"canary.weights must rise strictly within (0, 1], got {list(value)}")
        return value

    @model_validator(mode="after")
    def _hold_fits(self) -> CanaryStep:
        if self.max_hold_s < self.hold_s:
            raise ValueError(f"canary.max_hold_s ({self.max_hold_s}) is shorter than canary.hold_s ({self.hold_s})")
        return self


class PipelineConfig(_Strict):
    job: str = Field(default="configs/digits.yaml", description="the training job's config (relative to this file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted job fields, e.g. train.epochs: 10")
    trainer: Literal["train", "tune"] = Field(
        default="train", description="train once, or sweep the job's tune section and take the best trial")
    experiment: str = Field(default="mlray-pipeline", min_length=1, description="MLflow experiment of the records")
    app: str | None = Field(default=None, description="the Serve app to deploy to (default: the model's name)")
    gate: GateConfig | None = Field(default=None, description="default: the job's registry.gate")
    compress: CompressStep = CompressStep()
    canary: CanaryStep = CanaryStep()
    rollout_timeout_s: float = Field(default=120.0, gt=0, description="wait for the app to load a version")


def parse_pipeline(raw: dict[str, Any], *, origin: str = "(dict)", base: Path | None = None) -> PipelineConfig:
    """Validate a pipeline config; a relative ``job`` path is taken from the working directory, else from
    ``base`` (the YAML's folder)."""
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None
    job = Path(cfg.job)
    if not job.is_absolute() and not job.is_file() and base is not None and (base / job).is_file():
        cfg = cfg.model_copy(update={"job": str(base / job)})
    return cfg


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments -> dotted overrides of the pipeline config; each value is read as YAML
    (``canary.hold_s=10``, ``canary.weights=[0.1,0.5]``, ``compress.enabled=true``)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted pipeline field, e.g. canary.hold_s=10")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
    return overrides


def load_pipeline(path: str | Path, *, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML; ``overrides`` maps dotted fields (``canary.hold_s``) to values, as ``--set`` does."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"pipeline config {str(file)!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"pipeline config {str(file)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline config {str(file)!r} must hold a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    origin = f"in {file}" + (f" with --set {', '.join(overrides)}" if overrides else "")
    return parse_pipeline(raw, origin=origin, base=file.parent)
