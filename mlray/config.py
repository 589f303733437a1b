"""Typed job configs: one YAML file per job, CLI flags override single fields.

The YAML comes from users, so it is checked with pydantic: an unknown or misspelled field, or a value of
the wrong type or range, fails with the field's dotted path, the value given and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlray.errors import ConfigError

BUNDLED_DATASETS = ("digits", "breast_cancer", "synthetic")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(_Strict):
    rows: int = Field(default=10_000, ge=10)
    features: int = Field(default=16, ge=1)
    classes: int = Field(default=2, ge=2)


class DataConfig(_Strict):
    source: str = Field(
        default="digits", description="digits | breast_cancer | synthetic | a CSV/Parquet file or folder"
    )
    label_column: str | None = Field(default=None, description="label column of a CSV/Parquet source")
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    synthetic: SyntheticConfig = SyntheticConfig()
    cache: bool = Field(
        default=False,
        description="materialize the prepared splits in Ray's object store once, instead of re-reading "
        "(or re-generating) them every epoch; for data that fits in the cluster's object store",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source not in BUNDLED_DATASETS and not self.label_column:
            raise ValueError(
                f"data.label_column is required for a file source ({self.source!r}); "
                f"bundled sources are {', '.join(BUNDLED_DATASETS)}"
            )
        return self


class ModelConfig(_Strict):
    arch: str = "mlp"
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = Field(default=0.1, ge=0, lt=1)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(width < 1 for width in value):
            raise ValueError(f"every hidden width must be a positive integer, got {list(value)}")
        return value


class TrainConfig(_Strict):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_failures: int = Field(default=0, ge=-1, description="restarts after worker/node loss; -1 = no limit")
    storage_path: str | None = Field(
        default=None,
        description="Train checkpoint storage; default <home>/checkpoints. On several nodes: shared (s3://, NFS)",
    )
    checkpoints_to_keep: int = Field(default=2, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler"
    )
    run_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="re-running with the same name continues that run from its checkpoints",
    )


class GateConfig(_Strict):
    metric: str = "test_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    min_improvement: float = Field(default=0.0, ge=0)


class RegistryConfig(_Strict):
    gate: GateConfig = GateConfig()


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=2, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(default=2.0, gt=1)


class TuneSettings(_Strict):
    """A hyperparameter sweep: each trial is a distributed training of the job config with its
    ``search_space`` values applied (dotted field paths)."""

    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int = Field(default=1, ge=1)
    sweep_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    scheduler: SchedulerConfig = SchedulerConfig()
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("search_space")
    @classmethod
    def _known_samplers(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, spec in value.items():
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"search_space.{path} must be one of {{{', '.join(SAMPLERS)}}}: [...], got {spec}")
        return value


SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


class JobConfig(_Strict):
    name: str = Field(default="digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="registered model name")
    experiment: str | None = None
    seed: int = 42
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    registry: RegistryConfig = RegistryConfig()
    tune: TuneSettings | None = None

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{where}: {item['msg']}{shown}")
    return f"invalid config {origin}:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_config(raw: dict[str, Any], *, overrides: dict[str, Any] | None = None, origin: str = "") -> JobConfig:
    """Validate a config tree; ``overrides`` maps dotted field paths (``train.epochs``) to values."""
    tree = dict(raw)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def load_config(path: str | Path | None, *, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config (or the defaults when ``path`` is None) and apply CLI overrides."""
    if path is None:
        return parse_config({}, overrides=overrides, origin="(defaults)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping, got {type(raw).__name__}")
    return parse_config(raw, overrides=overrides, origin=f"in {file}")
